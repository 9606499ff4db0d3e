"""More direct paths, across real NAT in network namespaces (tests/support/netns.py): a
symmetric NAT behind a router running Debian's miniupnpd (NAT-PMP, PCP, UPnP IGD) facing another
symmetric NAT ends direct through the port mapping; two workers with global IPv6 behind
symmetric IPv4 NATs (and stateful IPv6 firewalls) end direct over IPv6, reported as `direct`, not
`lan`; a gateway that answers port-mapping requests with garbage, or maps without forwarding,
leaves the pair on what works. Real daphne, real agents, real miniupnpd; the hostile gateway is
a small fake UDP server of the test's own, on the router."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.models import PeerConnection, Worker
from tests.support.backing import require_or_skip
from tests.support.netns import (
    NatKind,
    NatTopology,
    miniupnpd_unavailable_reason,
    nat_topology,
    require_netns,
)
from tests.support.processes import wait_until
from tests.support.public_service import serve_public

SERVICE_PORT = 8010
MAPPING_ON = {"RENDEZVOUS_PORT_MAPPING": "on"}


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """Site 1: symmetric NAT behind miniupnpd; sites 2 and 3: symmetric NATs without port
    mapping (3 gets a hostile gateway in its tests); site 4: a port-restricted cone; IPv4 only."""
    require_netns()
    reason = miniupnpd_unavailable_reason()
    require_or_skip(reason is None, reason or "")
    log_dir = tmp_path_factory.mktemp("direct")
    kinds = [NatKind.MINIUPNPD, NatKind.RANDOM_FULLY, NatKind.RANDOM_FULLY, NatKind.MASQUERADE]
    with nat_topology(*kinds, log_dir=log_dir) as topology:
        topology.start_stun()
        topology.start_miniupnpd(topology.sites[0])
        yield topology


@pytest.fixture(scope="module")
def ipv6_routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatTopology]:
    """Two symmetric IPv4 NATs whose routers also route global IPv6 (2001:db8:N::/64) behind
    stateful firewalls."""
    require_netns()
    log_dir = tmp_path_factory.mktemp("direct6")
    kinds = [NatKind.RANDOM_FULLY, NatKind.RANDOM_FULLY]
    with nat_topology(*kinds, log_dir=log_dir, ipv6=True) as topology:
        topology.start_stun()
        yield topology


@pytest.fixture
def service(
    request: pytest.FixtureRequest, transactional_db: None
) -> Iterator[tuple[NatTopology, str]]:
    name, _, option = str(request.param).partition("+")
    net: NatTopology = request.getfixturevalue(name)
    process_count = len(net.processes)
    extra = {"RENDEZVOUS_HARD_NAT_PROBING": "on"} if option == "probing" else {}
    url, _ = serve_public(net, f"service-{request.node.name[:40]}", **extra)
    yield net, url
    server = net.processes.pop(process_count)
    server.terminate()
    server.wait(10)


def agent_env(net: NatTopology, **extra: str) -> dict[str, str]:
    from tests.support import netns

    return {**netns._ENV, "PYTHONUNBUFFERED": "1", **extra}


def pair(
    net: NatTopology, url: str, frm: tuple[str, str], to: tuple[str, str], *args: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`frm` connects to `to` (namespace, worker id), which answers; the connecting side's
    outcome (tests/support/peer_agent.py)."""
    environment = agent_env(net, **(env or {}))
    argv = [sys.executable, "-m", "tests.support.peer_agent"]
    answering = net.popen(
        to[0], [*argv, "answer", "--url", url, "--id", to[1]], env=environment,
        log_name=f"{to[1]}.log",
    )  # fmt: skip
    try:
        wait_until(
            lambda: Worker.objects.filter(id=to[1], status="connected").exists(),
            timeout=30,
            what=f"{to[1]} to register",
        )
        connecting = net.popen(
            frm[0], [*argv, "connect", "--url", url, "--id", frm[1], "--peer", to[1], *args],
            env=environment, stdout=subprocess.PIPE,
            stderr=(net.log_dir / f"{frm[1]}.log").open("ab"), text=True,
        )  # fmt: skip
        stdout, _ = connecting.communicate(timeout=120)
    finally:
        answering.terminate()
        answering.wait(10)
    outcome = json.loads(stdout.strip().splitlines()[-1])
    print(f"{frm[1]} -> {to[1]}:", outcome)
    return outcome


