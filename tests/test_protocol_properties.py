"""Properties of the frame parser, and of one connection, for whatever a worker may send.

The strategies are built from `ClientMessageType` and the fields of the `ClientMessage`
dataclasses, so a message type added to the protocol is fuzzed without touching this file.
Each `@example` pins a bug the properties found.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import json
import re
import typing
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from registry.core import protocol
from tests.test_consumer import connected, worker

MESSAGE_CLASSES: tuple[type, ...] = typing.get_args(protocol.ClientMessage)
MESSAGE_TYPES = [kind.value for kind in protocol.ClientMessageType]
FIELD_NAMES = sorted(
    {field.name for cls in MESSAGE_CLASSES for field in dataclasses.fields(cls)} | {"type"}
)
SCALAR_TYPES = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text put in a frame verbatim: numbers `json.dumps` never writes (1e400, 4000 digits)."""

    text: str


def dump(value: Any, *, ensure_ascii: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        members = (
            f"{json.dumps(key, ensure_ascii=ensure_ascii)}:{dump(item, ensure_ascii=ensure_ascii)}"
            for key, item in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(item, ensure_ascii=ensure_ascii) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# Every code point, lone surrogates included (json.dumps escapes them unless ensure_ascii=False).
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=40)
raw_numbers = st.one_of(
    st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "0e0", "NaN", "Infinity", "-Infinity"]),
    st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    st.integers(min_value=300, max_value=4300).map(lambda digits: "9" * digits),
).map(Raw)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    any_text,
    st.text(any_char, min_size=250, max_size=260),
    raw_numbers,
)
zones = st.text(st.characters(codec="ascii"), min_size=0, max_size=8)
ip_strings = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda address: address.exploded.upper()),
    st.ip_addresses(v=4).map(lambda address: f"::ffff:{address}"),
    st.builds(lambda address, zone: f"{address}%{zone}", st.ip_addresses(v=6), zones),
    st.builds(
        lambda address, pad: f"{pad}{address}{pad}",
        st.ip_addresses(),
        st.text(" \t\n\r\x0b\x0c\u00a0\u2028\u3000", min_size=1, max_size=3),
    ),
    st.text("0123456789abcdefABCDEF:.%/ ", max_size=46),
)
json_values = st.recursive(
    scalars | ip_strings,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)
info_objects = st.one_of(
    st.dictionaries(st.text(any_char, max_size=70), scalars, max_size=6),
    st.dictionaries(st.text(any_char, max_size=70), json_values, max_size=6),
    st.dictionaries(st.text(any_char, max_size=3), scalars, min_size=30, max_size=34),
)
field_values = st.one_of(info_objects, ip_strings, json_values)
extra_fields = st.dictionaries(st.sampled_from(FIELD_NAMES) | any_text, json_values, max_size=3)
optional_fields = {name: field_values for name in FIELD_NAMES if name != "type"}
typed_objects = st.builds(
    lambda extra, fields: {**extra, **fields},
    extra_fields,
    st.fixed_dictionaries({"type": st.sampled_from(MESSAGE_TYPES)}, optional=optional_fields),
)
frame_objects = typed_objects | st.builds(
    lambda extra, fields: {**extra, **fields},
    extra_fields,
    st.fixed_dictionaries({"type": any_text | json_values}, optional=optional_fields),
)
json_frames = st.builds(dump, frame_objects | json_values, ensure_ascii=st.booleans())
message_frames = st.builds(dump, typed_objects, ensure_ascii=st.booleans()).filter(is_utf8)
frames = st.one_of(st.text(any_char), json_frames)
max_frame_bytes = st.one_of(
    st.just(protocol.DEFAULT_MAX_FRAME_BYTES),
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=0, max_value=1_000_000),
)


def parse_outcome(text: str, **kwargs: int) -> protocol.ClientMessage | protocol.ErrorCode:
    """The parsed message or the refusal's code; any other exception fails the test."""
    try:
        return protocol.parse_client_message(text, **kwargs)
    except protocol.ProtocolError as exc:
        return exc.code
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} escaped the parser: {exc}") from exc


def canonical(value: str) -> str:
    """An address as the database stores it: compressed, IPv4-mapped IPv6 unpacked."""
    address = ipaddress.ip_address(value.strip())
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).compressed


