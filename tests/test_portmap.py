"""Port mapping: NAT-PMP (RFC 6886) and PCP (RFC 6887) messages against the RFCs' figures, and
the agent's mapper against small fake gateways of the test's own on loopback (answering,
refusing, answering garbage, mapping another port, forgetting). A real router (miniupnpd) is
tests/test_direct_e2e.py's."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from worker_agent.paths.portmap import exchange, manager, natpmp, pcp
from worker_agent.paths.portmap.exchange import PortMapError

pytestmark = pytest.mark.standalone

# ---- NAT-PMP, RFC 6886 ---------------------------------------------------------------------------


def test_natpmp_external_address_request_is_the_two_bytes_of_section_3_2() -> None:
    assert natpmp.external_address_request() == bytes([0, 0])  # Vers = 0, OP = 0


def test_natpmp_map_request_is_the_figure_of_section_3_3() -> None:
    """Vers 0, OP 1 (UDP), Reserved 0, Internal Port, Suggested External Port, Lifetime."""
    request = natpmp.map_request(internal_port=51820, suggested_external_port=51820, lifetime=7200)
    assert request == bytes.fromhex("00010000ca6cca6c00001c20")
    assert len(request) == 12


def test_natpmp_deleting_a_mapping_asks_for_lifetime_and_port_zero_section_3_4() -> None:
    assert natpmp.map_request(51820, 0, 0) == bytes.fromhex("00010000ca6c000000000000")


def test_natpmp_external_address_response_parses_as_section_3_2_lays_it_out() -> None:
    """Vers 0, OP 128, Result 0, Seconds Since Start of Epoch, External IPv4 Address."""
    answer = bytes.fromhex("0080000000000e10") + ipaddress.IPv4Address("198.51.100.1").packed
    parsed = natpmp.parse_external_address(answer)
    assert (parsed.epoch, parsed.address) == (3600, "198.51.100.1")


def test_natpmp_map_response_parses_as_section_3_3_lays_it_out() -> None:
    """Vers 0, OP 129, Result, Epoch, Internal Port, Mapped External Port, Lifetime."""
    answer = bytes.fromhex("0081000000000e10ca6cd43100000e10")
    parsed = natpmp.parse_map_response(answer)
    assert (parsed.internal_port, parsed.external_port, parsed.lifetime) == (51820, 54321, 3600)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (bytes.fromhex("0081000200000001ca6c000000000000"), "NOT_AUTHORIZED"),
        (bytes.fromhex("0081000400000001ca6c000000000000"), "OUT_OF_RESOURCES"),
        (bytes.fromhex("0080000000000001c6336401"), "opcode 0, not 1"),
        (bytes.fromhex("02810000"), "version 2"),
        (bytes.fromhex("008100000000"), "bytes, not 16"),
        (b"\x00", "1 bytes"),
    ],
    ids=["refused", "out of resources", "other opcode", "pcp", "short", "garbage"],
)
def test_natpmp_answers_that_are_not_a_mapping_say_why(answer: bytes, says: str) -> None:
    with pytest.raises(PortMapError, match=says):
        natpmp.parse_map_response(answer)


def test_natpmp_an_external_address_of_zero_means_none_yet_section_3_2() -> None:
    with pytest.raises(PortMapError, match="no external address"):
        natpmp.parse_external_address(bytes.fromhex("008000000000000100000000"))


def test_natpmp_epoch_tells_a_rebooted_gateway_section_3_6() -> None:
    seen = (1000, 100.0)  # epoch 1000 when our clock said 100
    assert not natpmp.rebooted(seen, 1060, 160.0)  # a minute later, a minute more
    assert natpmp.rebooted(seen, 5, 160.0)  # it started again
    assert natpmp.rebooted(seen, 1010, 160.0)  # grew much less than our clock


# ---- PCP, RFC 6887 -------------------------------------------------------------------------------

NONCE = bytes(range(1, 13))


def test_pcp_map_request_is_the_figures_of_sections_7_1_and_11_1() -> None:
    request = pcp.map_request(
        client="192.168.1.2", nonce=NONCE, internal_port=51820, lifetime=7200,
        suggested_port=51820,
    )  # fmt: skip
    header = (
        bytes([2, 1]) + b"\x00\x00"  # Version 2, R=0 Opcode MAP, Reserved
        + struct.pack("!I", 7200)  # Requested Lifetime
        + bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])  # client address, IPv4-mapped
    )  # fmt: skip
    data = (
        NONCE + bytes([17]) + bytes(3)  # Mapping Nonce, Protocol UDP, Reserved
        + struct.pack("!HH", 51820, 51820)  # Internal Port, Suggested External Port
        + bytes(10) + b"\xff\xff" + bytes(4)  # Suggested External Address 0.0.0.0, mapped
    )  # fmt: skip
    assert request == header + data
    assert len(request) == 60


def test_pcp_announce_is_a_bare_header_with_lifetime_zero_section_14_1() -> None:
    announce = pcp.announce_request("10.0.0.2")
    assert announce[:8] == bytes([2, 0, 0, 0, 0, 0, 0, 0]) and len(announce) == 24


def pcp_map_answer(
    *, result: int = 0, nonce: bytes = NONCE, internal: int = 51820, external: int = 61000,
    address: str = "198.51.100.1", lifetime: int = 7200, opcode: int = 0x81, protocol: int = 17,
) -> bytes:  # fmt: skip
    """Section 7.2's header (R=1) and section 11.1's MAP data, field by field."""
    header = bytes([2, opcode, 0, result]) + struct.pack("!II", lifetime, 99) + bytes(12)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}").packed
    return (
        header
        + nonce
        + bytes([protocol, 0, 0, 0])
        + struct.pack("!HH", internal, external)
        + mapped
    )


def test_pcp_map_response_parses_as_sections_7_2_and_11_1_lay_it_out() -> None:
    parsed = pcp.parse_map_response(pcp_map_answer())
    assert (parsed.nonce, parsed.internal_port, parsed.external_port) == (NONCE, 51820, 61000)
    assert (parsed.external_address, parsed.lifetime, parsed.epoch) == ("198.51.100.1", 7200, 99)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (pcp_map_answer(result=2), "NOT_AUTHORIZED"),
        (pcp_map_answer(result=8), "NO_RESOURCES"),
        (pcp_map_answer(opcode=0x80), "opcode 0, not 1"),
        (pcp_map_answer(protocol=6), "protocol 6"),
        (bytes.fromhex("0081000100000000"), "speaks NAT-PMP"),  # Appendix A
        (pcp_map_answer()[:-3], "bytes"),
        (os.urandom(3), "bytes"),
    ],
    ids=["refused", "no resources", "announce", "tcp", "nat-pmp server", "ragged", "garbage"],
)
def test_pcp_answers_that_are_not_a_mapping_say_why(answer: bytes, says: str) -> None:
    with pytest.raises(PortMapError, match=says):
        pcp.parse_map_response(answer)


# ---- the mapper against fake gateways on loopback -----------------------------------------------

Handler = Callable[[bytes], bytes | None]


class FakeGateway(asyncio.DatagramProtocol):
    """A port-mapping server of the test's own: `handle` turns each request into the answer."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.requests: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.requests.append(data)
        answer = self.handle(data)
        if answer is not None:
            self.transport.sendto(answer, addr)