def log_of(net: NatTopology, worker_id: str) -> str:
    return Path(net.log_dir / f"{worker_id}.log").read_text(errors="replace")


@pytest.mark.standalone
@pytest.mark.parametrize("service", ["routers"], indirect=True)
def test_a_symmetric_nat_behind_miniupnpd_gets_a_direct_path_to_another_symmetric_nat(
    service: tuple[NatTopology, str],
) -> None:
    net, url = service
    upnp, symmetric = net.sites[0], net.sites[1]
    outcome = pair(
        net, url, (symmetric.worker, "sym2"), (upnp.worker, "upnp1"),
        "--wait-kind", "direct", "--wait", "10", "--stream", "1", env=MAPPING_ON,
    )  # fmt: skip
    assert outcome["ok"] and outcome["first_kind"] == "relay", outcome
    assert outcome["kind"] == "direct", outcome
    assert outcome["remote_address"][0] == upnp.public_ip  # the mapped address on the router
    assert outcome["seconds_to"]["direct"] < 3.0, outcome  # the relay carried it until then
    assert outcome["stream"]["lost"] == 0
    assert "port mapping: nat-pmp mapped" in log_of(net, "upnp1")
    assert PeerConnection.objects.get().path_kind == "direct"
    # its NAT report told the service: symmetric, and what the router maps (admin, API)
    worker = Worker.objects.get(id="upnp1")
    assert (worker.nat_mapping, worker.port_mapping_protocol) == ("endpoint-dependent", "nat-pmp")
    assert worker.port_mapping_ip == upnp.public_ip
    # the mapping was deleted when the answering agent's attempt ended (it was terminated)
    wait_until(
        lambda: "DNAT" not in net.run(upnp.nat, ["iptables-legacy", "-t", "nat", "-S",
                                                 "MINIUPNPD"]).stdout,
        timeout=10, what="the mapping to be deleted",
    )  # fmt: skip


@pytest.mark.standalone
@pytest.mark.parametrize("service", ["routers"], indirect=True)
def test_without_port_mapping_the_same_pair_stays_on_the_relay(
    service: tuple[NatTopology, str],
) -> None:
    """RENDEZVOUS_PORT_MAPPING=off: today's behaviour, and proof that the mapping made it."""
    net, url = service
    upnp, symmetric = net.sites[0], net.sites[1]
    outcome = pair(
        net, url, (symmetric.worker, "sym2off"), (upnp.worker, "upnp1off"),
        "--wait-kind", "direct,lan", "--wait", "5", env={"RENDEZVOUS_PORT_MAPPING": "off"},
    )  # fmt: skip
    assert outcome["ok"] and outcome["kind"] == "relay", outcome
    assert "port mapping:" not in log_of(net, "upnp1off")  # the mapper's lines: it sent nothing


@pytest.mark.standalone
@pytest.mark.parametrize("service", ["ipv6_routers"], indirect=True)
def test_two_symmetric_nats_with_global_ipv6_end_direct_over_ipv6_reported_as_direct(
    service: tuple[NatTopology, str],
) -> None:
    net, url = service
    a, b = net.sites
    outcome = pair(
        net, url, (a.worker, "six1"), (b.worker, "six2"),
        "--wait-kind", "direct,lan", "--wait", "10", "--stream", "1",
    )  # fmt: skip
    assert outcome["ok"] and outcome["kind"] == "direct", outcome
    assert outcome["remote_address"][0] == b.worker_ip6s[0]  # host to host, over IPv6
    assert outcome["seconds_to"]["direct"] < 3.0, outcome
    assert outcome["stream"]["lost"] == 0
    record = PeerConnection.objects.get()
    assert record.path_kind == "direct"


HOSTILE_GATEWAY = r"""
import os, socket, struct, sys
mode = sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 5351))
print("listening", flush=True)
while True:
    data, addr = sock.recvfrom(2048)
    if mode == "garbage":
        sock.sendto(os.urandom(16), addr)
    elif data[:2] == b"\x00\x00":
        sock.sendto(b"\x00\x80\x00\x00\x00\x00\x00\x01" + socket.inet_aton(sys.argv[3]), addr)
    elif data[:2] == b"\x00\x01":  # maps, and forwards nothing: a gateway that forgets
        internal, lifetime = struct.unpack("!H2xI", data[4:12])
        sock.sendto(struct.pack("!BBHIHHI", 0, 129, 0, 1, internal, 40999, lifetime), addr)
"""