def is_canonical_ip(value: str) -> bool:
    try:
        return "%" not in value and canonical(value) == value
    except ValueError:
        return False


def is_flat_agent_info(info: object) -> bool:
    return (
        isinstance(info, dict)
        and len(info) <= protocol.AGENT_INFO_MAX_KEYS
        and all(
            isinstance(key, str)
            and len(key) <= protocol.AGENT_INFO_MAX_KEY_LENGTH
            and isinstance(value, SCALAR_TYPES)
            and not (isinstance(value, str) and len(value) > protocol.AGENT_INFO_MAX_VALUE_LENGTH)
            for key, value in info.items()
        )
    )


@pytest.mark.standalone
@given(text=frames, max_bytes=max_frame_bytes)
# check_frame_size encodes the text: lone surrogates raise UnicodeEncodeError.
@example(text="\ud800\ud800", max_bytes=4)
def test_any_text_frame_becomes_a_message_or_a_protocol_error(text: str, max_bytes: int) -> None:
    outcome = parse_outcome(text, max_bytes=max_bytes)
    assert isinstance(outcome, (protocol.ErrorCode, *MESSAGE_CLASSES))


@pytest.mark.standalone
@hypothesis_settings(max_examples=300)
@given(text=message_frames)
# 1e400 overflows to float("inf"): parse_constant never sees it.
@example(text='{"type": "agent_info", "info": {"load": 1e400}}')
def test_every_parsed_message_is_well_formed_and_encodes_as_strict_json(text: str) -> None:
    message = parse_outcome(text)
    if isinstance(message, protocol.ErrorCode):
        return
    frame = json.loads(text)
    assert frame["type"] in MESSAGE_TYPES
    fields = dataclasses.asdict(message)
    assert json.loads(json.dumps(fields, allow_nan=False)) == fields
    if isinstance(message, protocol.RegisterPublicIp):
        assert is_canonical_ip(message.ip)
        assert message.ip == canonical(frame["ip"])
    if isinstance(message, protocol.AgentInfo):
        assert is_flat_agent_info(message.info)
        assert message.info == frame["info"]


# Values close to each field's rule, and hostile ones: digits of other scripts where numbers go
# (str.isdigit() takes them), lone surrogates and NUL where text goes, numbers out of range.
hex_ids = st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), any_text)
other_digits = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6)
number_tokens = st.one_of(
    st.integers(min_value=-5, max_value=2**32).map(str),
    other_digits,
    st.sampled_from(["²", "0x10", "+1", "1_000", "00000000000080", "1e3", "-0"]),
    any_text.filter(lambda text: text and not any(c.isspace() for c in text)),
)
address_tokens = st.one_of(st.ip_addresses().map(str), ip_strings, number_tokens)
candidate_texts = st.builds(
    lambda prefix, foundation, component, transport, priority, ip, port, kind, extras: " ".join(
        [prefix + foundation, component, transport, priority, ip, port, "typ", kind, *extras]
    ),
    st.sampled_from(["", "candidate:"]),
    st.one_of(st.from_regex(r"[A-Za-z0-9+/]{1,32}", fullmatch=True), number_tokens),
    number_tokens,
    st.sampled_from(["udp", "UDP", "tcp"]),
    number_tokens,
    address_tokens,
    number_tokens,
    st.sampled_from(["host", "srflx", "prflx", "relay", "magic"]),
    st.lists(
        st.one_of(
            st.tuples(st.just("raddr"), address_tokens),
            st.tuples(st.just("rport"), number_tokens),
            st.tuples(st.sampled_from(["generation", "tcptype"]), number_tokens),
        ).map(" ".join),
        max_size=3,
    ),
)
endpoints = st.fixed_dictionaries(
    {"ip": st.one_of(ip_strings, json_values), "port": st.one_of(st.integers(), json_values)}
)
near_valid = {
    "ip": ip_strings,
    "info": info_objects,
    "mapping": st.sampled_from([m.value for m in protocol.NatMapping]),
    "udp_endpoint": endpoints,
    "port_mapping": st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {
                "protocol": st.one_of(
                    st.sampled_from([p.value for p in protocol.PortMappingProtocol]), any_text
                ),
                "external": endpoints,
            }
        ),
    ),
    "offline": st.one_of(st.booleans(), json_values),
    "tag": st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True), any_text),
    "request_id": st.one_of(st.from_regex(protocol.REQUEST_ID_PATTERN, fullmatch=True), any_text),
    "peer_id": st.one_of(st.from_regex(protocol.WORKER_ID_PATTERN, fullmatch=True), any_text),
    "introduction_id": hex_ids,
    "resumes": hex_ids,
    "protocol_version": st.integers(min_value=-2, max_value=1002),
    "transport": st.sampled_from([t.value for t in protocol.Transport]),
    "attempt": st.integers(min_value=-2, max_value=10_002),
    "policy": st.sampled_from([p.value for p in protocol.IcePolicy]),
    "ufrag": st.from_regex(r"[A-Za-z0-9+/]{3,257}", fullmatch=True),
    "pwd": st.from_regex(r"[A-Za-z0-9+/]{21,257}", fullmatch=True),
    "candidates": st.lists(candidate_texts, max_size=17),
    "done": st.booleans(),
    "kind": st.sampled_from([k.value for k in protocol.PathKind]),
    "remote": st.one_of(st.none(), endpoints),
    "setup_ms": st.one_of(st.none(), st.integers(min_value=-2, max_value=10**7 + 2)),
    "reason": st.one_of(any_text, st.text(any_char, min_size=190, max_size=260)),
}


