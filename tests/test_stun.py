"""STUN: the responder's codec against RFC 5769's test vectors, the drop counters, the real
responder on loopback answered by the agent's client (aioice's STUN, in
worker_agent/paths/netcheck.py), and `manage.py runstun`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aioice import stun as aioice_stun
from django.core.management import CommandError, call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.peering.stun import messages as stun
from registry.peering.stun import responder as server
from registry.peering.stun.messages import Attribute, DropReason, StunClass
from registry.peering.stun.responder import StunStats
from tests.support.processes import REPO, wait_until
from tests.support.stun_responder import running_responder
from worker_agent import wire
from worker_agent.paths.netcheck import classify_nat
from worker_agent.wire import NatMapping

pytestmark = pytest.mark.standalone

# RFC 5769 section 2: the sample messages, byte for byte.
RFC5769_TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_REQUEST = bytes.fromhex(
    "00010058 2112a442 b7e7a701 bc34d686 fa87dfae"
    "80220010 5354554e 20746573 7420636c 69656e74"  # SOFTWARE "STUN test client"
    "00240004 6e0001ff"  # PRIORITY
    "80290008 932ff9b1 51263b36"  # ICE-CONTROLLED
    "00060009 6576746a 3a683676 59202020"  # USERNAME "evtj:h6vY"
    "00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2"  # MESSAGE-INTEGRITY
    "80280004 e57a3bcf"  # FINGERPRINT
)
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"  # SOFTWARE "test vector"
    "00200008 0001a147 e112a643"  # XOR-MAPPED-ADDRESS 192.0.2.1:32853
    "00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7"
    "80280004 c07d4c96"
)
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "01010048 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9"  # [2001:db8:...:6677]:32853
    "00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41"
    "80280004 c8fb0b4c"
)
RFC5769_IPV4_MAPPED = ("192.0.2.1", 32853)
RFC5769_IPV6_MAPPED = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)

CLIENT = ("198.51.100.7", 40000)


def mapped_by_the_agent(response: bytes, transaction_id: bytes) -> tuple[str, int] | None:
    """What the agent's STUN client (aioice) reads as the mapped address of a response."""
    try:
        message = aioice_stun.parse_message(response)
    except ValueError:
        return None
    if message.transaction_id != transaction_id:
        return None
    mapped = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get(
        "MAPPED-ADDRESS"
    )
    return None if mapped is None else (mapped[0], mapped[1])


def classify(servers: list[tuple[str, int]], timeout: float = 2.0) -> Any:
    return asyncio.run(classify_nat(servers, bind=("127.0.0.1", 0), timeout=timeout))


def message_integrity_ok(message: bytes, key: bytes) -> bool:
    """RFC 5389 section 15.4: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, with the
    header length counting up to the end of that attribute. Checks our attribute offsets."""
    offset = stun.HEADER_LENGTH
    while offset < len(message):
        kind, size = struct.unpack_from("!HH", message, offset)
        if kind == Attribute.MESSAGE_INTEGRITY:
            header = message[:2] + struct.pack("!H", offset + 24 - 20) + message[4:20]
            digest = hmac.new(key, header + message[20:offset], hashlib.sha1).digest()
            return digest == message[offset + 4 : offset + 24]
        offset += 4 + ((size + 3) & ~3)
    return False


# -- RFC 5769 test vectors -------------------------------------------------------------------


def test_rfc5769_sample_request_parses_as_a_binding_request() -> None:
    request = stun.parse_binding_request(RFC5769_REQUEST)
    assert request.transaction_id == RFC5769_TRANSACTION_ID
    assert request.get(Attribute.SOFTWARE) == b"STUN test client"
    assert request.get(Attribute.USERNAME) == b"evtj:h6vY"
    assert request.get(Attribute.PRIORITY) == bytes.fromhex("6e0001ff")
    assert [kind for kind, _ in request.attributes][-1] == Attribute.FINGERPRINT
    assert message_integrity_ok(RFC5769_REQUEST, RFC5769_PASSWORD)


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [(RFC5769_IPV4_RESPONSE, RFC5769_IPV4_MAPPED), (RFC5769_IPV6_RESPONSE, RFC5769_IPV6_MAPPED)],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_sample_responses_decode_to_their_mapped_address(
    vector: bytes, mapped: tuple[str, int]
) -> None:
    message = stun.parse_message(vector)
    assert (message.method, message.stun_class) == (stun.METHOD_BINDING, StunClass.SUCCESS)
    assert message.get(Attribute.SOFTWARE) == b"test vector"
    value = message.get(Attribute.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert stun.decode_xor_address(value, RFC5769_TRANSACTION_ID) == mapped
    assert mapped_by_the_agent(vector, RFC5769_TRANSACTION_ID) == mapped
    assert message_integrity_ok(vector, RFC5769_PASSWORD)


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [(RFC5769_IPV4_RESPONSE, RFC5769_IPV4_MAPPED), (RFC5769_IPV6_RESPONSE, RFC5769_IPV6_MAPPED)],
    ids=["ipv4", "ipv6"],
)
def test_xor_mapped_address_encodes_to_the_rfc5769_bytes(
    vector: bytes, mapped: tuple[str, int]
) -> None:
    value = stun.parse_message(vector).get(Attribute.XOR_MAPPED_ADDRESS)
    assert stun.encode_xor_address(*mapped, RFC5769_TRANSACTION_ID) == value


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_fingerprint_matches_the_rfc5769_vectors(vector: bytes) -> None:
    (expected,) = struct.unpack("!I", vector[-4:])
    assert stun.fingerprint(vector[:-8]) == expected