@pytest.mark.standalone
@pytest.mark.parametrize("mode", ["garbage", "forgets"])
@pytest.mark.parametrize("service", ["routers"], indirect=True)
def test_a_hostile_gateway_leaves_the_pair_on_what_works(
    service: tuple[NatTopology, str], mode: str
) -> None:
    """Site 3's router answers NAT-PMP with garbage, or maps a port it never forwards: the
    candidate is dropped (or never works) and logged, and the pair carries on over the relay
    with nothing lost."""
    net, url = service
    hostile, symmetric = net.sites[2], net.sites[1]
    script = net.log_dir / "hostile_gateway.py"
    script.write_text(HOSTILE_GATEWAY)
    gateway = net.popen(
        hostile.nat, [sys.executable, str(script), hostile.gateway_ip, mode, hostile.public_ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert gateway.stdout is not None and gateway.stdout.readline().startswith("listening")
    try:
        outcome = pair(
            net, url, (hostile.worker, f"host{mode}"), (symmetric.worker, f"peer{mode}"),
            "--wait-kind", "direct,lan", "--wait", "4", "--stream", "1", env=MAPPING_ON,
        )  # fmt: skip
    finally:
        gateway.terminate()
        gateway.wait(10)
    assert outcome["ok"] and outcome["kind"] == "relay", outcome
    assert outcome["stream"]["lost"] == 0
    log = log_of(net, f"host{mode}")
    if mode == "garbage":
        assert "speaks none of NAT-PMP, PCP, UPnP IGD" in log and "not a NAT-PMP answer" in log
    else:
        assert f"mapped {hostile.worker_ip}:" in log and f"{hostile.public_ip}:40999" in log


@pytest.mark.standalone
@pytest.mark.parametrize("service", ["routers+probing"], indirect=True)
def test_hard_nat_probing_between_symmetric_and_port_restricted_is_bounded_and_ends_on_what_works(
    service: tuple[NatTopology, str],
) -> None:
    """RENDEZVOUS_HARD_NAT_PROBING=on: the service tells the symmetric side (hard) and the
    port-restricted one (easy) to probe. About two attempts in three hit (bench/nat_matrix.py
    measures it); either way within three seconds and at most 256 sockets and 512 probes, and
    the path is then direct to the hard NAT's address, or stays on the relay, nothing lost."""
    net, url = service
    symmetric, cone = net.sites[1], net.sites[3]
    outcome = pair(
        net, url, (cone.worker, "easy4"), (symmetric.worker, "hard2"),
        "--wait-kind", "direct", "--wait", "5", "--stream", "1", "--wait-nat",
    )  # fmt: skip
    assert outcome["ok"] and outcome["stream"]["lost"] == 0, outcome
    easy, hard = log_of(net, "easy4"), log_of(net, "hard2")
    assert "hard-NAT probing (easy side)" in easy and "hard-NAT probing (hard side)" in hard
    if outcome["kind"] == "direct":
        assert outcome["remote_address"][0] == symmetric.public_ip
        assert outcome["seconds_to"]["direct"] < 3.0, outcome
        assert "(easy side) hit" in easy and "(hard side) hit" in hard
    else:
        assert outcome["kind"] == "relay", outcome
        assert "(easy side) found nothing after 512 datagrams" in easy, easy[-2000:]


@pytest.mark.standalone
@pytest.mark.parametrize("service", ["routers"], indirect=True)
def test_without_hard_nat_probing_the_service_asks_for_none(
    service: tuple[NatTopology, str],
) -> None:
    """Off by default: the same pair gets no `hard_nat` part, sends no probe, stays relayed."""
    net, url = service
    symmetric, cone = net.sites[1], net.sites[3]
    outcome = pair(
        net, url, (cone.worker, "easy4off"), (symmetric.worker, "hard2off"),
        "--wait-kind", "direct", "--wait", "4", "--wait-nat",
    )  # fmt: skip
    assert outcome["ok"] and outcome["kind"] == "relay", outcome
    assert "hard-NAT probing" not in log_of(net, "easy4off") + log_of(net, "hard2off")
