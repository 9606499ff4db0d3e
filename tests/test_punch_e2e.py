"""Workers reach each other directly: real daphne, real agents, the project's STUN responder.

On loopback the whole introduction runs against one server (both passes). Across real NAT
(network namespaces, iptables MASQUERADE; tests/support/netns.py) two workers behind two cone
NATs exchange datagrams directly, a cone and a symmetric NAT fail with a clear reason, and two
symmetric NATs are refused at once.
"""

from __future__ import annotations

import json
import queue
import re
import sys
from collections.abc import Callable, Iterator

import pytest

from registry.models import Worker
from tests.support.netns import (
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    NatKind,
    NatTopology,
    nat_topology,
    require_netns,
)
from tests.support.processes import ServerProcess, wait_until
from tests.support.stun_responder import running_responder
from worker_agent import PeerPath, PeerRefused, PeerUnavailable, WorkerAgent

SERVICE_PORT = 8000


# ---- on loopback ---------------------------------------------------------------------------------


@pytest.fixture
def stun_servers() -> Iterator[str]:
    with running_responder() as responder:
        yield ",".join(f"{host}:{port}" for host, port in responder.addresses)


@pytest.mark.django_db(transaction=True)
def test_two_agents_punch_a_path_and_exchange_datagrams_on_loopback(
    server_factory: Callable[..., ServerProcess],
    agents: Callable[..., WorkerAgent],
    stun_servers: str,
) -> None:
    server = server_factory(env={"RENDEZVOUS_STUN_SERVERS": stun_servers}).start()
    accepted: queue.Queue[PeerPath] = queue.Queue()
    b = agents(server.url, "b", on_peer=lambda agent, path: accepted.put(path))
    a = agents(server.url, "a")
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    wait_until(
        lambda: Worker.objects.filter(id="b").exclude(nat_mapping="").exists(),
        timeout=10,
        what="b's NAT report",
    )
    assert Worker.objects.get(id="b").nat_mapping == "endpoint-independent"
    assert [p["worker_id"] for p in a.list_peers()] == ["b"]
    with a.connect("b", timeout=10) as path:
        other = accepted.get(timeout=5)
        path.send(b"hello")
        assert other.recv(timeout=3) == b"hello"
        other.send(b"hi")
        assert path.recv(timeout=3) == b"hi"
        assert path.peer_address == other.local_address
        other.close()
    with pytest.raises(PeerUnavailable, match="not connected"):
        a.connect("nobody", timeout=5)
    # An agent without on_peer refuses introductions, and the requester hears why.
    with pytest.raises(PeerRefused, match="does not accept peer connections"):
        b.connect("a", timeout=5)
    assert "punch succeeded" in server.log_tail(200)


# ---- across real NAT -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """Four sites: two cone NATs (w1, w2) and two symmetric ones (w3, w4)."""
    require_netns()
    log_dir = tmp_path_factory.mktemp("punch")
    kinds = [NatKind.MASQUERADE, NatKind.MASQUERADE, NatKind.RANDOM_FULLY, NatKind.RANDOM_FULLY]
    with nat_topology(*kinds, log_dir=log_dir) as topology:
        topology.start_stun()
        yield topology


@pytest.fixture
def service(internet: NatTopology, transactional_db: None) -> Iterator[str]:
    """daphne in the public namespace, on this test's database (a SQLite file), and the
    answering agents behind NATs 2, 3 and 4."""
    from tests.support.databases import current_database_url

    probe = ServerProcess(log_dir=internet.log_dir, database_url=current_database_url())
    env = {
        **probe.env,
        "HOST": SERVICE_IP,
        "PORT": str(SERVICE_PORT),
        "ALLOWED_HOSTS": SERVICE_IP,
        "RENDEZVOUS_STUN_SERVERS": (
            f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
        ),
    }
    log_name = "service.log"
    process = internet.python(internet.public, "manage.py", "serve", env=env, log_name=log_name)
    url = f"http://{SERVICE_IP}:{SERVICE_PORT}"
    answering = [
        internet.python(
            site.worker,
            "-m",
            "tests.support.peer_agent",
            "answer",
            "--url",
            url,
            "--id",
            f"w{site.index}",
            env=env,
            log_name=f"w{site.index}.log",
        )
        for site in internet.sites[1:]
    ]
    wait_until(
        lambda: Worker.objects.filter(status="connected").exclude(nat_mapping="").count() == 3,
        timeout=30,
        what="the answering workers to register and report their NATs",
    )
    yield url
    for child in [*answering, process]:
        child.terminate()
        child.wait(10)


def peer_agent(mode: str, url: str, worker_id: str, *args: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "tests.support.peer_agent", mode, "--url", url, "--id", worker_id),
        *args,
    ]


def connect_from_w1(internet: NatTopology, url: str, peer: str) -> dict:
    result = internet.run(
        internet.sites[0].worker,
        peer_agent("connect", url, "w1", "--peer", peer),
        timeout=60,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def forwarded_udp(internet: NatTopology, nat: str, destination: str) -> int:
    """Packets the NAT router forwarded to `destination` (a counting rule added below)."""
    listing = internet.run(nat, ["iptables", "-w", "5", "-nvxL", "FORWARD"]).stdout
    for line in listing.splitlines():
        if line.split()[-1:] == [destination]:  # the protocol column says 17 with -n
            return int(line.split()[0])
    raise AssertionError(f"no counting rule for {destination} in {nat}:\n{listing}")


@pytest.mark.standalone  # a SQLite file that the namespaces' processes share: SQLite pass only
def test_workers_behind_two_cone_nats_exchange_datagrams_directly(
    internet: NatTopology, service: str
) -> None:
    w1, w2 = internet.sites[0], internet.sites[1]
    internet.run(w1.nat, ["iptables", "-w", "5", "-I", "FORWARD", "-o", "wan0", "-p", "udp",
                          "-d", w2.public_ip])  # fmt: skip
    result = connect_from_w1(internet, service, "w2")
    print("cone-cone:", result)  # the figures for the record (pytest -rP shows them)
    assert result["ok"], result
    assert result["reply"] == "echo:ping"
    # The path ends at w2's NAT, not at the service: the datagrams went NAT to NAT.
    assert result["peer_address"][0] == w2.public_ip != SERVICE_IP
    assert forwarded_udp(internet, w1.nat, w2.public_ip) > 0
    service_log = (internet.log_dir / "service.log").read_text()
    assert re.search(r"worker=w1 introduction=\w+ punch succeeded", service_log)


@pytest.mark.standalone
def test_a_cone_and_a_symmetric_nat_fail_quickly_and_say_why(
    internet: NatTopology, service: str
) -> None:
    result = connect_from_w1(internet, service, "w3")
    print("cone-symmetric:", result)
    assert not result["ok"], result
    assert result["error_type"] == "PunchFailed"
    assert "endpoint-dependently (symmetric)" in result["error"]
    assert "the peer's NAT" in result["error"]
    assert result["seconds"] < 12  # STUN, introduction and the 5 s punch window; no blind wait


@pytest.mark.standalone
def test_two_symmetric_nats_are_refused_before_any_probe(
    internet: NatTopology, service: str
) -> None:
    w3 = internet.sites[2]
    result = internet.run(
        w3.worker,
        peer_agent("connect", service, "w3b", "--peer", "w4"),
        timeout=60,
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    print("symmetric-symmetric:", outcome)
    assert outcome["error_type"] == "PunchImpossible", outcome
    assert "relay" in outcome["error"]
    assert outcome["seconds"] < 5
