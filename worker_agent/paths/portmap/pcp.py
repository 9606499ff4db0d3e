"""PCP (RFC 6887): ANNOUNCE to find a PCP server, MAP for a UDP port mapping.

Messages are the RFC's figures, byte for byte (tests/test_portmap.py builds them from the
figures' fields); the exchange (retransmission, answers only from the gateway) is exchange.py.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

from .exchange import PortMapError, exchange
from .natpmp import rebooted

VERSION = 2  # RFC 6887 section 7.1
OP_ANNOUNCE = 0  # section 14.1
OP_MAP = 1  # section 11.1
RESPONSE_BIT = 0x80  # section 7.2: R = 1 in a response
PROTOCOL_UDP = 17  # section 11.1: the IANA protocol number
HEADER = 24  # sections 7.1 and 7.2
MAP_DATA = 36  # section 11.1
MAX_MESSAGE = 1100  # section 7


class Result(IntEnum):
    """RFC 6887 section 7.4."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


@dataclass(frozen=True)
class Response:
    opcode: int
    lifetime: int
    epoch: int
    data: bytes  # the opcode-specific part


@dataclass(frozen=True)
class MapResponse:
    epoch: int
    nonce: bytes
    internal_port: int
    external_port: int
    external_address: str
    lifetime: int


def _ipv6(address: str) -> bytes:
    """Section 5: IPv4 addresses travel as IPv4-mapped IPv6 addresses (::ffff:a.b.c.d)."""
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv4Address):
        parsed = ipaddress.IPv6Address(f"::ffff:{parsed}")
    return parsed.packed


def _address(packed: bytes) -> str:
    parsed = ipaddress.IPv6Address(packed)
    return str(parsed.ipv4_mapped or parsed)


def request_header(opcode: int, lifetime: int, client: str) -> bytes:
    """Section 7.1: version 2, R = 0 and the opcode, 16 reserved bits, the requested lifetime,
    the client's IP address (128 bits)."""
    return struct.pack("!BBHI", VERSION, opcode, 0, lifetime) + _ipv6(client)


def announce_request(client: str) -> bytes:
    """Section 14.1: ANNOUNCE, lifetime 0, no opcode data: does a PCP server answer?"""
    return request_header(OP_ANNOUNCE, 0, client)


def map_request(
    *,
    client: str,
    nonce: bytes,
    internal_port: int,
    lifetime: int,
    suggested_port: int = 0,
    suggested_address: str = "0.0.0.0",
) -> bytes:
    """Section 11.1: the header, then the mapping nonce (96 bits), the protocol, 24 reserved
    bits, the internal port, the suggested external port and address. Lifetime 0 deletes the
    mapping of this nonce (section 15)."""
    if len(nonce) != 12:
        raise ValueError("a PCP mapping nonce is 12 bytes")
    data = nonce + struct.pack("!B3xHH", PROTOCOL_UDP, internal_port, suggested_port)
    return request_header(OP_MAP, lifetime, client) + data + _ipv6(suggested_address)


def parse_response(data: bytes, opcode: int) -> Response:
    """Section 7.2: version 2, R = 1 and the opcode, 8 reserved bits, the result code, the
    lifetime, the epoch time, 96 reserved bits; then the opcode's data. PortMapError for
    anything else, or a result other than SUCCESS (naming it)."""
    if len(data) < 4:
        raise PortMapError(f"a PCP answer of {len(data)} bytes")
    version, op, _, result = struct.unpack_from("!BBBB", data)
    if version == 0 and op >= 128:
        # Appendix A: a NAT-PMP server's answer to a PCP request (UNSUPP_VERSION)
        raise PortMapError("the gateway speaks NAT-PMP, not PCP")
    if version != VERSION:
        raise PortMapError(f"not a PCP answer (version {version})")
    if op != RESPONSE_BIT | opcode:
        raise PortMapError(f"a PCP answer to opcode {op & 0x7F}, not {opcode}")
    if len(data) < HEADER or len(data) > MAX_MESSAGE or len(data) % 4:
        raise PortMapError(f"a PCP answer of {len(data)} bytes")
    if result != Result.SUCCESS:
        name = Result(result).name if result in Result._value2member_map_ else str(result)
        raise PortMapError(f"the gateway refused (PCP result {name})")
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    return Response(opcode=opcode, lifetime=lifetime, epoch=epoch, data=data[HEADER:])


def parse_map_response(data: bytes) -> MapResponse:
    """Section 11.1's response: the nonce, protocol, the assigned external port and address."""
    response = parse_response(data, OP_MAP)
    if len(response.data) < MAP_DATA:
        raise PortMapError("a PCP MAP answer without its mapping")
    nonce = response.data[:12]
    protocol, internal, external = struct.unpack_from("!B3xHH", response.data, 12)
    if protocol != PROTOCOL_UDP:
        raise PortMapError(f"a PCP MAP answer for protocol {protocol}, not UDP")
    return MapResponse(
        epoch=response.epoch,
        nonce=nonce,
        internal_port=internal,
        external_port=external,
        external_address=_address(response.data[20:36]),
        lifetime=response.lifetime,
    )


class PcpClient:
    """The gateway's PCP server, from one agent. Each internal port has its own nonce (section
    11.1: the nonce ties renewals and the deletion to the mapping)."""

    protocol = "pcp"

    def __init__(self, gateway: str, client: str) -> None:
        self.gateway = gateway
        self.client = client
        self.epoch: tuple[int, float] | None = None
        self.rebooted = False  # the last answer's epoch says the mappings were lost (8.5)
        self._nonces: dict[int, bytes] = {}

    async def announce(self, timeout: float) -> None:
        answer = await exchange(
            self.gateway,
            announce_request(self.client),
            lambda data: parse_response(data, OP_ANNOUNCE),
            timeout=timeout,
            source=self.client,
        )
        self._saw(answer.epoch)

    async def map(
        self, internal_port: int, lifetime: int, timeout: float, suggested: int | None = None
    ) -> MapResponse:
        nonce = self._nonces.setdefault(internal_port, os.urandom(12))
        request = map_request(
            client=self.client,
            nonce=nonce,
            internal_port=internal_port,
            lifetime=lifetime,
            suggested_port=internal_port if suggested is None else suggested,
        )
        answer = await exchange(
            self.gateway, request, parse_map_response, timeout=timeout, source=self.client
        )
        if answer.nonce != nonce:
            raise PortMapError("the gateway answered another mapping's nonce")
        if answer.internal_port != internal_port:
            raise PortMapError(
                f"the gateway mapped internal port {answer.internal_port}, not {internal_port}"
            )
        if lifetime and not (answer.external_port and answer.lifetime):
            raise PortMapError("the gateway answered a mapping without a port or a lifetime")
        self._saw(answer.epoch)
        return answer

    async def unmap(self, internal_port: int, timeout: float) -> None:
        try:
            await self.map(internal_port, 0, timeout, suggested=0)
        finally:
            self._nonces.pop(internal_port, None)

    def _saw(self, epoch: int) -> None:
        now = time.monotonic()
        self.rebooted = self.epoch is not None and rebooted(self.epoch, epoch, now)
        self.epoch = (epoch, now)