def test_the_rfc5769_sample_request_is_answered_despite_its_ice_attributes() -> None:
    stats = StunStats()
    reply = server.handle_datagram(RFC5769_REQUEST, CLIENT, stats)
    assert reply is not None
    assert mapped_by_the_agent(reply, RFC5769_TRANSACTION_ID) == CLIENT
    assert stats.snapshot()["answered"] == 1


# -- message types and round trips -------------------------------------------------------------


def test_binding_message_types_are_the_rfc_values() -> None:
    assert stun.message_type(stun.METHOD_BINDING, StunClass.REQUEST) == 0x0001
    assert stun.message_type(stun.METHOD_BINDING, StunClass.INDICATION) == 0x0011
    assert stun.message_type(stun.METHOD_BINDING, StunClass.SUCCESS) == 0x0101
    assert stun.message_type(stun.METHOD_BINDING, StunClass.ERROR) == 0x0111


@given(st.integers(0, 0xFFF), st.sampled_from(StunClass))
def test_message_type_interleaving_round_trips(method: int, stun_class: StunClass) -> None:
    value = stun.message_type(method, stun_class)
    assert value < 0x4000
    assert stun.split_message_type(value) == (method, stun_class)


ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)


@given(st.one_of(ipv4s, ipv6s), st.integers(0, 65535), st.binary(min_size=12, max_size=12))
def test_success_response_round_trips_through_the_agents_parser(
    ip: str, port: int, transaction_id: bytes
) -> None:
    response = stun.build_binding_success(transaction_id, (ip, port))
    parsed = stun.parse_message(response)  # layout and FINGERPRINT valid
    assert parsed.stun_class is StunClass.SUCCESS
    assert mapped_by_the_agent(response, transaction_id) == (ip, port)


def test_an_ipv4_client_seen_through_a_dual_stack_socket_is_reported_as_ipv4() -> None:
    transaction_id = os.urandom(12)
    response = stun.build_binding_success(transaction_id, ("::ffff:198.51.100.7", 5000))
    assert mapped_by_the_agent(response, transaction_id) == ("198.51.100.7", 5000)


def test_the_agents_request_is_a_binding_request_to_the_responder() -> None:
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    parsed = stun.parse_binding_request(bytes(request))
    assert parsed.transaction_id == request.transaction_id
    assert parsed.attributes == ()


def test_the_agent_reads_mapped_address_from_an_rfc3489_style_server() -> None:
    transaction_id = os.urandom(12)
    value = struct.pack("!BBH", 0, 1, 4242) + ipaddress.IPv4Address("192.0.2.9").packed
    response = stun.encode_message(
        stun.METHOD_BINDING,
        StunClass.SUCCESS,
        transaction_id,
        [(Attribute.MAPPED_ADDRESS, value)],
    )
    assert mapped_by_the_agent(response, transaction_id) == ("192.0.2.9", 4242)


def test_the_agent_ignores_a_response_with_a_corrupted_fingerprint() -> None:
    transaction_id = os.urandom(12)
    response = bytearray(stun.build_binding_success(transaction_id, CLIENT))
    response[-1] ^= 0xFF
    assert mapped_by_the_agent(bytes(response), transaction_id) is None


# -- what the responder drops, and counts ------------------------------------------------------


def request(
    attributes: bytes = b"",
    *,
    kind: int = 0x0001,
    cookie: int = stun.MAGIC_COOKIE,
    length: int | None = None,
) -> bytes:
    size = len(attributes) if length is None else length
    return struct.pack("!HHI12s", kind, size, cookie, b"T" * 12) + attributes


def with_fingerprint(message: bytes) -> bytes:
    body_length = len(message) - 20 + 8
    head = message[:2] + struct.pack("!H", body_length) + message[4:]
    return head + struct.pack("!HHI", Attribute.FINGERPRINT, 4, stun.fingerprint(head))


