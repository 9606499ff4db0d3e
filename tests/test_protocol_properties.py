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
