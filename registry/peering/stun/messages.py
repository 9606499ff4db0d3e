"""STUN messages (RFC 5389) as the responder reads and writes them: the header and attribute
layout, FINGERPRINT, XOR-MAPPED-ADDRESS, and the Binding responses. Agents ask with aioice's STUN
client (worker_agent/paths/netcheck.py); the tests check the responder against RFC 5769's test
vectors and against that client. No Django and nothing else of the project.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
FINGERPRINT_XOR = 0x5354554E  # "STUN": keeps a CRC-32 of another protocol from passing as ours
METHOD_BINDING = 0x001
SOFTWARE = "rendezvous-stun"

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")


class StunClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attribute(IntEnum):
    """Attribute types this responder knows (RFC 5389 section 18.2, ICE's from RFC 8445)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


# Comprehension-required attributes (below 0x8000) a request may carry and still be answered:
# authentication is not used, so USERNAME and MESSAGE-INTEGRITY are understood and ignored, as
# are ICE's. Anything else, such as RFC 5780's CHANGE-REQUEST, gets a 420 naming it.
UNDERSTOOD_ATTRIBUTES = frozenset(a.value for a in Attribute)

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02


class DropReason(StrEnum):
    """Why a datagram got no answer. Every reason has a counter, zero until it happens."""

    TOO_SHORT = "too_short"  # fewer than the 20 bytes of a header
    NOT_STUN = "not_stun"  # the two leading bits of every STUN message are not zero
    BAD_MAGIC_COOKIE = "bad_magic_cookie"  # not 0x2112A442 (RFC 3489 clients included)
    BAD_LENGTH = "bad_length"  # length not a multiple of 4, or not the datagram's size
    ATTRIBUTE_OVERRUN = "attribute_overrun"  # an attribute runs past the end of the message
    BAD_FINGERPRINT = "bad_fingerprint"  # FINGERPRINT wrong, or not the last attribute
    NOT_A_REQUEST = "not_a_request"  # an indication or a response
    NOT_BINDING = "not_binding"  # a request for another method
    INTERNAL_ERROR = "internal_error"  # a bug: logged, counted, never raised to the loop


class MalformedDatagram(ValueError):
    """A datagram the responder drops; `reason` says which counter it goes to."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(frozen=True)
class StunMessage:
    method: int
    stun_class: StunClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()

    def get(self, attribute_type: int) -> bytes | None:
        """The first occurrence's value: RFC 5389 says later duplicates may be ignored."""
        for kind, value in self.attributes:
            if kind == attribute_type:
                return value
        return None


def message_type(method: int, stun_class: StunClass) -> int:
    """Interleave the 12 method bits and 2 class bits as RFC 5389 section 6 lays them out."""
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((stun_class & 0b10) << 7)
        | ((stun_class & 0b01) << 4)
    )


def split_message_type(value: int) -> tuple[int, StunClass]:
    method = ((value >> 2) & 0xF80) | ((value >> 1) & 0x070) | (value & 0x00F)
    stun_class = StunClass(((value >> 7) & 0b10) | ((value >> 4) & 0b01))
    return method, stun_class