def natpmp_gateway(*, external_port: Callable[[int], int] = lambda p: p, internal_offset: int = 0,
                   epoch: list[int] | None = None) -> Handler:  # fmt: skip
    """A NAT-PMP server that maps as asked (or as told); PCP requests get Appendix A's answer."""
    epochs = epoch if epoch is not None else [1000]

    def handle(data: bytes) -> bytes | None:
        if data[0] == 2:
            return bytes([0, 128 + data[1], 0, 1]) + struct.pack("!I", epochs[0])
        if data[1] == 0:
            return bytes.fromhex("00800000") + struct.pack("!I", epochs[0]) + bytes([127, 0, 0, 9])
        _, _, _, internal, _, lifetime = struct.unpack("!BBHHHI", data)
        port = external_port(internal) if lifetime else 0
        return struct.pack("!BBHIHHI", 0, 129, 0, epochs[0], internal + internal_offset, port,
                           lifetime)  # fmt: skip

    return handle


@contextlib.asynccontextmanager
async def fake_gateway(
    handle: Handler, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeGateway]:
    """On 127.0.0.2: the port the mapper sends to is patched to this server's."""
    loop = asyncio.get_running_loop()
    transport, gateway = await loop.create_datagram_endpoint(
        lambda: FakeGateway(handle), local_addr=("127.0.0.2", 0)
    )
    monkeypatch.setattr(exchange, "SERVER_PORT", transport.get_extra_info("sockname")[1])
    try:
        yield gateway
    finally:
        transport.close()


def mapper_on_loopback(monkeypatch: pytest.MonkeyPatch) -> manager.PortMapper:
    monkeypatch.setattr(manager, "PROBE_TIMEOUT", 0.3)
    monkeypatch.setattr(manager, "MAP_TIMEOUT", 0.3)
    monkeypatch.setattr(manager, "source_address", lambda gateway: "127.0.0.1")
    return manager.PortMapper(gateway="127.0.0.2")


