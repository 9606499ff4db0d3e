"""UDP hole punching between two workers that the rendezvous service has introduced.

Each side punches from the socket it used for STUN, because that socket's NAT mapping is the
public endpoint the service announced to the other side. From the common start time both sides
send probes to every candidate endpoint of the peer. An outbound probe opens a hole in the
sender's own NAT; the first probe that arrives from the peer shows the address its NAT really
uses, which can differ from the announced one (a symmetric NAT facing a full cone), so probes
are answered, and later probes also sent, to that address. A path is established only when an
ACK arrives: a probe from the peer proves that inbound traffic gets through, but only an ACK
proves that our own probes reach the peer.

Wire format: every control datagram is 49 bytes, in network byte order::

    offset  size  field
    0       4     magic b"RZP1"
    4       1     kind: 1 = PROBE, 2 = ACK
    5       16    introduction id (its 32 hex digits as raw bytes)
    21      8     sender tag: sha256(sender's worker id as UTF-8)[:8]
    29      4     sequence number (an ACK echoes the sequence of the probe it answers)
    33      16    HMAC-SHA256 under the introduction's key over bytes 0-32, truncated to 16

A datagram counts only if its length, magic and kind are right, the introduction id is ours,
the MAC verifies and the sender tag is the peer's: a copy of our own probe reflected back
carries our tag and does not count. Everything else is dropped and counted; no input raises.

The MAC shows that a holder of the introduction's key built the datagram, nothing more: an
on-path attacker can replay one, and data sent over the punched path is neither authenticated
nor encrypted, which the host program's own protocol has to provide.

Standard library only, so the agent installs without the service.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

MAGIC = b"RZP1"
MAC_LENGTH = 16
_HEADER = struct.Struct("!4sB16s8sI")
DATAGRAM_LENGTH = _HEADER.size + MAC_LENGTH
KEY_LENGTH = 32
# ACKs sent once the path works, so a peer whose own ACK was lost can still finish.
EXTRA_ACKS = 3
# Datagrams read per wake-up: a flood of junk cannot hold back our own probes for long.
_DRAIN_LIMIT = 64
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_INTRODUCTION_ID = re.compile(r"[0-9a-f]{32}")
_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Endpoint = tuple[str, int]
SockAddr = tuple[Any, ...]


class Kind(enum.IntEnum):
    PROBE = 1
    ACK = 2


class Drop(enum.StrEnum):
    """Why a datagram received while punching was ignored."""

    MALFORMED = "malformed"
    OTHER_INTRODUCTION = "other introduction"
    BAD_MAC = "bad MAC"
    REFLECTED = "our own, reflected"
    UNKNOWN_SENDER = "unknown sender"


class PunchError(Exception):
    """Hole punching produced no path to the peer."""


class PunchTimeout(PunchError, TimeoutError):
    """No ACK from the peer before the deadline; the message says what was sent and seen."""

    def __init__(
        self,
        message: str,
        *,
        probes_sent: int,
        endpoints: tuple[Endpoint, ...],
        probes_received: int,
        dropped: dict[Drop, int],
    ) -> None:
        super().__init__(message)
        self.probes_sent = probes_sent
        self.endpoints = endpoints
        self.probes_received = probes_received
        self.dropped = dropped


@dataclass(frozen=True)
class Introduction:
    """What the service tells one side about the other; both sides share the id, key and start."""

    introduction_id: str
    my_id: str
    peer_id: str
    peer_endpoints: tuple[Endpoint, ...]
    key: bytes = field(repr=False)
    start_at: float

    def __post_init__(self) -> None:
        if not _INTRODUCTION_ID.fullmatch(self.introduction_id):
            raise ValueError("introduction_id must be 32 lowercase hex digits")
        for name in ("my_id", "peer_id"):
            if not _WORKER_ID.fullmatch(getattr(self, name)):
                raise ValueError(f"{name} is not a valid worker id")
        if self.my_id == self.peer_id:
            raise ValueError("my_id and peer_id must differ: the sender tag tells them apart")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LENGTH:
            raise ValueError(f"key must be {KEY_LENGTH} bytes")
        endpoints = tuple((str(host), port) for host, port in self.peer_endpoints)
        for host, port in endpoints:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address literal") from None
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{port!r} is not a UDP port")
        object.__setattr__(self, "peer_endpoints", endpoints)


class ControlDatagram(NamedTuple):
    kind: Kind
    sender_tag: bytes
    sequence: int


def sender_tag(worker_id: str) -> bytes:
    return hashlib.sha256(worker_id.encode()).digest()[:8]


def build_datagram(
    kind: Kind, *, introduction_id: str, sender_id: str, sequence: int, key: bytes
) -> bytes:
    header = _HEADER.pack(
        MAGIC,
        kind,
        bytes.fromhex(introduction_id),
        sender_tag(sender_id),
        sequence & 0xFFFFFFFF,
    )
    return header + _mac(key, header)


def parse_datagram(data: bytes, *, introduction_id: str, key: bytes) -> ControlDatagram | None:
    """The control datagram in `data` if it belongs to this introduction and its MAC verifies.

    Says nothing about who sent it: compare `sender_tag` with the expected one.
    """
    parsed = _parse(data, bytes.fromhex(introduction_id), key)
    return parsed if isinstance(parsed, ControlDatagram) else None


def punch(
    sock: socket.socket,
    intro: Introduction,
    *,
    timeout: float = 5.0,
    interval: float = 0.05,
    clock: Callable[[], float] = time.time,
) -> PeerPath:
    """Punch a UDP path to the introduced peer from `sock`, which must be bound already.

    Waits until `intro.start_at` (on `clock`), probes until an ACK arrives or until
    `start_at + timeout`, then connects `sock` to the peer and hands it to the PeerPath.
    Raises PunchTimeout on failure and leaves `sock` open and unconnected.
    """
    if timeout <= 0 or interval <= 0:
        raise ValueError("timeout and interval must be positive")
    session = _Session(sock, intro)
    # Wall-clock time only places the start; waiting runs on the monotonic clock.
    start = time.monotonic() + (intro.start_at - clock())
    deadline = start + timeout
    if time.monotonic() >= deadline:
        raise session.timeout_error(timeout, expired=True)
    while (remaining := start - time.monotonic()) > 0:
        time.sleep(remaining)
    peer: SockAddr | None = None
    with selectors.DefaultSelector() as selector:  # not select(): no FD_SETSIZE limit
        selector.register(sock, selectors.EVENT_READ)
        next_probe = time.monotonic()
        while peer is None:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_probe:
                session.send_probes()
                next_probe += interval
                if next_probe <= now:  # fell behind: no burst of catch-up probes
                    next_probe = now + interval
            if selector.select(max(0.0, min(next_probe, deadline) - now)):
                peer = session.drain()
    if peer is None:
        raise session.timeout_error(timeout)
    for _ in range(EXTRA_ACKS):
        session.send_ack(peer)
    sock.connect(peer)
    path = PeerPath(sock, intro, peer)
    log.info(
        "punched a path to %s at %s from %s (introduction %s, %d probes sent)",
        intro.peer_id,
        _format(path.peer_address),
        _format(path.local_address),
        intro.introduction_id,
        session.probes_sent,
    )
    return path


class PeerPath:
    """A datagram path to the peer over the punched socket, which it now owns."""

    def __init__(self, sock: socket.socket, intro: Introduction, peer: SockAddr) -> None:
        self.peer_id = intro.peer_id
        self.peer_address: Endpoint = _endpoint(peer)
        self._sock = sock
        self._intro = intro
        self._introduction_raw = bytes.fromhex(intro.introduction_id)
        self._my_tag = sender_tag(intro.my_id)
        self._peer_tag = sender_tag(intro.peer_id)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)

    @property
    def local_address(self) -> Endpoint:
        return _endpoint(self._sock.getsockname())

    def send(self, data: bytes) -> None:
        """Send one datagram to the peer. Control-shaped data is refused: the peer would drop it."""
        if _looks_like_control(data):
            raise ValueError(
                f"a {DATAGRAM_LENGTH}-byte datagram starting with {MAGIC!r} "
                "would be taken for a control datagram"
            )
        try:
            self._sock.send(data)
        except ConnectionRefusedError:
            # An ICMP error left by an earlier datagram (a probe to a dead candidate) is
            # reported once, on the next call, and this datagram was not sent.
            self._sock.send(data)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next data datagram from the peer; raises TimeoutError after `timeout` seconds.

        Control datagrams are never returned: a late probe is answered with an ACK so the peer
        can still finish punching. A peer whose port is closed shows up as a timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._selector.select(remaining):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no datagram from {self.peer_id} within {timeout}s")
                continue
            try:
                data, source = self._sock.recvfrom(65535, _DONTWAIT)
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                continue
            if _endpoint(source) != self.peer_address:  # queued before the connect
                continue
            if not _looks_like_control(data):
                return data
            control = _classify(
                data, self._introduction_raw, self._intro.key, self._my_tag, self._peer_tag
            )
            if isinstance(control, ControlDatagram) and control.kind is Kind.PROBE:
                ack = _build(self._intro, Kind.ACK, control.sequence)
                try:
                    self._sock.send(ack)
                except OSError:
                    log.debug("could not answer a late probe from %s", self.peer_id)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._selector.close()
        self._sock.close()

    def __enter__(self) -> PeerPath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PeerPath(peer_id={self.peer_id!r}, peer_address={self.peer_address!r})"


class _Session:
    """One side's punching state: where probes go, what came back, what was dropped."""

    def __init__(self, sock: socket.socket, intro: Introduction) -> None:
        self.sock = sock
        self.intro = intro
        self.introduction_raw = bytes.fromhex(intro.introduction_id)
        self.my_tag = sender_tag(intro.my_id)
        self.peer_tag = sender_tag(intro.peer_id)
        self.targets: dict[Endpoint, SockAddr] = {}
        self.unusable: list[Endpoint] = []
        for endpoint in intro.peer_endpoints:
            sockaddr = _sockaddr(endpoint, sock.family)
            if sockaddr is None:
                self.unusable.append(endpoint)
            else:
                self.targets.setdefault(_endpoint(sockaddr), sockaddr)
        self.sequence = 0
        self.probes_sent = 0
        self.send_errors = 0
        self.probes_received = 0
        self.last_probe_sequence = 0
        self.probe_sources: list[Endpoint] = []
        self.dropped: Counter[Drop] = Counter()

    def send_probes(self) -> None:
        probe = _build(self.intro, Kind.PROBE, self.sequence)
        self.sequence += 1
        for sockaddr in self.targets.values():
            try:
                self.sock.sendto(probe, sockaddr)
            except OSError:  # unreachable network, wrong family, a local firewall
                self.send_errors += 1
            else:
                self.probes_sent += 1

    def send_ack(self, sockaddr: SockAddr) -> None:
        try:
            self.sock.sendto(_build(self.intro, Kind.ACK, self.last_probe_sequence), sockaddr)
        except OSError:
            self.send_errors += 1

    def drain(self) -> SockAddr | None:
        """Handle what is waiting on the socket; the peer's address once an ACK arrives."""
        for _ in range(_DRAIN_LIMIT):
            try:
                data, source = self.sock.recvfrom(65535, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionError:  # Windows reports ICMP errors from dead candidates here
                continue
            control = _classify(
                data, self.introduction_raw, self.intro.key, self.my_tag, self.peer_tag
            )
            if isinstance(control, Drop):
                self.dropped[control] += 1
            elif control.kind is Kind.ACK:
                return source
            else:
                self.probes_received += 1
                self.last_probe_sequence = control.sequence
                endpoint = _endpoint(source)
                if endpoint not in self.targets:  # the peer's real address: probe it too
                    self.targets[endpoint] = source
                if endpoint not in self.probe_sources:
                    self.probe_sources.append(endpoint)
                self.send_ack(source)
        return None

    def timeout_error(self, timeout: float, *, expired: bool = False) -> PunchTimeout:
        peer = self.intro.peer_id
        endpoints = ", ".join(_format(e) for e in self.targets) or "no usable endpoint"
        parts = [
            f"no path to {peer} within {timeout:g}s (introduction {self.intro.introduction_id})"
        ]
        if expired:
            parts.append(
                "the window (start_at + timeout) had already ended when punching was asked for: "
                "the introduction arrived late or this clock is ahead"
            )
        parts.append(f"sent {self.probes_sent} probes to {endpoints}")
        if self.send_errors:
            parts.append(f"{self.send_errors} sends failed")
        if self.unusable:
            skipped = ", ".join(_format(e) for e in self.unusable)
            parts.append(f"skipped {skipped} (address family differs from the socket's)")
        if self.probes_received:
            sources = ", ".join(_format(e) for e in self.probe_sources)
            parts.append(
                f"{self.probes_received} valid probes from {peer} arrived (from {sources}) and "
                f"were acknowledged, but no ACK came back: our probes are not reaching {peer} "
                "or its ACKs are dropped"
            )
        elif not expired:
            parts.append(f"no probe from {peer} arrived: a NAT or firewall is dropping them")
        if self.dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
            parts.append(f"dropped {self.dropped.total()} invalid datagrams ({reasons})")
        return PunchTimeout(
            "; ".join(parts),
            probes_sent=self.probes_sent,
            endpoints=tuple(self.targets),
            probes_received=self.probes_received,
            dropped=dict(self.dropped),
        )


def _build(intro: Introduction, kind: Kind, sequence: int) -> bytes:
    return build_datagram(
        kind,
        introduction_id=intro.introduction_id,
        sender_id=intro.my_id,
        sequence=sequence,
        key=intro.key,
    )


def _mac(key: bytes, header: bytes) -> bytes:
    return hmac.new(key, header, hashlib.sha256).digest()[:MAC_LENGTH]


def _looks_like_control(data: bytes) -> bool:
    return len(data) == DATAGRAM_LENGTH and data.startswith(MAGIC)


def _parse(data: bytes, introduction_raw: bytes, key: bytes) -> ControlDatagram | Drop:
    if not _looks_like_control(data):
        return Drop.MALFORMED
    _, kind, introduction, tag, sequence = _HEADER.unpack_from(data)
    if kind not in (Kind.PROBE, Kind.ACK):
        return Drop.MALFORMED
    if introduction != introduction_raw:
        return Drop.OTHER_INTRODUCTION
    if not hmac.compare_digest(data[_HEADER.size :], _mac(key, data[: _HEADER.size])):
        return Drop.BAD_MAC
    return ControlDatagram(Kind(kind), tag, sequence)


def _classify(
    data: bytes, introduction_raw: bytes, key: bytes, my_tag: bytes, peer_tag: bytes
) -> ControlDatagram | Drop:
    parsed = _parse(data, introduction_raw, key)
    if isinstance(parsed, Drop) or parsed.sender_tag == peer_tag:
        return parsed
    return Drop.REFLECTED if parsed.sender_tag == my_tag else Drop.UNKNOWN_SENDER


def _sockaddr(endpoint: Endpoint, family: int) -> SockAddr | None:
    """`endpoint` as `sendto` wants it on a socket of `family`; None if it cannot reach it."""
    host, port = endpoint
    address = ipaddress.ip_address(host)
    if family == socket.AF_INET:
        return (str(address), port) if address.version == 4 else None
    if family != socket.AF_INET6:
        return None
    if isinstance(address, ipaddress.IPv4Address):  # a dual-stack socket reaches IPv4 so
        return (f"::ffff:{address}", port, 0, 0)
    scope = address.scope_id
    if not scope:
        return (str(address), port, 0, 0)
    try:  # a tuple's scope id overrides the "%scope" text, so it must be given as a number
        index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
    except OSError:
        return None
    return (str(address).split("%", 1)[0], port, 0, index)


def _endpoint(sockaddr: SockAddr) -> Endpoint:
    """(ip, port) with IPv4-mapped IPv6 shown as plain IPv4, for comparing and reporting."""
    host, port = sockaddr[0], sockaddr[1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped), port
    return str(address), port


def _format(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