def fingerprint(data: bytes) -> int:
    """CRC-32 (ITU V.42, which is zlib's) of `data` XORed with "STUN" (RFC 5389 section 15.5)."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def parse_message(data: bytes) -> StunMessage:
    """Any well-formed STUN message: header, attribute layout and, if present, FINGERPRINT.

    Raises MalformedDatagram with the reason it would be dropped for.
    """
    if len(data) < HEADER_LENGTH:
        raise MalformedDatagram(DropReason.TOO_SHORT, f"{len(data)} bytes")
    raw_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if raw_type & 0xC000:
        raise MalformedDatagram(DropReason.NOT_STUN, f"type 0x{raw_type:04x}")
    if cookie != MAGIC_COOKIE:
        raise MalformedDatagram(DropReason.BAD_MAGIC_COOKIE, f"0x{cookie:08x}")
    if length % 4 or HEADER_LENGTH + length != len(data):
        raise MalformedDatagram(
            DropReason.BAD_LENGTH, f"length field {length}, datagram {len(data)} bytes"
        )
    attributes: list[tuple[int, bytes]] = []
    offset = HEADER_LENGTH
    while offset < len(data):
        if offset + _ATTRIBUTE_HEADER.size > len(data):
            raise MalformedDatagram(DropReason.ATTRIBUTE_OVERRUN, f"header at {offset}")
        kind, size = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        start = offset + _ATTRIBUTE_HEADER.size
        end = start + size
        if start + _padded(size) > len(data):
            raise MalformedDatagram(
                DropReason.ATTRIBUTE_OVERRUN, f"0x{kind:04x} of {size} bytes at {offset}"
            )
        if kind == Attribute.FINGERPRINT:
            if size != 4 or end != len(data):
                raise MalformedDatagram(DropReason.BAD_FINGERPRINT, "not the last attribute")
            (expected,) = struct.unpack_from("!I", data, start)
            if fingerprint(data[:offset]) != expected:
                raise MalformedDatagram(DropReason.BAD_FINGERPRINT, "CRC mismatch")
        attributes.append((kind, bytes(data[start:end])))
        offset = start + _padded(size)
    method, stun_class = split_message_type(raw_type)
    return StunMessage(method, stun_class, bytes(transaction_id), tuple(attributes))


def parse_binding_request(data: bytes) -> StunMessage:
    """A Binding request the responder answers, or MalformedDatagram saying why not."""
    message = parse_message(data)
    if message.stun_class is not StunClass.REQUEST:
        raise MalformedDatagram(DropReason.NOT_A_REQUEST, message.stun_class.name.lower())
    if message.method != METHOD_BINDING:
        raise MalformedDatagram(DropReason.NOT_BINDING, f"method 0x{message.method:03x}")
    return message


def unknown_required_attributes(message: StunMessage) -> list[int]:
    """Comprehension-required attribute types the responder does not understand, in order."""
    unknown: list[int] = []
    for kind, _ in message.attributes:
        if kind < 0x8000 and kind not in UNDERSTOOD_ATTRIBUTES and kind not in unknown:
            unknown.append(kind)
    return unknown


def encode_message(
    method: int,
    stun_class: StunClass,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    with_fingerprint: bool = True,
) -> bytes:
    """A whole message, FINGERPRINT last by default: it lets a client that multiplexes STUN
    with other traffic on one socket (as a punching agent does) tell our replies apart."""
    if len(transaction_id) != TRANSACTION_ID_LENGTH:
        raise ValueError(f"a transaction id is {TRANSACTION_ID_LENGTH} bytes")
    body = b"".join(
        _ATTRIBUTE_HEADER.pack(kind, len(value))
        + value
        + b"\x00" * (_padded(len(value)) - len(value))
        for kind, value in attributes
    )
    kind = message_type(method, stun_class)
    if not with_fingerprint:
        return _HEADER.pack(kind, len(body), MAGIC_COOKIE, transaction_id) + body
    # The CRC covers a header whose length already counts the FINGERPRINT attribute (8 bytes).
    head = _HEADER.pack(kind, len(body) + 8, MAGIC_COOKIE, transaction_id) + body
    return (
        head
        + _ATTRIBUTE_HEADER.pack(Attribute.FINGERPRINT, 4)
        + struct.pack("!I", fingerprint(head))
    )


def encode_xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS's value: obfuscated so NATs that rewrite addresses in payloads miss it."""
    address = _unmapped(ipaddress.ip_address(ip))
    xport = port ^ (MAGIC_COOKIE >> 16)
    mask = _COOKIE_BYTES + transaction_id
    family = FAMILY_IPV4 if address.version == 4 else FAMILY_IPV6
    packed = address.packed
    xored = bytes(a ^ b for a, b in zip(packed, mask, strict=False))
    return struct.pack("!BBH", 0, family, xport) + xored


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """The inverse of `encode_xor_address`; ValueError for a family or size that is wrong."""
    family, xport = _address_header(value)
    mask = _COOKIE_BYTES + transaction_id
    packed = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
    address = (
        ipaddress.IPv4Address(packed) if family == FAMILY_IPV4 else ipaddress.IPv6Address(packed)
    )
    return str(address), xport ^ (MAGIC_COOKIE >> 16)


def _address_header(value: bytes) -> tuple[int, int]:
    if len(value) < 4:
        raise ValueError("address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    expected = {FAMILY_IPV4: 8, FAMILY_IPV6: 20}.get(family)
    if expected is None or len(value) != expected:
        raise ValueError(f"address family 0x{family:02x} with {len(value)} bytes")
    return family, port


def build_binding_success(
    transaction_id: bytes, client: tuple[str, int], *, software: str | None = SOFTWARE
) -> bytes:
    """The answer to a Binding request: where the request came from, as XOR-MAPPED-ADDRESS."""
    attributes = [(Attribute.XOR_MAPPED_ADDRESS.value, encode_xor_address(*client, transaction_id))]
    if software:
        attributes.append((Attribute.SOFTWARE.value, software.encode()[:763]))
    return encode_message(METHOD_BINDING, StunClass.SUCCESS, transaction_id, attributes)


def build_binding_error(
    transaction_id: bytes,
    code: int,
    reason: str,
    *,
    unknown_attributes: Sequence[int] = (),
    software: str | None = SOFTWARE,
) -> bytes:
    """A Binding error response (ERROR-CODE, and UNKNOWN-ATTRIBUTES for a 420)."""
    error = struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()[:763]
    attributes = [(Attribute.ERROR_CODE.value, error)]
    if unknown_attributes:
        attributes.append(
            (
                Attribute.UNKNOWN_ATTRIBUTES.value,
                b"".join(struct.pack("!H", kind) for kind in unknown_attributes),
            )
        )
    if software:
        attributes.append((Attribute.SOFTWARE.value, software.encode()[:763]))
    return encode_message(METHOD_BINDING, StunClass.ERROR, transaction_id, attributes)


def _padded(size: int) -> int:
    return (size + 3) & ~3


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    """An IPv4 client seen through a dual-stack IPv6 socket is reported as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
