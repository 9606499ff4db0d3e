"""NAT-PMP (RFC 6886): ask the gateway for its external address and a UDP port mapping.

Messages are the RFC's figures, byte for byte (tests/test_portmap.py builds them from the
figures' fields); the exchange (retransmission, answers only from the gateway) is exchange.py.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

from .exchange import PortMapError, exchange

VERSION = 0  # RFC 6886 3.2: "Vers = 0"
OP_EXTERNAL_ADDRESS = 0  # 3.2
OP_MAP_UDP = 1  # 3.3
RESPONSE = 128  # 3.2: a response's opcode is the request's plus 128


class Result(IntEnum):
    """RFC 6886 section 3.5."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


@dataclass(frozen=True)
class ExternalAddress:
    epoch: int  # seconds since the gateway's mapping table started (3.6)
    address: str


@dataclass(frozen=True)
class MapResponse:
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def external_address_request() -> bytes:
    """Section 3.2: version 0, opcode 0."""
    return struct.pack("!BB", VERSION, OP_EXTERNAL_ADDRESS)


def map_request(internal_port: int, suggested_external_port: int, lifetime: int) -> bytes:
    """Section 3.3: version 0, opcode 1 (UDP), 16 reserved bits, internal port, suggested
    external port, requested lifetime in seconds. Lifetime 0 and external port 0 delete the
    mapping (3.4)."""
    return struct.pack(
        "!BBHHHI", VERSION, OP_MAP_UDP, 0, internal_port, suggested_external_port, lifetime
    )


def parse_external_address(data: bytes) -> ExternalAddress:
    """Section 3.2's response: 12 bytes, opcode 128, result, epoch, external IPv4 address."""
    epoch = _header(data, OP_EXTERNAL_ADDRESS, 12)
    address = ipaddress.IPv4Address(data[8:12])
    if address.is_unspecified:
        # 3.2: the gateway has no external address yet (its uplink is down)
        raise PortMapError("the gateway has no external address (0.0.0.0)")
    return ExternalAddress(epoch=epoch, address=str(address))


def parse_map_response(data: bytes) -> MapResponse:
    """Section 3.3's response: 16 bytes, opcode 129, result, epoch, internal port, mapped
    external port, lifetime granted."""
    epoch = _header(data, OP_MAP_UDP, 16)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return MapResponse(epoch, internal, external, lifetime)


def _header(data: bytes, opcode: int, size: int) -> int:
    """The epoch of a response to `opcode`, or PortMapError naming what is wrong with it."""
    if len(data) < 4:
        raise PortMapError(f"a NAT-PMP answer of {len(data)} bytes")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise PortMapError(f"not a NAT-PMP answer (version {version})")
    if op != RESPONSE + opcode:
        raise PortMapError(f"a NAT-PMP answer to opcode {op - RESPONSE}, not {opcode}")
    if result != Result.SUCCESS:
        name = Result(result).name if result in Result._value2member_map_ else str(result)
        raise PortMapError(f"the gateway refused (NAT-PMP result {name})")
    if len(data) < size:
        raise PortMapError(f"a NAT-PMP answer of {len(data)} bytes, not {size}")
    return struct.unpack_from("!I", data, 4)[0]


def rebooted(previous: tuple[int, float], epoch: int, now: float) -> bool:
    """Section 3.6: the gateway lost its mappings (a reboot) when its epoch grew less than the
    client's own clock did, less 1/8 for drift and 2 s, or went backwards."""
    was, at = previous
    elapsed = now - at
    return epoch < was or epoch + 2 < was + elapsed * 7 / 8


class NatPmpClient:
    """The gateway's NAT-PMP server, from one agent."""

    protocol = "nat-pmp"

    def __init__(self, gateway: str, *, source: str = "0.0.0.0") -> None:
        self.gateway = gateway
        self.source = source
        self.epoch: tuple[int, float] | None = None  # the last epoch seen, and when
        self.rebooted = False  # the last answer's epoch says the mappings were lost (3.6)

    async def external_address(self, timeout: float) -> str:
        answer = await exchange(
            self.gateway,
            external_address_request(),
            parse_external_address,
            timeout=timeout,
            source=self.source,
        )
        self._saw(answer.epoch)
        return answer.address

    async def map(
        self, internal_port: int, lifetime: int, timeout: float, suggested: int | None = None
    ) -> MapResponse:
        """A UDP mapping for `internal_port` (a new one, or the same one renewed)."""
        answer = await exchange(
            self.gateway,
            map_request(internal_port, internal_port if suggested is None else suggested, lifetime),
            parse_map_response,
            timeout=timeout,
            source=self.source,
        )
        if answer.internal_port != internal_port:
            raise PortMapError(
                f"the gateway mapped internal port {answer.internal_port}, not {internal_port}"
            )
        if lifetime and not (answer.external_port and answer.lifetime):
            raise PortMapError("the gateway answered a mapping without a port or a lifetime")
        self._saw(answer.epoch)
        return answer

    async def unmap(self, internal_port: int, timeout: float) -> None:
        await self.map(internal_port, 0, timeout, suggested=0)

    def _saw(self, epoch: int) -> None:
        now = time.monotonic()
        self.rebooted = self.epoch is not None and rebooted(self.epoch, epoch, now)
        self.epoch = (epoch, now)
