"""STUN client (RFC 5389 Binding): the agent's public UDP endpoint and how its NAT maps it.

Requests go out on the socket the caller gives, the one it will later punch from, because a NAT
maps each inside socket separately: an answer about any other socket says nothing about this one.
Asking two servers at different address:port pairs shows whether the mapping depends on the
destination (Tailscale's netcheck makes the same check): if it does, a peer cannot reach the
endpoint a server saw, and hole punching needs the other side's NAT to be the forgiving one.

Standard library only, so the agent installs without the service. `registry/stun.py` is the
source of truth for the wire format; `tests/test_stun.py` checks the two copies agree.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# RFC 5389 section 7.2.1 starts at RTO 500 ms, doubles it for each of up to 7 sends and waits
# 16 RTOs after the last. Scaled down here: an agent on a LAN-fast path should not wait seconds
# for a lost datagram, and the whole transaction is bounded by `timeout` anyway.
DEFAULT_RTO = 0.1
DEFAULT_RETRIES = 6
DEFAULT_TIMEOUT = 3.0

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

Endpoint = tuple[str, int]
UnmatchedCallback = Callable[[bytes, tuple[Any, ...]], None]


class NatMapping(StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"  # one public endpoint for every destination
    ENDPOINT_DEPENDENT = "endpoint-dependent"  # a new public endpoint per destination
    UNKNOWN = "unknown"  # fewer than two servers answered


class StunError(Exception):
    """A Binding transaction that produced no mapped address."""


class StunTimeout(StunError, TimeoutError):
    """No answer within the timeout, after every retransmission."""


class StunErrorResponse(StunError):
    """The server answered with a Binding error response."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"STUN error {code}: {reason}")
        self.code = code
        self.reason = reason


def new_transaction_id() -> bytes:
    return os.urandom(12)


def build_binding_request(transaction_id: bytes) -> bytes:
    """A Binding request with no attributes: the smallest thing every STUN server answers."""
    if len(transaction_id) != 12:
        raise ValueError("a transaction id is 12 bytes")
    return struct.pack("!HHI12s", BINDING_REQUEST, 0, MAGIC_COOKIE, transaction_id)


def parse_binding_response(data: bytes, transaction_id: bytes) -> Endpoint | None:
    """The mapped endpoint from a response to `transaction_id`; None for any other datagram.

    Raises StunErrorResponse for an error response, StunError for a success without an address.
    """
    if len(data) < HEADER_LENGTH:
        return None
    kind, length, cookie, txid = struct.unpack_from("!HHI12s", data)
    if (
        cookie != MAGIC_COOKIE
        or txid != transaction_id
        or kind not in (BINDING_SUCCESS, BINDING_ERROR)
    ):
        return None
    if length % 4 or HEADER_LENGTH + length != len(data):
        return None
    attributes = _attributes(data)
    if attributes is None:
        return None
    if kind == BINDING_ERROR:
        value = attributes.get(ATTR_ERROR_CODE, b"")
        if len(value) >= 4:
            code = (value[2] & 0x07) * 100 + value[3]
            raise StunErrorResponse(code, value[4:].decode("utf-8", "replace"))
        raise StunErrorResponse(0, "error response without ERROR-CODE")
    try:
        if ATTR_XOR_MAPPED_ADDRESS in attributes:
            return _decode_address(attributes[ATTR_XOR_MAPPED_ADDRESS], transaction_id)
        if ATTR_MAPPED_ADDRESS in attributes:  # RFC 3489 servers
            return _decode_address(attributes[ATTR_MAPPED_ADDRESS], None)
    except ValueError as exc:
        raise StunError(f"unreadable mapped address: {exc}") from exc
    raise StunError("success response without a mapped address")


