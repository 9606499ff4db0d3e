"""Management commands: which `runworker` Django finds, and what `serve` runs."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from django.core.management import get_commands

from registry.management.commands.serve import daphne_arguments, endpoint
from tests.support.processes import REPO, SERVE_ARGV, WORKER_ARGV, child_process

pytestmark = pytest.mark.standalone


def test_runworker_resolves_to_the_worker_agent_command() -> None:
    assert get_commands()["runworker"] == "registry"


def test_runworker_with_channel_names_hands_over_to_channels_worker(tmp_path: Path) -> None:
    log = tmp_path / "channels-worker.log"
    argv = [sys.executable, "manage.py", "runworker", "some-background-channel", "-v", "2"]
    with child_process(argv, env=dict(os.environ), log_path=log) as process:
        deadline = time.monotonic() + 20
        while "Running worker for channels" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
    assert "Running worker for channels ['some-background-channel']" in log.read_text()


def test_serve_runs_daphne_on_the_asgi_application_with_the_websocket_limits() -> None:
    args = daphne_arguments("0.0.0.0", 8080)
    assert args[-1] == "rendezvous_project.asgi:application"
    assert args[args.index("--endpoint") + 1] == "tcp:port=8080:interface=0.0.0.0:backlog=2048"
    assert args[args.index("--websocket_timeout") + 1] == "86400"
    assert int(args[args.index("--websocket-max-message-size") + 1]) == 2 * 65536  # relay frames


@pytest.mark.parametrize(
    ("host", "interface"), [("::", r"\:\:"), ("[::1]", r"\:\:1"), ("fe80::1", r"fe80\:\:1")]
)
def test_serve_escapes_the_colons_of_an_ipv6_address_in_daphnes_endpoint(
    host: str, interface: str
) -> None:
    assert endpoint(host, 8000, 64) == f"tcp:port=8000:interface={interface}:backlog=64"


def test_the_dockerfile_runs_the_commands_the_tests_run() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    [cmd] = re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert json.loads(cmd) == ["python", *SERVE_ARGV]  # what ServerProcess starts
    assert re.search(r"^USER 10001$", dockerfile, re.M)  # not root
    worker = " ".join(["python", *WORKER_ARGV])  # what the standalone-agent test starts
    assert worker in dockerfile
    deploy = (REPO / "docs/deploy.md").read_text()
    assert "--command python --args " + ",".join(WORKER_ARGV) in deploy
    assert " ".join(["python", *SERVE_ARGV]) in deploy


def test_registry_before_channels_is_enforced_by_a_system_check(settings) -> None:
    from registry.ops.checks import check_rendezvous_settings

    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "registry"] + ["registry"]
    assert "rendezvous.E003" in [p.id for p in check_rendezvous_settings()]


@pytest.mark.django_db
def test_ensure_local_admin_creates_one_superuser_and_prints_its_password_once() -> None:
    from io import StringIO

    from django.contrib.auth.models import User
    from django.core.management import call_command

    first, second = StringIO(), StringIO()
    call_command("ensure_local_admin", stdout=first)
    call_command("ensure_local_admin", stdout=second)
    assert User.objects.filter(is_superuser=True).count() == 1
    assert "password" in first.getvalue() and "created superuser 'admin'" in first.getvalue()
    assert (
        "created superuser" not in second.getvalue() and "password was printed" in second.getvalue()
    )


@pytest.mark.parametrize(
    ("servers", "problems"),
    [
        (["stun.example.com:3478", "[2001:db8::1]:3479"], []),
        (["stun.example.com"], ["E004"]),
        (["stun.example.com:\u00b2"], ["E004"]),  # a digit to str.isdigit(), not to int()
    ],
)
def test_stun_servers_must_be_host_and_port(settings, servers, problems) -> None:
    from registry.ops.checks import check_rendezvous_settings

    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "STUN_SERVERS": servers}
    found = [p.id for p in check_rendezvous_settings() if p.id == "rendezvous.E004"]
    assert found == [f"rendezvous.{p}" for p in problems]


@pytest.mark.parametrize(
    ("given", "environ", "expected"),
    [
        ("http://a:1", {"RENDEZVOUS_SERVICE_URL": "http://b:2"}, "http://a:1"),
        (None, {"RENDEZVOUS_SERVICE_URL": "http://b:2"}, "http://b:2"),
        (None, {}, "http://127.0.0.1:8000"),
    ],
)
def test_runworker_takes_url_then_the_agents_variable_then_the_local_server(
    settings, given: str | None, environ: dict[str, str], expected: str
) -> None:
    from registry.management.commands.runworker import service_url

    settings.HOST, settings.PORT = "0.0.0.0", 8000
    assert service_url(given, environ) == expected


@pytest.mark.django_db(transaction=True)
def test_runworker_registers_with_the_service_rendezvous_service_url_names(
    server_factory, tmp_path: Path
) -> None:
    from registry.models import Worker, WorkerStatus
    from tests.support.processes import free_port, wait_until

    server = server_factory().start()
    # HOST:PORT name a port where nothing listens: only the variable leads to the service.
    env = {**os.environ, "RENDEZVOUS_SERVICE_URL": server.url, "PORT": str(free_port())}
    argv = [sys.executable, "manage.py", "runworker", "--worker-id", "from-env"]
    with child_process(argv, env=env, log_path=tmp_path / "runworker.log"):
        wait_until(
            lambda: Worker.objects.filter(id="from-env", status=WorkerStatus.CONNECTED).exists(),
            timeout=20,
            what="the agent registered through RENDEZVOUS_SERVICE_URL",
        )
    assert server.url in (tmp_path / "runworker.log").read_text()
