"""Always a path: real daphne, real agents; on loopback, and across real NAT with coturn.

On loopback (both passes) the quickstart: two agents on one machine with nothing configured
connect through the service relay at once and move to their LAN pair; an agent that sends no
UDP stays on the relay; offline and refusing peers fail fast; a peer that does not read has
frames dropped for it instead of buffered.

Across real NAT (network namespaces, iptables MASQUERADE, tests/support/netns.py; coturn in the
public namespace) every pair of NATs gets the path it should: cone and cone direct, two workers
behind one NAT their LAN, a symmetric NAT on either side TURN when the service hands out TURN
credentials and the service relay when it does not, a NAT that drops UDP the relay; and a pair
that starts relayed moves to direct when a firewall rule goes, with data flowing across the move.
Each asserts the route that carried the data: the path's kind and remote address, and where it
matters an iptables counter on the NAT.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from registry.models import PeerConnection, Worker
from tests.support.netns import (
    SERVICE_IP,
    TURN_PORT,
    NatKind,
    NatTopology,
    Site,
    nat_topology,
    require_netns,
)
from tests.support.processes import ServerProcess, wait_until
from tests.support.public_service import serve_public
from worker_agent import PeerPath, PeerRefused, PeerUnavailable, WorkerAgent

TURN_SECRET = "test-turn-secret-0123456789"

# ---- on loopback ---------------------------------------------------------------------------------


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """A value from the server's /metrics, 0 when the series does not exist (yet)."""
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not wanted and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.django_db(transaction=True)
def test_the_quickstart_connects_through_the_relay_at_once_then_moves_to_the_lan(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    """`make run` with nothing configured: no STUN, no TURN. Raw datagram paths (the encrypted
    connections over them: tests/test_connections_e2e.py, with the README's example)."""
    accepted: queue.Queue[PeerPath] = queue.Queue()
    b = agents(server.url, "gpu-box-7", on_peer_path=lambda agent, path: accepted.put(path))
    a = agents(server.url, "laptop-3")
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    started = time.monotonic()
    with a.connect_path("gpu-box-7") as path:
        assert time.monotonic() - started < 1.0
        assert path.kind == "relay" and path.remote_address is None
        path.send(b"ping")
        other = accepted.get(timeout=5)
        assert other.recv(timeout=3) == b"ping"
        other.send(b"pong")
        assert path.recv(timeout=3) == b"pong"
        assert path.wait_for_kind("lan", timeout=10), path.history
        assert other.wait_for_kind("lan", timeout=10), other.history  # it may finish later
        assert path.remote_address == other.routes()["lan"].local  # type: ignore[attr-defined]
        for n in range(20):
            path.send(b"on the lan %d" % n)
        received = {other.recv(timeout=3) for _ in range(20)}
        assert received == {b"on the lan %d" % n for n in range(20)}
        assert path.stats.sent["lan"] == 20 and other.stats.received["lan"] == 20
    wait_until(lambda: other.closed, timeout=5, what="the close to reach the peer")
    record = PeerConnection.objects.get()
    assert (record.requester_id, record.target_id) == ("laptop-3", "gpu-box-7")
    assert (record.outcome, record.path_kind, record.path_changes) == ("connected", "lan", 2)
    assert record.setup_ms is not None and record.setup_ms < 1000
    wait_until(lambda: PeerConnection.objects.get().closed_at, timeout=5, what="the close record")
    assert metric(server, "rendezvous_peer_paths_total", kind="relay") == 1
    assert metric(server, "rendezvous_peer_paths_total", kind="lan") == 1
    log = server.log_tail(400)
    assert "path to gpu-box-7: relay" in log and "path to gpu-box-7: lan via" in log


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_sends_no_udp_is_reached_through_the_relay_alone(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    accepted: queue.Queue[PeerPath] = queue.Queue()
    b = agents(server.url, "b", on_peer_path=lambda agent, path: accepted.put(path), peer_udp=False)
    a = agents(server.url, "a", peer_udp=False)
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect_path("b", timeout=5) as path:
        other = accepted.get(timeout=5)
        for n in range(200):
            path.send(b"%d" % n + b"x" * 1000)
        got = [other.recv(timeout=5) for _ in range(200)]
        assert got == [b"%d" % n + b"x" * 1000 for n in range(200)]  # in order, none lost
        assert not path.wait_for_kind("lan", "direct", "turn", timeout=2)
        assert path.kind == other.kind == "relay"
        assert path.stats.sent == {"relay": 200}
    assert metric(server, "rendezvous_relay_frames_total") >= 1
    assert metric(server, "rendezvous_relay_bytes_total") >= 200 * 1002


@pytest.mark.django_db(transaction=True)
def test_offline_and_refusing_peers_fail_within_two_seconds_with_the_reason(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    a = agents(server.url, "a")
    shy = agents(server.url, "shy")  # no on_peer: refuses
    a.start()
    shy.start()
    assert a.wait_registered(10) and shy.wait_registered(10)
    started = time.monotonic()
    with pytest.raises(PeerUnavailable, match="nobody is not connected"):
        a.connect("nobody")
    with pytest.raises(PeerRefused, match="does not accept peer connections") as refused:
        a.connect("shy")
    assert time.monotonic() - started < 2.0
    assert refused.value.code == "PEER_REFUSED"


@pytest.mark.django_db(transaction=True)
def test_a_peer_that_stops_reading_has_frames_dropped_for_it_not_buffered(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """B's socket stops reading; A blasts 96 MB at it, twice. The service drops what B's socket
    cannot take (rendezvous_relay_dropped{reason="peer_slow"}) and reads A no faster than it
    relays: its memory stays flat."""
    # A budget no test can exhaust: what is dropped here is dropped for B's sake alone.
    server = server_factory(env={"RENDEZVOUS_RELAY_BYTES_PER_SECOND": "1e10"}).start()

    async def scenario() -> tuple[int, int]:
        a = await websockets.connect(f"{server.ws_url}/ws/register/a", max_size=2**20)
        b = await websockets.connect(f"{server.ws_url}/ws/register/b", max_size=2**20, max_queue=1)
        await a.recv(), await b.recv()  # welcomes
        await a.send(json.dumps({"type": "connect_request", "peer_id": "b", "request_id": "r",
                                 "protocol_version": 2, "transport": "datagrams"}))  # fmt: skip
        await a.recv()  # connect_pending
        asked = json.loads(await b.recv())
        await b.send(json.dumps({"type": "introduction_accept", "protocol_version": 2,
                                 "introduction_id": asked["introduction_id"]}))  # fmt: skip
        await b.recv()  # its introduction; from now on B reads nothing
        await a.recv()
        header = b"\x01" + bytes.fromhex(asked["introduction_id"])
        frame = header + (60_000).to_bytes(2, "big") + os.urandom(60_000)
        rss = [rss_kib(server)]
        for batch in (1, 2):
            for _ in range(1600):  # 96 MB
                await a.send(frame)
            pong = await a.ping()
            await asyncio.wait_for(pong, 30)  # A's connection is fine
            while metric(server, "rendezvous_relay_frames_total") < batch * 1600:
                await asyncio.sleep(0.1)  # daphne has queued what the consumer still relays
            rss.append(rss_kib(server))
        await a.close()
        b.transport.abort()
        return rss[2] - rss[1], rss[1] - rss[0]

    second, first = asyncio.run(scenario())
    dropped = metric(server, "rendezvous_relay_dropped_total", reason="peer_slow")
    assert dropped > 3000, dropped  # of 3,200: B's socket took a few MB at most
    # Neither batch piles up: not for B (the send window), not from A (the read window: daphne
    # would otherwise read all 96 MB at once and queue it for the consumer).
    assert first < 16 * 1024, f"the first 96 MB grew the server by {first} KiB"
    assert second < 16 * 1024, f"the second 96 MB grew the server by {second} KiB"


def rss_kib(server: ServerProcess) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- across real NAT -----------------------------------------------------------------------------

SERVICE_PORT = 8000  # no TURN
TURN_SERVICE_PORT = 8001  # with TURN credentials for coturn


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """Five sites: cone with two workers (w1, w1b), cone (w2), symmetric (w3), symmetric (w4),
    cone (w5, for the firewall tests); the STUN responder and coturn in public."""
    require_netns()
    log_dir = tmp_path_factory.mktemp("paths")
    kinds = [
        NatKind.MASQUERADE,
        NatKind.MASQUERADE,
        NatKind.RANDOM_FULLY,
        NatKind.RANDOM_FULLY,
        NatKind.MASQUERADE,
    ]
    with nat_topology(*kinds, workers=[2, 1, 1, 1, 1], log_dir=log_dir) as topology:
        topology.start_stun()
        topology.start_turn(secret=TURN_SECRET)
        yield topology


@pytest.fixture
def services(internet: NatTopology, transactional_db: None) -> Iterator[dict[str, str]]:
    """Two daphne instances in the public namespace on this test's database (a SQLite file):
    one without TURN, one that mints TURN credentials for coturn."""
    plain, plain_process = serve_public(internet, "plain", port=SERVICE_PORT)
    turn, turn_process = serve_public(
        internet,
        "turn",
        port=TURN_SERVICE_PORT,
        RENDEZVOUS_TURN_SERVERS=f"{SERVICE_IP}:{TURN_PORT}",
        RENDEZVOUS_TURN_SECRET=TURN_SECRET,
    )
    processes = [plain_process, turn_process]
    urls = {"plain": plain, "turn": turn}
    yield urls
    for process in processes:
        process.terminate()
        process.wait(10)


def peer_agent(mode: str, url: str, worker_id: str, *args: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "tests.support.peer_agent", mode, "--url", url, "--id", worker_id),
        *args,
    ]


def answering(internet: NatTopology, namespace: str, url: str, worker_id: str) -> Any:
    process = internet.popen(
        namespace, peer_agent("answer", url, worker_id), log_name=f"{worker_id}.log"
    )
    wait_until(
        lambda: Worker.objects.filter(id=worker_id, status="connected").exists(),
        timeout=30,
        what=f"{worker_id} to register",
    )
    return process


def connect(
    internet: NatTopology, namespace: str, url: str, worker_id: str, peer: str, *args: str
) -> dict[str, Any]:
    result = internet.run(
        namespace, peer_agent("connect", url, worker_id, "--peer", peer, *args), timeout=120
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{worker_id} -> {peer}:", outcome)  # the figures for the record (pytest -rP)
    return outcome


def scenario(
    internet: NatTopology,
    url: str,
    frm: tuple[str, str],
    to: tuple[str, str],
    *args: str,
) -> dict[str, Any]:
    """`frm` connects to `to` (each a namespace and a worker id), which answers; the outcome."""
    peer = answering(internet, to[0], url, to[1])
    try:
        return connect(internet, frm[0], url, frm[1], to[1], *args)
    finally:
        peer.terminate()
        peer.wait(10)


def assert_carried(outcome: dict[str, Any], kind: str) -> None:
    assert outcome["ok"], outcome
    assert outcome["first_kind"] == "relay"  # the relay carries data from the start
    assert outcome["reply"] == "echo:ping" and outcome["last_reply"] == "echo:pong"
    assert outcome["kind"] == kind, outcome


def site(internet: NatTopology, index: int) -> Site:
    return internet.sites[index - 1]


@pytest.mark.standalone
def test_two_cone_nats_end_on_a_direct_path(internet: NatTopology, services: dict) -> None:
    w1, w2 = site(internet, 1), site(internet, 2)
    before = internet.forwarded_udp(w1, w2.public_ip)
    outcome = scenario(
        internet, services["plain"], (w1.worker, "c1"), (w2.worker, "c2"),
        "--wait-kind", "direct", "--wait", "10",
    )  # fmt: skip
    assert_carried(outcome, "direct")
    assert outcome["remote_address"][0] == w2.public_ip  # B's NAT, not the service
    assert internet.forwarded_udp(w1, w2.public_ip) > before  # NAT to NAT, counted on A's NAT


@pytest.mark.standalone
def test_two_workers_behind_one_nat_end_on_their_lan(internet: NatTopology, services: dict) -> None:
    w1 = site(internet, 1)
    outcome = scenario(
        internet, services["plain"], (w1.workers[0], "l1"), (w1.workers[1], "l2"),
        "--wait-kind", "lan", "--wait", "10",
    )  # fmt: skip
    assert_carried(outcome, "lan")
    assert outcome["remote_address"][0] == w1.worker_ips[1]


@pytest.mark.standalone
@pytest.mark.parametrize(
    ("frm", "to"), [(2, 3), (3, 4)], ids=["cone-symmetric", "symmetric-symmetric"]
)
def test_a_symmetric_nat_gets_turn_when_the_service_hands_out_credentials(
    internet: NatTopology, services: dict, frm: int, to: int
) -> None:
    a, b = site(internet, frm), site(internet, to)
    outcome = scenario(
        internet, services["turn"], (a.worker, f"t{frm}"), (b.worker, f"t{to}"),
        "--wait-kind", "turn,direct,lan", "--wait", "10",
    )  # fmt: skip
    assert_carried(outcome, "turn")
    assert outcome["remote_address"][0] == SERVICE_IP  # coturn's relay address
    coturn = (internet.log_dir / f"coturn-{internet.prefix}.log").read_text()
    assert f"t{frm}" in coturn  # the worker's TURN username: <expiry>:<worker id>


@pytest.mark.standalone
@pytest.mark.parametrize(
    ("frm", "to"), [(2, 3), (3, 4)], ids=["cone-symmetric", "symmetric-symmetric"]
)
def test_a_symmetric_nat_without_turn_stays_on_the_service_relay(
    internet: NatTopology, services: dict, frm: int, to: int
) -> None:
    a, b = site(internet, frm), site(internet, to)
    outcome = scenario(
        internet, services["plain"], (a.worker, f"s{frm}"), (b.worker, f"s{to}"),
        "--wait-kind", "direct,lan,turn", "--wait", "12", "--stream", "2",
    )  # fmt: skip
    assert_carried(outcome, "relay")
    assert outcome["reached"] is False and outcome["kinds"] == ["relay"]
    assert outcome["stream"]["lost"] == 0, outcome["stream"]


@pytest.mark.standalone
def test_a_nat_that_drops_all_udp_is_reached_through_the_relay(
    internet: NatTopology, services: dict
) -> None:
    w5, w2 = site(internet, 5), site(internet, 2)
    internet.block_udp(w5)
    try:
        outcome = scenario(
            internet, services["turn"], (w5.worker, "u5"), (w2.worker, "u2"),
            "--wait-kind", "direct,lan,turn", "--wait", "12",
        )  # fmt: skip
    finally:
        internet.unblock_udp(w5)
    assert_carried(outcome, "relay")
    assert outcome["reached"] is False


@pytest.mark.standalone
def test_a_relayed_pair_moves_to_direct_when_the_firewall_opens_and_data_keeps_flowing(
    internet: NatTopology, services: dict
) -> None:
    w5, w2 = site(internet, 5), site(internet, 2)
    internet.block_udp(w5, to=w2.public_ip)  # only the path to the peer: STUN still works
    peer = answering(internet, w2.worker, services["plain"], "m2")
    log = (internet.log_dir / "m5.log").open("wb")
    try:
        mover = internet.popen(
            w5.worker,
            peer_agent(
                "connect", services["plain"], "m5", "--peer", "m2",
                "--stream", "25", "--rate", "40", "--wait-kind", "direct", "--wait", "40",
            ),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )  # fmt: skip
        wait_until(
            lambda: PeerConnection.objects.filter(path_kind="relay").exists(),
            timeout=30,
            what="the pair to come up on the relay",
        )
        time.sleep(4)  # a direct attempt has failed by now: the path stays relayed
        assert PeerConnection.objects.get().path_kind == "relay"
        internet.unblock_udp(w5, to=w2.public_ip)
        stdout, _ = mover.communicate(timeout=90)
    finally:
        log.close()
        peer.terminate()
        peer.wait(10)
    outcome = json.loads(stdout.strip().splitlines()[-1])
    print("upgrade:", outcome)
    assert_carried(outcome, "direct")
    assert outcome["reached"] is True and outcome["kinds"] == ["relay", "direct"]
    assert outcome["seconds_to"]["direct"] > 4
    stream = outcome["stream"]
    assert stream["sent_on"].get("relay", 0) > 100 and stream["sent_on"].get("direct", 0) > 100
    assert stream["lost"] == 0, stream  # nothing lost across the move
    record = PeerConnection.objects.get()
    assert (record.path_kind, record.path_changes) == ("direct", 2)


@pytest.mark.standalone
@pytest.mark.parametrize(
    ("service", "frm", "to", "kind"),
    [("plain", 1, 2, "direct"), ("turn", 2, 3, "turn"), ("plain", 3, 4, "relay")],
    ids=["direct", "turn", "service relay"],
)
def test_eight_megabytes_cross_real_nat_encrypted_on_each_kind_of_path(
    internet: NatTopology, services: dict, service: str, frm: int, to: int, kind: str
) -> None:
    """QUIC between pinned identities over each route: the digest of 8 MB matches."""
    a, b = site(internet, frm), site(internet, to)
    wait = [] if kind == "relay" else ["--wait-kind", kind]
    outcome = scenario(
        internet, services[service], (a.worker, f"q{frm}{kind[0]}"), (b.worker, f"q{to}{kind[0]}"),
        "--quic", str(8 * 1024 * 1024), *wait,
    )  # fmt: skip
    assert outcome["ok"] is True, outcome
    assert outcome["first_kind"] == "relay" and outcome["kind"] == kind
    assert outcome["datagram"] == "echo:dg"
    assert len(outcome["peer_fingerprint"]) == 64
