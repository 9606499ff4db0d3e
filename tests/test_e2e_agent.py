"""The worker agent against a real daphne: registration, public address, restarts, clean stops,
and two agents that share one id."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from registry.models import Connection, Worker, WorkerStatus
from tests.support.ip_echo import IpEcho
from tests.support.processes import (
    WORKER_ARGV,
    ServerProcess,
    child_process,
    free_port,
    get_json,
    wait_until,
)
from worker_agent import Backoff, WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ip_echo() -> Iterator[IpEcho]:
    echo = IpEcho("198.51.100.23")
    yield echo
    echo.close()


def connected(worker_id: str) -> bool:
    return Worker.objects.filter(id=worker_id, status=WorkerStatus.CONNECTED).exists()


def test_agent_registers_and_reports_the_address_its_echo_service_gives(
    server: ServerProcess, ip_echo: IpEcho, agents: Callable[..., WorkerAgent]
) -> None:
    agent = agents(server.url, "agent-1", ip_echo_url=ip_echo.url)
    agent.start()
    assert agent.wait_registered(10)
    wait_until(
        lambda: Worker.objects.filter(id="agent-1", public_ip="198.51.100.23").exists(),
        timeout=10,
        what="reported address",
    )
    _, body = get_json(f"{server.url}/debug/list_workers")
    assert body["workers"]["agent-1"]["public_ip"] == "198.51.100.23"
    assert ip_echo.requests >= 1
    wait_until(
        lambda: Worker.objects.get(id="agent-1").agent_info.get("pid") == os.getpid(), timeout=10
    )
    assert agent.status()["public_ip_registered"] == "198.51.100.23"


def test_agent_without_an_echo_service_relies_on_the_observed_address(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    agent = agents(server.url, "agent-2", ip_echo_url="")
    agent.start()
    assert agent.wait_registered(10)
    _, body = get_json(f"{server.url}/debug/list_workers")
    assert body["workers"]["agent-2"]["public_ip"] == "127.0.0.1"


def test_agent_comes_back_within_its_backoff_bound_after_a_server_crash(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    backoff = Backoff(base=0.5, cap=2.0)
    agent = agents(server.url, "survivor", backoff=backoff)
    agent.start()
    assert agent.wait_registered(10)
    first = Worker.objects.get(id="survivor").current_connection_id
    server.kill()
    time.sleep(1.5)  # a few failed attempts while the server is down
    server.start()
    up_at = time.monotonic()
    wait_until(
        lambda: (
            Worker.objects.filter(id="survivor", status=WorkerStatus.CONNECTED)
            .exclude(current_connection_id=first)
            .exists()
        ),
        timeout=backoff.cap + 5,
        what="re-registration",
    )
    # The bound: one full backoff ceiling (the cap) after the server is back, plus start-up slack.
    assert time.monotonic() - up_at <= backoff.cap + 2
    rows = Connection.objects.filter(worker_id="survivor").order_by("id")
    assert rows.count() == 2
    assert rows[0].close_reason == "server instance restarted"  # closed at the next start
    assert rows[1].instance_id != rows[0].instance_id


def test_stop_closes_with_1000_and_the_service_records_it(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    agent = agents(server.url, "leaver")
    agent.start()
    assert agent.wait_registered(10)
    assert agent.stop(timeout=10)
    assert agent.status()["state"] == "stopped"
    wait_until(lambda: not connected("leaver"), timeout=10, what="close recorded")
    row = Connection.objects.get(worker_id="leaver")
    assert (row.close_code, row.close_reason) == (1000, "closed by the worker")


def test_sigterm_stops_the_standalone_agent_with_a_normal_close(
    server: ServerProcess, ip_echo: IpEcho, tmp_path
) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "RENDEZVOUS_SERVICE_URL": server.url,
        "WORKER_ID": "standalone",
        "PORT": str(free_port()),
        "IP_ECHO_URL": ip_echo.url,
        "RENDEZVOUS_CONTROL_SOCKET": str(tmp_path / "agent.sock"),
    }
    with child_process(
        [sys.executable, *WORKER_ARGV], env=env, log_path=tmp_path / "agent.log"
    ) as process:
        wait_until(
            lambda: Worker.objects.filter(id="standalone", public_ip="198.51.100.23").exists(),
            timeout=15,
            what="standalone registration",
        )
        health_status, health = get_json(f"http://127.0.0.1:{env['PORT']}/status")
        assert health_status == 200 and health["state"] == "registered"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    wait_until(lambda: not connected("standalone"), timeout=10, what="close recorded")
    assert Connection.objects.get(worker_id="standalone").close_code == 1000


def test_two_agents_with_one_id_settle_on_one_owner(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    settings = {"superseded_delay": 0.5, "max_superseded": 2}
    first = agents(server.url, "twin", **settings)
    second = agents(server.url, "twin", **settings)
    first.start()
    assert first.wait_registered(10)
    second.start()
    wait_until(
        lambda: {first.status()["state"], second.status()["state"]} == {"superseded", "registered"},
        timeout=15,
        what="one agent giving up the id",
    )
    owner = first if first.status()["state"] == "registered" else second
    time.sleep(1.5)  # longer than a superseded delay: nobody comes back to fight
    assert owner.status()["state"] == "registered"
    worker = Worker.objects.get(id="twin")
    assert worker.status == WorkerStatus.CONNECTED
    assert worker.current_connection_id == owner.status()["connection_id"]
    codes = list(Connection.objects.filter(worker_id="twin").values_list("close_code", flat=True))
    assert codes.count(4000) >= 2 and codes.count(None) == 1


def test_runworker_runs_agents_against_the_local_server(server: ServerProcess, tmp_path) -> None:
    env = {**server.env, "RENDEZVOUS_HOUSEKEEPING": "0"}
    with child_process(
        [sys.executable, "manage.py", "runworker", "--count", "3", "--worker-id", "local"],
        env=env,
        log_path=tmp_path / "runworker.log",
    ) as process:
        wait_until(
            lambda: Worker.objects.filter(id__startswith="local-", status="connected").count() == 3,
            timeout=15,
            what="three local agents",
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    wait_until(lambda: not Worker.objects.filter(status="connected").exists(), timeout=10)
    assert set(Connection.objects.values_list("close_code", flat=True)) == {1000}