def _attributes(data: bytes) -> dict[int, bytes] | None:
    """First occurrence of each attribute; None when the layout or FINGERPRINT is wrong."""
    found: dict[int, bytes] = {}
    offset = HEADER_LENGTH
    while offset < len(data):
        if offset + 4 > len(data):
            return None
        kind, size = struct.unpack_from("!HH", data, offset)
        start, padded = offset + 4, (size + 3) & ~3
        if start + padded > len(data):
            return None
        if kind == ATTR_FINGERPRINT:
            if size != 4 or start + 4 != len(data):
                return None
            crc = (zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack_from("!I", data, start)[0] != crc:
                return None
        found.setdefault(kind, bytes(data[start : start + size]))
        offset = start + padded
    return found


def _decode_address(value: bytes, transaction_id: bytes | None) -> Endpoint:
    if len(value) < 4:
        raise ValueError("address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    size = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}.get(family)
    if size is None or len(value) != 4 + size:
        raise ValueError(f"address family 0x{family:02x} with {len(value)} bytes")
    packed = value[4:]
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transaction_id
        packed = bytes(a ^ b for a, b in zip(packed, mask, strict=False))
    address = ipaddress.IPv4Address(packed) if size == 4 else ipaddress.IPv6Address(packed)
    return str(address), port


@dataclass(frozen=True)
class ServerResult:
    server: Endpoint
    mapped: Endpoint | None = None
    elapsed: float | None = None  # seconds from the first send to the answer
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": _format_endpoint(self.server),
            "mapped": _format_endpoint(self.mapped) if self.mapped else None,
            "elapsed": None if self.elapsed is None else round(self.elapsed, 4),
            "error": self.error,
        }


@dataclass(frozen=True)
class NatReport:
    """What the agent reports: its public UDP endpoint and how its NAT maps it."""

    mapped: Endpoint | None  # the first server's answer (the next that answered if it did not)
    mapping: NatMapping
    results: tuple[ServerResult, ...]
    local: Endpoint | None = None

    @property
    def behind_nat(self) -> bool | None:
        """False when the servers saw our own address and port; None when we cannot tell."""
        if self.mapped is None or self.local is None or self.local[0] in ("0.0.0.0", "::"):
            return None
        return _same_endpoint(self.mapped, self.local) is False

    def as_dict(self) -> dict[str, Any]:
        return {
            "mapped": _format_endpoint(self.mapped) if self.mapped else None,
            "mapping": self.mapping.value,
            "local": _format_endpoint(self.local) if self.local else None,
            "results": [result.as_dict() for result in self.results],
        }


def binding_request(
    sock: socket.socket,
    server: Endpoint,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    *,
    rto: float = DEFAULT_RTO,
    on_unmatched: UnmatchedCallback | None = None,
) -> Endpoint:
    """The (ip, port) `server` saw `sock`'s request come from.

    Retransmits after rto, 2*rto, 4*rto ... (at most `retries` times) until `timeout`. Datagrams
    that are not this transaction's answer from this server go to `on_unmatched` (a peer's
    probe may arrive on the same socket) or are discarded. Raises StunTimeout, StunErrorResponse.
    """
    result = _transact(sock, [server], timeout, retries, rto, on_unmatched)[0]
    if result.mapped is not None:
        return result.mapped
    if isinstance(result.error, StunError):
        raise result.error
    raise StunTimeout(f"no STUN answer from {_format_endpoint(server)} within {timeout}s")


def classify_nat(
    sock: socket.socket,
    servers: Sequence[Endpoint],
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    *,
    rto: float = DEFAULT_RTO,
    on_unmatched: UnmatchedCallback | None = None,
) -> NatReport:
    """Ask every server at once from `sock` and compare what they saw.

    Same endpoint from two or more servers: endpoint-independent mapping (a cone NAT, or none).
    Different endpoints: endpoint-dependent ("symmetric"). Fewer than two answers: unknown. The
    servers should differ in address *and* port: a pair differing only in port cannot tell an
    address-dependent mapping from an independent one.
    """
    outcomes = _transact(sock, list(servers), timeout, retries, rto, on_unmatched)
    results = tuple(
        ServerResult(
            server=o.server,
            mapped=o.mapped,
            elapsed=o.elapsed,
            error=None if o.error is None else str(o.error),
        )
        for o in outcomes
    )
    answers = [r.mapped for r in results if r.mapped is not None]
    if len(answers) < 2:
        mapping = NatMapping.UNKNOWN
    elif all(_same_endpoint(answer, answers[0]) for answer in answers):
        mapping = NatMapping.ENDPOINT_INDEPENDENT
    else:
        mapping = NatMapping.ENDPOINT_DEPENDENT
    local = sock.getsockname()
    return NatReport(
        mapped=answers[0] if answers else None,
        mapping=mapping,
        results=results,
        local=(local[0], local[1]),
    )


@dataclass
class _Transaction:
    server: Endpoint
    target: tuple[Any, ...]
    transaction_id: bytes
    request: bytes
    first_sent: float | None = None
    mapped: Endpoint | None = None
    elapsed: float | None = None
    error: BaseException | None = None


def _transact(
    sock: socket.socket,
    servers: list[Endpoint],
    timeout: float,
    retries: int,
    rto: float,
    on_unmatched: UnmatchedCallback | None,
) -> list[_Transaction]:
    """Run one Binding transaction per server concurrently on `sock`, demultiplexed by
    transaction id, so one silent server costs the timeout once, not once per server."""
    pending: list[_Transaction] = []
    transactions: list[_Transaction] = []
    for server in servers:
        txid = new_transaction_id()
        transaction = _Transaction(server, (), txid, build_binding_request(txid))
        try:
            transaction.target = _resolve(server, sock.family)
        except OSError as exc:
            transaction.error = StunError(f"cannot resolve {server[0]}: {exc}")
        transactions.append(transaction)
        if transaction.error is None:
            pending.append(transaction)
    by_txid = {t.transaction_id: t for t in pending}
    with selectors.DefaultSelector() as selector:  # not select(): no FD_SETSIZE limit
        selector.register(sock, selectors.EVENT_READ)
        _exchange(sock, selector, pending, by_txid, timeout, retries, rto, on_unmatched)
    return transactions


def _exchange(
    sock: socket.socket,
    selector: selectors.BaseSelector,
    pending: list[_Transaction],
    by_txid: dict[bytes, _Transaction],
    timeout: float,
    retries: int,
    rto: float,
    on_unmatched: UnmatchedCallback | None,
) -> None:
    """Send, retransmit and match answers until every transaction is done or time is up."""
    start = time.monotonic()
    deadline = start + timeout
    sends = 0
    next_send = start
    interval = rto
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_send and sends <= retries:
            for transaction in pending:
                try:
                    sock.sendto(transaction.request, transaction.target)
                except OSError as exc:  # unreachable network: no point waiting for an answer
                    transaction.error = StunError(f"cannot send: {exc}")
                if transaction.first_sent is None:
                    transaction.first_sent = now
            pending = [t for t in pending if t.error is None]
            sends += 1
            next_send = now + interval
            interval *= 2
            continue
        wait_until = min(deadline, next_send) if sends <= retries else deadline
        if not selector.select(max(0.0, wait_until - now)):
            continue
        try:
            # A blocking socket must not hang here if another reader took what the selector saw.
            data, source = sock.recvfrom(65535, _DONTWAIT)
        except (BlockingIOError, InterruptedError, TimeoutError):
            continue
        except ConnectionError:  # an ICMP error reported on the socket (Windows)
            continue
        received = time.monotonic()
        transaction = by_txid.get(bytes(data[8:20])) if len(data) >= 20 else None
        if (
            transaction is None
            or transaction.mapped is not None
            or transaction.error is not None
            or not _same_endpoint(source, transaction.target)
        ):
            if on_unmatched is not None:
                on_unmatched(data, source)
            continue
        try:
            mapped = parse_binding_response(data, transaction.transaction_id)
        except StunError as exc:
            transaction.error = exc
        else:
            if mapped is None:
                if on_unmatched is not None:
                    on_unmatched(data, source)
                continue
            transaction.mapped = mapped
            transaction.elapsed = received - (transaction.first_sent or start)
        pending = [t for t in pending if t is not transaction]
    for transaction in pending:
        transaction.error = StunTimeout(f"no answer within {timeout}s")


def _resolve(server: Endpoint, family: int) -> tuple[Any, ...]:
    host, port = server
    if family == socket.AF_INET6:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv4Address):  # a dual-stack socket reaches IPv4 so
            return (f"::ffff:{address}", port, 0, 0)
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    return infos[0][4]


def _same_endpoint(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[1] == b[1] and _normal_ip(a[0]) == _normal_ip(b[0])


def _normal_ip(host: str) -> str:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _format_endpoint(endpoint: tuple[Any, ...]) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def parse_endpoint(text: str, default_port: int = 3478) -> Endpoint:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address, as a configuration value."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker_agent.stun SERVER SERVER`: this host's mapping, as JSON."""
    parser = argparse.ArgumentParser(prog="python -m worker_agent.stun", description=__doc__)
    parser.add_argument("servers", nargs="+", help="STUN servers, host[:port]")
    parser.add_argument("--bind", default="0.0.0.0:0", help="local address:port to send from")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    host, port = parse_endpoint(args.bind, 0)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        report = classify_nat(sock, [parse_endpoint(s) for s in args.servers], args.timeout)
    json.dump(report.as_dict(), sys.stdout)
    sys.stdout.write("\n")
    return 0 if report.mapped is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