def test_a_gateway_that_speaks_natpmp_maps_the_port_and_deletes_it_on_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with fake_gateway(natpmp_gateway(), monkeypatch) as gateway:
            mapper = mapper_on_loopback(monkeypatch)
            assert await mapper.probe() == "nat-pmp"
            mapping = await mapper.map("127.0.0.1", 40123)
            assert mapping is not None and mapping.external == ("127.0.0.9", 40123)
            assert mapper.snapshot()["mapped"] == "127.0.0.9:40123"  # type: ignore[index]
            await mapper.close()
            assert gateway.requests[-1] == natpmp.map_request(40123, 0, 0)  # deleted
            assert mapper.mappings == {}

    asyncio.run(scenario())


def test_a_mapping_is_renewed_at_half_its_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        monkeypatch.setattr(manager, "LIFETIME", 2)
        async with fake_gateway(natpmp_gateway(), monkeypatch) as gateway:
            mapper = mapper_on_loopback(monkeypatch)
            mapping = await mapper.map("127.0.0.1", 40124)
            assert mapping is not None
            made = len(gateway.requests)
            await asyncio.sleep(0.7)
            assert len(gateway.requests) == made  # not before half the lifetime
            await asyncio.sleep(0.6)
            assert gateway.requests[made:] == [natpmp.map_request(40124, 40124, 2)]
            await mapper.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("handle", "logged"),
    [
        (lambda data: os.urandom(16), "no answer"),
        (lambda data: None, "no answer"),
        (natpmp_gateway(internal_offset=1), "mapped internal port 40126, not 40125"),
    ],
    ids=["garbage", "silence", "another internal port"],
)
def test_a_hostile_gateway_gives_no_mapping_and_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, handle: Handler, logged: str
) -> None:
    async def scenario() -> None:
        async with fake_gateway(handle, monkeypatch):
            mapper = mapper_on_loopback(monkeypatch)
            mapper.client = natpmp.NatPmpClient("127.0.0.2", source="127.0.0.1")  # as if probed
            mapper.gateway, mapper.local, mapper.external_ip = "127.0.0.2", "127.0.0.1", "127.0.0.9"
            mapper.probed_at = 1.0
            monkeypatch.setattr(mapper, "_changed", lambda: False)
            assert await mapper.map("127.0.0.1", 40125) is None
            assert mapper.mappings == {}

    with caplog.at_level(logging.WARNING, logger="worker_agent.portmap"):
        asyncio.run(scenario())
    assert logged in caplog.text and "did not map 127.0.0.1:40125" in caplog.text


def test_a_gateway_that_forgets_the_mapping_loses_it_at_renewal_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that restarted (its epoch begins again) and now maps another external port:
    the mapping is dropped, with a warning; the candidate announced with it stops working and
    the path moves on (paths/liveness.py)."""
    epoch = [1000]
    ports = {40127: 40127}

    async def scenario() -> None:
        monkeypatch.setattr(manager, "LIFETIME", 2)
        async with fake_gateway(natpmp_gateway(external_port=ports.__getitem__, epoch=epoch),
                                monkeypatch):  # fmt: skip
            mapper = mapper_on_loopback(monkeypatch)
            assert await mapper.map("127.0.0.1", 40127) is not None
            epoch[0], ports[40127] = 3, 50000  # rebooted, and the port went to someone else
            for _ in range(40):
                await asyncio.sleep(0.1)
                if not mapper.mappings:
                    break
            assert mapper.mappings == {}
            await mapper.close()

    with caplog.at_level(logging.WARNING, logger="worker_agent.portmap"):
        asyncio.run(scenario())
    assert "forgot 127.0.0.9:40127" in caplog.text


def test_with_port_mapping_off_the_mapper_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with fake_gateway(natpmp_gateway(), monkeypatch) as gateway:
            mapper = manager.PortMapper(enabled=False, gateway="127.0.0.2")
            assert await mapper.probe() is None
            assert await mapper.map("127.0.0.1", 40128) is None
            assert gateway.requests == [] and mapper.snapshot() is None

    asyncio.run(scenario())


def test_the_environment_turns_port_mapping_off() -> None:
    from worker_agent.paths.portmap.holder import enabled_by_environment

    assert enabled_by_environment({})
    assert enabled_by_environment({"RENDEZVOUS_PORT_MAPPING": "on"})
    for off in ("off", "OFF", "0", "false", "no"):
        assert not enabled_by_environment({"RENDEZVOUS_PORT_MAPPING": off})