MALFORMED = {
    "empty": (b"", DropReason.TOO_SHORT),
    "header cut short": (request()[:19], DropReason.TOO_SHORT),
    "leading bits set (RTP, say)": (request(kind=0x8001), DropReason.NOT_STUN),
    "rfc3489 request without cookie": (request(cookie=0x01020304), DropReason.BAD_MAGIC_COOKIE),
    "length not a multiple of 4": (request(b"\x00" * 6, length=6), DropReason.BAD_LENGTH),
    "length longer than datagram": (request(length=8), DropReason.BAD_LENGTH),
    "trailing bytes after length": (request(length=0) + b"\x00" * 4, DropReason.BAD_LENGTH),
    "attribute longer than message": (
        request(struct.pack("!HH", 0x8022, 40) + b"abcd"),
        DropReason.ATTRIBUTE_OVERRUN,
    ),
    "attribute padding missing": (
        request(struct.pack("!HH", 0x8022, 5) + b"abcd"),
        DropReason.ATTRIBUTE_OVERRUN,
    ),
    "fingerprint wrong": (
        with_fingerprint(request())[:-1] + b"\x00",
        DropReason.BAD_FINGERPRINT,
    ),
    "fingerprint not last": (
        request(with_fingerprint(request())[20:] + struct.pack("!HH", 0x8022, 4) + b"abcd"),
        DropReason.BAD_FINGERPRINT,
    ),
    "binding indication (keep-alive)": (request(kind=0x0011), DropReason.NOT_A_REQUEST),
    "binding success response": (request(kind=0x0101), DropReason.NOT_A_REQUEST),
    "allocate request (TURN)": (request(kind=0x0003), DropReason.NOT_BINDING),
}


