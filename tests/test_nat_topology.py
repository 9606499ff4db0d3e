"""The real-NAT harness proves itself: STUN seen from behind MASQUERADE, and behind a symmetric
NAT, in network namespaces built and torn down by `tests/support/netns.py`.

Needs root, `ip netns` and iptables (tools/install_system_packages.sh); skips with the reason
elsewhere, and fails instead under RENDEZVOUS_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import (
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    NatKind,
    NatTopology,
    Site,
    list_namespaces,
    nat_topology,
    require_netns,
)
from tests.support.processes import wait_until

pytestmark = pytest.mark.standalone

STUN_SERVERS = [f"{SERVICE_IP}:{STUN_PORT}", f"{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"]


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """One cone NAT and one symmetric NAT, a worker behind each, the STUN responder public."""
    require_netns()
    log_dir = tmp_path_factory.mktemp("netns")
    with nat_topology(NatKind.MASQUERADE, NatKind.RANDOM_FULLY, log_dir=log_dir) as topology:
        topology.start_stun()
        yield topology


def netcheck(topology: NatTopology, site: Site, *, bind: str = "0.0.0.0:0") -> dict[str, Any]:
    """The agent's STUN client, run from the worker's namespace, as JSON."""
    result = topology.run(
        site.worker,
        [sys.executable, "-m", "worker_agent.paths.netcheck", *STUN_SERVERS, "--bind", bind],
    )
    return json.loads(result.stdout)


def test_a_worker_behind_masquerade_is_seen_at_its_nats_public_address(
    network: NatTopology,
) -> None:
    site = network.sites[0]
    report = netcheck(network, site, bind=f"{site.worker_ip}:40001")
    assert report["mapped"] == f"{site.public_ip}:40001"  # MASQUERADE kept the port
    assert report["mapping"] == "endpoint-independent"
    assert [r["mapped"] for r in report["results"]] == [report["mapped"]] * 2


def test_a_worker_behind_random_fully_gets_a_new_mapping_per_destination(
    network: NatTopology,
) -> None:
    site = network.sites[1]
    report = netcheck(network, site)
    assert report["mapping"] == "endpoint-dependent"
    mapped = [r["mapped"] for r in report["results"]]
    assert all(m.startswith(f"{site.public_ip}:") for m in mapped)
    assert mapped[0] != mapped[1]


def test_each_nat_drops_unsolicited_inbound_packets_on_its_public_side(
    network: NatTopology,
) -> None:
    site = network.sites[0]
    before = network.input_drop_packets(site)
    network.run(
        network.public,
        [
            sys.executable,
            "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto(b'unsolicited', ('{site.public_ip}', 40002))",
        ],
    )
    assert network.input_drop_packets(site) == before + 1


def test_teardown_stops_processes_and_deletes_namespaces_even_when_the_body_fails(
    tmp_path: Path,
) -> None:
    require_netns()
    with (
        pytest.raises(RuntimeError, match="the test body failed"),
        nat_topology(NatKind.MASQUERADE, log_dir=tmp_path) as topology,
    ):
        sleeper = topology.popen(topology.sites[0].worker, ["sleep", "60"])
        cmdline = Path(f"/proc/{sleeper.pid}/cmdline")
        # `ip netns exec` execs in place: the process we hold is the sleep itself.
        wait_until(lambda: cmdline.read_bytes() == b"sleep\x0060\x00", timeout=5, what="exec")
        raise RuntimeError("the test body failed")
    assert sleeper.poll() is not None
    assert not [name for name in list_namespaces() if name.startswith(topology.prefix)]


def test_two_topologies_side_by_side_get_distinct_namespaces(tmp_path: Path) -> None:
    require_netns()
    with nat_topology(log_dir=tmp_path) as first, nat_topology(log_dir=tmp_path) as second:
        assert first.prefix != second.prefix
        assert not set(first.created) & set(second.created)
        assert len(first.prefix) + len("pub") < 16  # short enough for any interface name too
