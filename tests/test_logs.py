"""Log lines: each event names its worker, connection and instance; LOG_FORMAT=json writes one
JSON object per line; no secret reaches the log."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings

from registry.ops.logs import InstanceLogAdapter, JsonFormatter, log_stream
from registry.presence.runtime import InstanceRuntime
from registry.routing import websocket_urlpatterns
from tests.support.processes import REPO, ServerProcess, wait_until

application = URLRouter(websocket_urlpatterns)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the service's loggers write, as LOG_FORMAT=json would write it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("registry")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_the_keys_cloud_logging_reads_and_the_event_ids() -> None:
    record = logging.LogRecord(
        "registry.consumers",
        logging.WARNING,
        __file__,
        1,
        "worker=%s connection=%s gone",
        ("w-1", 42),
        None,
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "WARNING"
    assert entry["logger"] == "registry.consumers"
    assert entry["message"] == "worker=w-1 connection=42 gone"
    assert (entry["worker_id"], entry["connection_id"]) == ("w-1", 42)
    assert entry["time"].endswith("+00:00")


def test_an_id_in_other_than_ascii_digits_stays_text() -> None:
    """str.isdigit() takes "\u00b2", which int() refuses: the formatter raised (issue 19), and
    the text of a log line can carry what a worker wrote (a close reason)."""
    record = logging.makeLogRecord({"msg": "introduction ended: connection=\u00b2 bye"})
    assert json.loads(JsonFormatter().format(record))["connection_id"] == "\u00b2"


def test_ids_given_as_extra_win_over_the_message() -> None:
    record = logging.makeLogRecord(
        {"msg": "worker=from-text", "worker_id": "from-extra", "levelname": "INFO"}
    )
    assert json.loads(JsonFormatter().format(record))["worker_id"] == "from-extra"


def test_a_traceback_stays_inside_the_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "RuntimeError: boom" in json.loads(text)["message"]


def test_the_instance_adapter_names_the_current_instance_in_text_and_as_a_field() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.adapter")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    instance = ["first"]
    try:
        adapter = InstanceLogAdapter(logger, lambda: instance[0])
        adapter.warning("worker=%s up", "w1")
        instance[0] = "second"
        adapter.warning("worker=%s up", "w1")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "instance=first worker=w1 up",
        "instance=second worker=w1 up",
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_every_line_of_a_session_carries_worker_connection_and_instance(
    json_log: io.StringIO, runtime: InstanceRuntime
) -> None:
    comm = WebsocketCommunicator(application, "/ws/register/log-1")
    comm.scope["client"] = ("203.0.113.5", 40000)
    assert (await comm.connect())[0]
    welcome = await comm.receive_json_from()
    await comm.send_to(text_data="not json")
    await comm.receive_json_from()
    await comm.disconnect()
    session = [e for e in lines(json_log) if e["logger"] == "registry.consumers"]
    assert [e["message"].split(" ", 3)[3][:10] for e in session] == [
        "registered",
        "INVALID_JS",
        "closed cod",
    ]
    for entry in session:
        assert entry["worker_id"] == "log-1"
        assert entry["connection_id"] == welcome["connection_id"]
        assert entry["instance_id"] == welcome["instance_id"] == runtime.instance_id
    assert settings.SECRET_KEY not in json_log.getvalue()


def test_log_format_json_switches_the_root_handler(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "import logging; logging.getLogger('registry.x').warning('worker=w1 connection=7 hi')",
        ],
        cwd=REPO,
        env={**os.environ, "LOG_FORMAT": "json", "RENDEZVOUS_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    entry = json.loads(out.stderr.strip().splitlines()[-1])  # a command other than serve
    assert (entry["severity"], entry["worker_id"], entry["connection_id"]) == ("WARNING", "w1", 7)


@pytest.mark.parametrize(
    ("argv", "stream"),
    [
        (["manage.py", "serve"], "ext://sys.stdout"),
        (["/app/manage.py", "runstun", "--port", "3478"], "ext://sys.stdout"),
        (
            ["/usr/lib/python3/site-packages/daphne/__main__.py", "-e", "tcp:8000"],
            "ext://sys.stdout",
        ),
        (["manage.py", "create_enrolment_key", "--name", "ci"], "ext://sys.stderr"),
        (["manage.py", "migrate"], "ext://sys.stderr"),
        (["manage.py"], "ext://sys.stderr"),
    ],
)
def test_servers_log_on_stdout_and_other_commands_on_stderr(argv: list[str], stream: str) -> None:
    assert log_stream(argv) == stream


@pytest.mark.standalone
@pytest.mark.parametrize(
    ("command", "secret"),
    [("create_enrolment_key", r"rvk_[\w-]+"), ("create_api_token", r"rvt_[\w-]+")],
)
def test_key_commands_print_only_the_secret_on_stdout(
    tmp_path: Path, command: str, secret: str
) -> None:
    env = {**os.environ, "RENDEZVOUS_DATA_DIR": str(tmp_path), "LOG_LEVEL": "INFO"}
    env.pop("DATABASE_URL", None)  # a SQLite registry of its own
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True, timeout=120
    )
    out = subprocess.run(
        [sys.executable, "manage.py", command, "--name", "ci"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert re.fullmatch(secret + "\n", out.stdout), out.stdout  # what KEY=$(...) captures
    assert "INFO registry." in out.stderr and "created" in out.stderr


def test_an_unknown_log_format_stops_the_start() -> None:
    out = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env={**os.environ, "LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "LOG_FORMAT must be 'text' or 'json'" in out.stderr


def test_a_database_password_never_reaches_the_log(tmp_path: Path) -> None:
    """The server is started on an unreachable database whose URL holds a password: the banner
    and the failing housekeeping rounds must name the database, never the password."""
    password = "pw-never-in-logs-7f3a"
    server = ServerProcess(
        database_url=f"postgres://rendezvous:{password}@127.0.0.1:1/registrydb",
        log_dir=tmp_path,
        env={"LOG_FORMAT": "json", "RENDEZVOUS_DATA_DIR": str(tmp_path), "SECRET_KEY": "sk-x9"},
    )
    try:
        server.start()
        wait_until(
            lambda: "housekeeping round failed" in server.log_path.read_text(),
            timeout=20,
            what="a failed housekeeping round",
        )
    finally:
        server.kill()
    text = server.log_path.read_text()
    assert "registrydb" in text
    assert password not in text
    assert "sk-x9" not in text
    for line in text.splitlines():
        if line.startswith("{"):
            assert json.loads(line)["severity"]
