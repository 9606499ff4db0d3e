"""The command line across real NAT: two cone NATs in network namespaces (tests/support/netns.py),
the service, the STUN responder and coturn in the public one, an agent in each worker's
namespace as `rendezvous-worker` runs it, and each command run there. A forward and a send go
over the direct path they punch; netcheck sees the NAT, STUN, and TURN (allocatable once an
introduction lends its credentials).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli_agents import Agent, Lines
from tests.support.netns import (
    _PATH,
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    TURN_PORT,
    NatKind,
    NatTopology,
    nat_topology,
    require_netns,
)
from tests.support.public_service import serve_public

pytestmark = [pytest.mark.standalone, pytest.mark.django_db(transaction=True)]

TURN_SECRET = "cli-turn-secret-0123456789"
SERVICE_PORT = 8010
TCP_PORT = 7000  # the exposed TCP server, in the GPU box's namespace


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    require_netns()
    log_dir = tmp_path_factory.mktemp("cli-nat")
    with nat_topology(NatKind.MASQUERADE, NatKind.MASQUERADE, log_dir=log_dir) as topology:
        topology.start_stun()
        topology.start_turn(secret=TURN_SECRET)
        yield topology


@pytest.fixture
def pair(internet: NatTopology, transactional_db: None, tmp_path: Path) -> Iterator[tuple]:
    """The service (with STUN and TURN) and two agents, each behind its own NAT."""
    url, service = serve_public(
        internet,
        "svc",
        RENDEZVOUS_TURN_SERVERS=f"{SERVICE_IP}:{TURN_PORT}",
        RENDEZVOUS_TURN_SECRET=TURN_SECRET,
    )
    ip = shutil.which("ip", path=_PATH)
    w1, w2 = internet.sites[0], internet.sites[1]
    gpu = Agent(url, "gpu-1", tmp_path, prefix=[ip, "netns", "exec", w2.worker],
                RENDEZVOUS_EXPOSE=str(TCP_PORT)).start()  # fmt: skip
    laptop = Agent(url, "laptop-3", tmp_path, prefix=[ip, "netns", "exec", w1.worker]).start()
    try:
        yield internet, gpu, laptop
    finally:
        laptop.stop()
        gpu.stop()
        service.terminate()
        service.wait(10)


DIGEST_SERVER = str(Path(__file__).parent / "support" / "digest_server.py")

BULK_CLIENT = """
import os, socket, sys
payload = os.urandom(int(sys.argv[2]))
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
client.sendall(payload)
client.shutdown(socket.SHUT_WR)
reply = b"".join(iter(lambda: client.recv(1 << 16), b"")).decode()
import hashlib
print("intact" if reply == hashlib.sha256(payload).hexdigest() else "damaged", flush=True)
"""


def test_a_forward_across_two_nats_runs_over_their_direct_path(pair) -> None:
    internet, _, laptop = pair
    w1, w2 = internet.sites[0], internet.sites[1]
    server = internet.popen(
        w2.worker, [sys.executable, DIGEST_SERVER, str(TCP_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    Lines(server.stdout).until("listening")
    pings = laptop.command("ping", "gpu-1", "--until-direct", "--interval", "0.5").stdout
    assert f"via direct {w2.public_ip}:" in pings.strip().splitlines()[-1], pings
    with laptop.running("forward", "9000", f"gpu-1:{TCP_PORT}") as forward:
        Lines(forward.stdout).until("forwarding 127.0.0.1:9000")
        moved = internet.run(
            w1.worker, [sys.executable, "-c", BULK_CLIENT, "9000", str(8 * 1024 * 1024)]
        )
        assert moved.stdout.strip() == "intact"
    [connection] = laptop.status()["connections"]
    assert connection["kind"] == "direct" and connection["remote_address"][0] == w2.public_ip
    assert connection["bytes_sent"] > 8 * 1024 * 1024


def test_a_file_sent_across_two_nats_arrives_checked_over_the_direct_path(
    pair, tmp_path: Path
) -> None:
    _, gpu, laptop = pair
    data, inbox = tmp_path / "dataset.bin", tmp_path / "inbox"
    data.write_bytes(os.urandom(24 * 1024 * 1024))
    inbox.mkdir()
    laptop.command("ping", "gpu-1", "--until-direct", "--interval", "0.5")
    with gpu.running("receive", "--dir", str(inbox)) as receiving:
        Lines(receiving.stdout).until("waiting for files")
        sent = laptop.command("send", "gpu-1", str(data)).stdout
        assert receiving.wait(60) == 0
    assert "sent 1 file (24.0 MiB; 24.0 MiB over the wire) to gpu-1" in sent
    assert (
        hashlib.sha256((inbox / "dataset.bin").read_bytes()).digest()
        == hashlib.sha256(data.read_bytes()).digest()
    )
    assert laptop.status()["connections"][0]["kind"] == "direct"


def test_netcheck_behind_a_cone_nat_sees_stun_and_turn(pair) -> None:
    internet, _, laptop = pair
    w1 = internet.sites[0]
    report = json.loads(laptop.command("netcheck", "--json").stdout)["report"]
    assert report["udp"] is True and report["mapping"] == "endpoint-independent"
    assert report["public_endpoint"].startswith(f"{w1.public_ip}:")
    assert [s["server"] for s in report["stun"]] == [
        f"{SERVICE_IP}:{STUN_PORT}",
        f"{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}",
    ]
    assert all(s["ms"] is not None for s in report["stun"])
    [turn] = report["turn"]
    assert turn["reachable"] and turn["allocated"] is None  # no credentials without a peer
    assert report["service_rtt_ms"] is not None and report["relay"] is True
    expect = {e["kind"]: e["expected"] for e in report["expect"]}
    assert expect == {"lan": "yes", "direct": "yes", "turn": "likely", "relay": "yes"}
    with_peer = json.loads(laptop.command("netcheck", "--json", "--peer", "gpu-1").stdout)
    [turn] = with_peer["report"]["turn"]
    assert turn["allocated"] is True and turn["relayed"].startswith(f"{SERVICE_IP}:")
    text = laptop.command("netcheck").stdout
    assert "NAT mapping  endpoint-independent" in text and "turn: yes" in text