MESSAGE_CLASS_OF_TYPE = {
    re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower(): cls for cls in MESSAGE_CLASSES
}


@st.composite
def messages_of_every_type(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A frame of one client message type with each of its fields left out, near its rule, or
    anything at all."""
    kind = draw(st.sampled_from(MESSAGE_TYPES))
    frame: dict[str, Any] = {"type": kind}
    for field in dataclasses.fields(MESSAGE_CLASS_OF_TYPE[kind]):
        choice = draw(st.sampled_from(["absent", "near", "near", "near", "any"]))
        if choice == "near":
            frame[field.name] = draw(near_valid[field.name])
        elif choice == "any":
            frame[field.name] = draw(field_values)
    return kind, frame


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (*strings_in(key), *strings_in(item))]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in strings_in(item)]
    return []


@pytest.mark.standalone
@hypothesis_settings(max_examples=1000)
@given(message=messages_of_every_type(), ensure_ascii=st.booleans())
@example(
    message=("ice_candidates", {"introduction_id": "0" * 32, "attempt": 0, "policy": "all",
             "ufrag": "abcd", "pwd": "p" * 22, "candidates": ["1 ² udp 1 192.0.2.1 9 typ host"]}),
    ensure_ascii=True,
)  # fmt: skip
@example(message=("peer_close", {"introduction_id": "0" * 32, "reason": "\ud800 bye"}),
         ensure_ascii=True)  # fmt: skip
def test_every_message_type_with_any_field_values_parses_or_gets_a_coded_error(
    message: tuple[str, dict[str, Any]], ensure_ascii: bool
) -> None:
    """Issue 19: int("²") escaped the candidate parser (UNAVAILABLE and a traceback), and a
    reason with a lone surrogate was logged and recorded (logging errors, a record left open)."""
    kind, frame = message
    text = dump(frame, ensure_ascii=ensure_ascii)
    if not is_utf8(text):
        return  # not a text frame a WebSocket can carry
    outcome = parse_outcome(text, max_bytes=10**6)
    if isinstance(outcome, protocol.ErrorCode):
        return
    assert isinstance(outcome, MESSAGE_CLASS_OF_TYPE[kind])
    fields = dataclasses.asdict(outcome)
    for value in strings_in(fields):
        assert is_utf8(value) and "\x00" not in value, (kind, value)
    if isinstance(outcome, protocol.IceCandidates):
        for candidate in outcome.candidates:
            assert candidate.isascii() and candidate == protocol.parse_candidate(candidate)


sized_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.builds(
        lambda char, count: char * count,
        st.sampled_from(["a", "é", "€", "😀"]),
        st.integers(min_value=0, max_value=1100),
    ),
    st.builds(
        lambda pad: json.dumps({"type": "heartbeat", "pad": pad}, ensure_ascii=False),
        st.text(st.characters(codec="utf-8"), max_size=100),
    ),
)


@pytest.mark.standalone
@given(text=sized_text, slack=st.integers(min_value=-8, max_value=8))
def test_frames_over_the_byte_limit_are_refused_and_frames_within_it_are_not(
    text: str, slack: int
) -> None:
    size = len(text.encode())
    max_bytes = max(0, size + slack)
    try:
        protocol.parse_client_message(text, max_bytes=max_bytes)
        too_large = False
    except protocol.FrameTooLarge:
        too_large = True
    except protocol.ProtocolError:
        too_large = False
    assert too_large == (size > max_bytes)


@pytest.mark.standalone
@given(value=ip_strings | json_values)
def test_a_normalized_address_normalizes_to_itself(value: object) -> None:
    try:
        once = protocol.normalize_ip(value)
    except protocol.InvalidIp:
        return
    assert protocol.normalize_ip(once) == once


@pytest.mark.standalone
@pytest.mark.parametrize("kind", MESSAGE_TYPES)
def test_every_client_message_type_is_known_to_the_parser(kind: str) -> None:
    try:
        protocol.parse_client_message(json.dumps({"type": kind}))
    except protocol.UnknownType:
        pytest.fail(f"the parser does not know {kind!r}")
    except protocol.ProtocolError:
        pass


# Frames as a WebSocket delivers them: text frames are UTF-8 (RFC 6455), so no raw surrogates.
socket_frames = st.one_of(st.text(st.characters(codec="utf-8"), max_size=60), json_frames).filter(
    is_utf8
)


example_worker_ids = (f"prop-{n}" for n in itertools.count())


async def reply_to(comm) -> dict:
    """The next reply, passing over peer events: a `subscribe_peers` frame in an example makes
    the connection a subscriber, and other examples' workers come and go meanwhile."""
    while True:
        frame = await comm.receive_json_from(timeout=5)
        if frame.get("type") not in ("peer_joined", "peer_left"):
            return frame


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@hypothesis_settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(socket_frames, min_size=1, max_size=6))
# The reply names ::ffff:c633:6407, the model (unpack_ipv4=True) stores 198.51.100.7.
@example(frames=['{"type": "register_public_ip", "ip": "::ffff:198.51.100.7"}'])
# PostgreSQL's jsonb refuses \u0000: the worker is told UNAVAILABLE, "send it again later".
@example(frames=['{"type": "agent_info", "info": {"note": "\\u0000"}}'])
async def test_a_connection_answers_every_frame_once_and_stores_only_well_formed_fields(
    frames: list[str],
) -> None:
    worker_id = next(example_worker_ids)
    with override_settings(RENDEZVOUS={**settings.RENDEZVOUS, "RATE_BURST": 10_000}):
        comm, _ = await connected(worker_id)
        try:
            for frame in frames:
                # Not send_to: it refuses the empty frame, which a WebSocket may carry.
                await comm.send_input({"type": "websocket.receive", "text": frame})
            replies = [await reply_to(comm) for _ in frames]
            await asyncio.sleep(0.05)
            await comm.send_to(text_data='{"type": "heartbeat"}')
            assert (await reply_to(comm))["type"] == "heartbeat_ack"  # nothing else came first
            stored = await worker(worker_id)
        finally:
            await comm.disconnect()
    acknowledged_ip = None
    for frame, reply in zip(frames, replies, strict=True):
        outcome = parse_outcome(frame, max_bytes=settings.RENDEZVOUS["MAX_FRAME_BYTES"])
        assert isinstance(reply, dict) and "type" in reply
        if isinstance(outcome, protocol.ErrorCode):
            assert (reply["type"], reply["code"]) == ("error", outcome)
        else:
            assert reply["type"] != "error", (frame, reply)
        if isinstance(outcome, protocol.RegisterPublicIp):
            acknowledged_ip = outcome.ip
    assert stored.public_ip is None or is_canonical_ip(stored.public_ip)
    assert stored.public_ip == acknowledged_ip
    assert is_flat_agent_info(stored.agent_info)