@pytest.mark.parametrize(("datagram", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_datagrams_are_dropped_and_counted_by_reason(
    datagram: bytes, reason: DropReason
) -> None:
    stats = StunStats()
    assert server.handle_datagram(datagram, CLIENT, stats) is None
    snapshot = stats.snapshot()
    assert snapshot["dropped"][reason] == 1
    assert snapshot["dropped_total"] == 1
    assert snapshot["answered"] == 0


def test_every_drop_reason_has_a_counter_from_the_start() -> None:
    assert set(StunStats().snapshot()["dropped"]) == {reason.value for reason in DropReason}


def test_an_unknown_comprehension_required_attribute_gets_a_420_naming_it() -> None:
    change_request = struct.pack("!HHI", 0x0003, 4, 0x06)  # RFC 5780 CHANGE-REQUEST
    stats = StunStats()
    reply = server.handle_datagram(request(change_request), CLIENT, stats)
    assert reply is not None
    message = stun.parse_message(reply)
    assert message.stun_class is StunClass.ERROR
    assert message.get(Attribute.UNKNOWN_ATTRIBUTES) == b"\x00\x03"
    error = aioice_stun.parse_message(reply).attributes["ERROR-CODE"]
    assert error[0] == 420
    assert stats.snapshot()["rejected"] == 1


def test_an_unknown_comprehension_optional_attribute_is_ignored() -> None:
    stats = StunStats()
    reply = server.handle_datagram(request(struct.pack("!HHI", 0xC001, 4, 0)), CLIENT, stats)
    assert reply is not None
    assert mapped_by_the_agent(reply, b"T" * 12) == CLIENT


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def stun_shaped(draw: Any) -> bytes:
    """Bytes that pass the header checks, so the attribute walk gets exercised too."""
    body = draw(st.binary(max_size=120))
    kind = draw(st.sampled_from([0x0001, 0x0011, 0x0101, 0x0003, draw(st.integers(0, 0x3FFF))]))
    length = draw(st.sampled_from([len(body), len(body) & ~3, draw(st.integers(0, 0xFFFF))]))
    return struct.pack("!HHI12s", kind, length, stun.MAGIC_COOKIE, b"\x00" * 12) + body


datagrams = st.one_of(st.binary(max_size=200), st.composite(stun_shaped)())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams)
def test_no_datagram_raises_out_of_the_responders_handler(data: bytes) -> None:
    stats = StunStats()
    protocol = server.StunResponderProtocol(stats)
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.datagram_received(data, CLIENT)
    snapshot = stats.snapshot()
    assert snapshot["dropped"][DropReason.INTERNAL_ERROR] == 0
    assert snapshot["answered"] + snapshot["rejected"] + snapshot["dropped_total"] == 1
    assert len(transport.sent) == snapshot["answered"] + snapshot["rejected"]


# -- the real responder on loopback, the real client -------------------------------------------


@pytest.fixture
def responder() -> Iterator[server.StunServer]:
    with running_responder() as running:
        yield running


def test_classification_on_loopback_is_endpoint_independent(
    responder: server.StunServer,
) -> None:
    report = classify(list(responder.addresses))
    assert report.mapping is NatMapping.ENDPOINT_INDEPENDENT
    assert report.mapped == report.local
    assert [r.mapped for r in report.results] == [report.local] * 2
    assert report.as_dict()["mapping"] == "endpoint-independent"
    assert responder.stats.answered == 2


def test_classification_with_one_silent_server_is_unknown_and_says_which(
    responder: server.StunServer,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        report = classify([responder.addresses[0], silent.getsockname()], timeout=0.5)
    assert time.monotonic() - started < 1.5  # the servers were asked at once, not in turn
    assert report.mapping is NatMapping.UNKNOWN
    assert report.mapped == report.local
    assert report.results[1].mapped is None
    assert "no answer" in (report.results[1].error or "")


def test_the_responder_counts_garbage_sent_to_it_and_keeps_answering(
    responder: server.StunServer,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for garbage in (b"", b"hello", b"\x00\x01\x00\x00" + b"\x00" * 16):
            udp.sendto(garbage, responder.addresses[0])
    wait_until(lambda: responder.stats.snapshot()["dropped_total"] == 3, timeout=5)
    assert classify([responder.addresses[1]]).mapped is not None
    dropped = responder.stats.snapshot()["dropped"]
    assert dropped["too_short"] == 2 and dropped["bad_magic_cookie"] == 1


def ask_binding(family: socket.AddressFamily, server_address: tuple[str, int]) -> tuple[str, int]:
    """One Binding request from a fresh socket of `family`: the mapped address it is told."""
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        udp.sendto(bytes(request), server_address)
        answer = aioice_stun.parse_message(udp.recv(2048))
    assert answer.transaction_id == request.transaction_id
    mapped = answer.attributes["XOR-MAPPED-ADDRESS"]
    return mapped[0], mapped[1]


def test_the_default_listener_answers_over_ipv4_and_ipv6_alike() -> None:
    """`::` is one dual-stack socket: IPv6 clients get their IPv6 address, IPv4 clients their
    IPv4 one (not ::ffff:127.0.0.1)."""
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    with running_responder([(server.ALL_ADDRESSES, 0)]) as running:
        port = running.addresses[0][1]
        assert ask_binding(socket.AF_INET6, ("::1", port))[0] == "::1"
        assert ask_binding(socket.AF_INET, ("127.0.0.1", port))[0] == "127.0.0.1"
        assert running.stats.answered == 2


def test_endpoints_parse_as_configuration_values() -> None:
    assert wire.parse_host_port("stun.example.org") == ("stun.example.org", 3478)
    assert wire.parse_host_port("203.0.113.10:3479") == ("203.0.113.10", 3479)
    assert wire.parse_host_port("[2001:db8::1]:3480") == ("2001:db8::1", 3480)
    assert wire.parse_host_port("2001:db8::1") == ("2001:db8::1", 3478)


# -- the command ---------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runstun_answers_on_two_ports_from_the_environment_and_logs_counters_on_sigterm(
    tmp_path: Path,
) -> None:
    first, second = free_udp_port(), free_udp_port()
    log = tmp_path / "runstun.log"
    env = {
        **os.environ,
        "STUN_HOST": "127.0.0.1",
        "STUN_PORT": str(first),
        "STUN_SECOND_PORT": str(second),
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runstun"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: "STUN responder on" in log.read_text(), timeout=20, what="runstun")
        servers = [("127.0.0.1", first), ("127.0.0.1", second)]
        report = classify(servers)
        assert report.mapping is NatMapping.ENDPOINT_INDEPENDENT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"\xff" * 24, servers[0])  # RTP or the like: not STUN
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    lines = log.read_text().splitlines()
    assert any(f"udp 127.0.0.1:{first} and udp 127.0.0.1:{second}" in line for line in lines)
    assert any("answered=2" in line and "not_stun=1" in line for line in lines), lines


def test_runstun_refuses_a_port_that_is_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUN_PORT", "stun")
    with pytest.raises(CommandError, match="STUN_PORT"):
        call_command("runstun")


def test_a_second_listener_identical_to_the_first_is_refused() -> None:
    with pytest.raises(ValueError, match="first one again"):
        server.listeners_from("127.0.0.1", 3478, 3478)


def test_the_responder_core_runs_without_django() -> None:
    code = (
        "import sys, registry.peering.stun.responder; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'django'); "
        "sys.exit(f'imported {loaded}' if loaded else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
