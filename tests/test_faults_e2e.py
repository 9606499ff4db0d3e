"""Peer connections under faults, across real NAT (network namespaces, tests/support/netns.py):
a NAT that moves a worker's public port mid-transfer. The connection notices within about a
second, carries on over the service relay, and goes back to a freshly punched direct path; the
bytes arrive whole.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from registry.models import PeerConnection
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
from tests.test_paths_e2e import answering, peer_agent

SERVICE_PORT = 8000

pytestmark = pytest.mark.standalone


@pytest.fixture(scope="module")
def cones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """Two cone NATs (w1, w2) and the STUN responder in public."""
    require_netns()
    log_dir = tmp_path_factory.mktemp("faults")
    with nat_topology(NatKind.MASQUERADE, NatKind.MASQUERADE, log_dir=log_dir) as topology:
        topology.start_stun()
        yield topology


@pytest.fixture
def service(cones: NatTopology, transactional_db: None) -> Iterator[str]:
    """daphne in the public namespace, on this test's database, naming the STUN servers."""
    from tests.support.databases import current_database_url

    probe = ServerProcess(log_dir=cones.log_dir, database_url=current_database_url())
    env = {
        **probe.env,
        "HOST": SERVICE_IP,
        "PORT": str(SERVICE_PORT),
        "ALLOWED_HOSTS": SERVICE_IP,
        "RENDEZVOUS_STUN_SERVERS": (
            f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
        ),
    }
    log_name = f"service-{time.monotonic_ns()}.log"
    process = cones.python(cones.public, "manage.py", "serve", env=env, log_name=log_name)
    wait_until(
        lambda: "Listening on TCP address" in (cones.log_dir / log_name).read_text(),
        timeout=30,
        what="the service",
    )
    yield f"http://{SERVICE_IP}:{SERVICE_PORT}"
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("moved", ["connecting", "answering"])
def test_a_nat_rebinding_mid_transfer_is_survived_and_the_path_returns_to_direct(
    cones: NatTopology, service: str, moved: str
) -> None:
    """12 MB at 2 MB/s over a direct path; 1.5 s in, one side's NAT gives every UDP flow a new
    public port (its old mappings gone, as after a NAT reboot). Before: ICE held the dead pair
    for its 30 s of consent checks and QUIC died of its idle timeout."""
    w1, w2 = cones.sites
    suffix = moved[0]
    peer = answering(cones, w2.worker, service, f"r2{suffix}")
    log = (cones.log_dir / f"r1{suffix}.log").open("wb")
    try:
        sender = cones.popen(
            w1.worker,
            peer_agent(
                "connect", service, f"r1{suffix}", "--peer", f"r2{suffix}",
                "--quic", str(12_000_000), "--pace", "2", "--wait-kind", "direct",
            ),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )  # fmt: skip
        wait_until(
            lambda: PeerConnection.objects.filter(path_kind="direct").exists(),
            timeout=30,
            what="the pair to come up direct",
        )
        time.sleep(1.5)
        moved_at = time.monotonic()
        site = w1 if moved == "connecting" else w2
        assert cones.rebind_udp(site, "61000-61099") >= 1
        stdout, _ = sender.communicate(timeout=120)
    finally:
        log.close()
        peer.terminate()
        peer.wait(10)
    outcome: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    print(f"rebinding at the {moved} side, {time.monotonic() - moved_at:.1f}s ago:", outcome)
    assert outcome["ok"] is True, outcome  # every byte, in order: the digests match
    assert outcome["longest_gap"] < 5.0, outcome  # the stall the receiver saw
    kinds = outcome["kinds"]
    assert kinds[:2] == ["relay", "direct"] and kinds[-1] == "direct", kinds
    assert "relay" in kinds[2:], kinds  # off the dead pair, onto the relay, then direct again
    record = PeerConnection.objects.get()
    assert record.path_kind == "direct" and record.path_changes >= 4
