"""ICE (RFC 8445) with aioice: one attempt at a UDP path to a peer, LAN, direct or via TURN.

An attempt is one aioice `Connection` with one set of credentials. The two sides exchange their
credentials and candidates through the service (`ice_candidates`, trickle ICE: each side sends
once its gathering is done, and that ends its list). The side that asked for the introduction
controls (nominates). An attempt either comes up, with a nominated pair that says which kind of
path it is, or fails within its timeout; a new attempt is a new connection (an ICE restart).

Two policies: `all` gathers host candidates (every interface, IPv4 and IPv6) and a
server-reflexive one from the STUN server, for LAN and direct paths; `relay` gathers only a TURN
relay candidate. They run as separate attempts because aioice nominates the first pair that
answers and never moves: with TURN in the same attempt, the relay usually wins the race even
where a direct path exists (`/work/shared/p2p-notes.md`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aioice

from .. import wire
from ..errors import PeerError
from .kinds import host_pair_kind
from .portmap.candidate import mapped_candidate
from .portmap.manager import Mapping, PortMapper

logger = logging.getLogger("worker_agent.p2p")

# How long one attempt may take from its start to a nominated pair.
DEFAULT_TIMEOUT = 10.0
# Datagrams read in one go once the path's socket is readable (see `_Drain`).
DRAIN_MAX = 64
# Generic segmentation offload (Linux 4.18): one sendmsg() carries up to 64 datagrams of one
# size (the last may be shorter) and the kernel cuts them apart; Python has no constant for it.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
# Receive buffer asked for on the path's socket: a burst of a fast sender is queued, not dropped.
# The kernel grants at most net.core.rmem_max (Linux's default is 208 KiB).
RECEIVE_BUFFER = 4 * 1024 * 1024

Endpoint = tuple[str, int]
Signal = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class TurnServer:
    host: str
    port: int
    username: str
    password: str
    expires_at: int


class IceFailed(PeerError):
    pass


class _Connection(aioice.Connection):
    """aioice's connection, handing each datagram to `on_data` as it arrives instead of queueing
    it for `recv()`: one task wake-up less per datagram. `data_received` is what aioice's socket
    protocols call for every datagram that is not STUN (aioice 0.13, pinned in pyproject.toml;
    the ICE attempt in tests/test_p2p_unit.py carries datagrams through it). `recv()` still
    reports the end (ConnectionError) once the connection closes or loses consent."""

    on_data: Callable[[bytes], None] | None = None

    def data_received(self, data: bytes, component: int) -> None:
        if self.on_data is not None:
            self.on_data(data)
        else:
            super().data_received(data, component)


class IceAttempt:
    """One aioice connection to the peer. Runs on the peer loop; `datagram` gets what arrives."""

    def __init__(
        self,
        *,
        introduction_id: str,
        attempt: int,
        policy: wire.IcePolicy,
        controlling: bool,
        signal: Signal,
        datagram: Callable[[IceAttempt, bytes], None],
        stun_server: Endpoint | None = None,
        turn: TurnServer | None = None,
        use_ipv6: bool = True,
        port_mapper: PortMapper | None = None,
    ) -> None:
        self.introduction_id = introduction_id
        self.attempt = attempt
        self.policy = policy
        self._signal = signal
        relay = policy == wire.IcePolicy.RELAY
        self.connection = _Connection(
            ice_controlling=controlling,
            stun_server=None if relay else stun_server,
            turn_server=(turn.host, turn.port) if relay and turn else None,
            turn_username=turn.username if relay and turn else None,
            turn_password=turn.password if relay and turn else None,
            use_ipv6=use_ipv6,
            transport_policy=aioice.TransportPolicy.RELAY if relay else aioice.TransportPolicy.ALL,
        )
        self._datagram = datagram
        self._port_mapper = None if relay else port_mapper
        self.mapping: Mapping | None = None  # the gateway's mapping of this attempt's socket
        self._pair: Any = None  # the pair `settle` took, until aioice nominates one here
        self._drain: _Drain | None = None
        self.connection.on_data = self._on_data
        self._remote_known = asyncio.Event()
        self._receiver: asyncio.Task[None] | None = None
        self.kind: wire.PathKind | None = None
        self.remote: Endpoint | None = None
        self.local: Endpoint | None = None
        self.failure: str | None = None
        self.closed = asyncio.Event()
        self.started = time.monotonic()
        self.connected_after: float | None = None

    def __repr__(self) -> str:
        return f"<IceAttempt {self.policy}#{self.attempt} {self.kind or self.failure or '...'}>"

    async def run(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Gather, announce, check. True once a pair is nominated; False (and `failure`) if not."""
        try:
            await asyncio.wait_for(self._establish(), timeout)
        except asyncio.CancelledError:
            await self.close()
            raise
        except (TimeoutError, ConnectionError, OSError, ValueError, PeerError) as exc:
            self.failure = _describe(exc, timeout)
            logger.info(
                "introduction=%s ICE %s attempt %d failed: %s",
                self.introduction_id,
                self.policy,
                self.attempt,
                self.failure,
            )
            await self.close()
            return False
        self.connected_after = time.monotonic() - self.started
        self._receiver = asyncio.get_running_loop().create_task(self._receive())
        return True

    async def _establish(self) -> None:
        await self.connection.gather_candidates()
        candidates = [c.to_sdp() for c in self.connection.local_candidates]
        mapped = await self._mapped_candidate()
        if mapped is not None and mapped.to_sdp() not in candidates:
            candidates.insert(0, mapped.to_sdp())  # first: never the one cut at 16
        if not candidates:
            raise IceFailed(
                "no local candidates"
                + (" (the TURN server did not grant an allocation)" if self._relay else "")
            )
        sent = self._signal(
            wire.ice_candidates(
                introduction_id=self.introduction_id,
                attempt=self.attempt,
                policy=self.policy,
                ufrag=self.connection.local_username,
                pwd=self.connection.local_password,
                candidates=candidates[:16],
                done=True,
            )
        )
        if not sent:
            raise IceFailed("not connected to the rendezvous service")
        await self._remote_known.wait()
        await self.connection.connect()
        if not self.settle():
            raise IceFailed("ICE completed without a nominated pair")

    async def _mapped_candidate(self) -> aioice.Candidate | None:
        """The gateway's mapping of this attempt's IPv4 host socket, as a candidate. The peer's
        checks to it reach the host socket through the mapping, and replies leave through the
        same mapping, so they carry the mapped address even behind a symmetric NAT."""
        if self._port_mapper is None:
            return None
        for local in self.connection.local_candidates:
            if local.type != "host" or ":" in local.host:
                continue
            mapping = await self._port_mapper.map(local.host, local.port)
            if mapping is None:
                continue
            self.mapping = mapping
            return mapped_candidate(mapping, local)
        return None

    def settle(self) -> bool:
        """Take the nominated pair as this attempt's route, if there is one yet.

        The controlled side may see the peer's datagrams before its own check list completes:
        the controlling side nominated a pair as soon as one of its checks was answered, while
        this side's check on that pair may have been dropped by the peer's NAT (it had not sent
        there yet) and is retried only after aioice's retransmission timeout (500 ms, then
        more). A pair the peer nominated with a check that arrived here is a working 5-tuple
        both ways (the peer just sent on it): it is the route until ours completes."""
        if self.kind is not None:
            return True
        if self.closed.is_set():
            return False
        pair = _nominated(self.connection) or _nominated_by_peer(self.connection)
        if pair is None:
            return False
        self._pair = pair
        self._drain = _Drain.of(pair)
        local, remote = pair.local_candidate, pair.remote_candidate
        self.local = (local.host, local.port)
        self.remote = pair.remote_addr
        if self._relay or "relay" in (local.type, remote.type):
            self.kind = wire.PathKind.TURN
        elif local.type == "host" and remote.type == "host":
            self.kind = host_pair_kind(local.host, remote.host)  # global IPv6 is not a LAN
        else:
            self.kind = wire.PathKind.DIRECT
        return True

    @property
    def _relay(self) -> bool:
        return self.policy == wire.IcePolicy.RELAY

    async def remote_candidates(self, message: dict[str, Any]) -> None:
        """The peer's credentials and candidates for this attempt (from the service)."""
        if self.closed.is_set():
            return
        connection = self.connection
        connection.remote_username = message["ufrag"]
        connection.remote_password = message["pwd"]
        for text in message.get("candidates") or []:
            try:
                await connection.add_remote_candidate(aioice.Candidate.from_sdp(text))
            except ValueError as exc:  # validated by the service; still, never trust the wire
                logger.debug("introduction=%s bad remote candidate: %s", self.introduction_id, exc)
        if message.get("done"):
            with contextlib.suppress(ValueError):  # end-of-candidates twice
                await connection.add_remote_candidate(None)
        self._remote_known.set()

    def send(self, data: bytes) -> None:
        """Send one datagram on the nominated pair (on the loop; never blocks)."""
        pair = _nominated(self.connection) or self._pair
        if pair is None or self.closed.is_set():
            return
        pair.protocol.transport.sendto(data, pair.remote_addr)

    def send_many(self, datagrams: list[bytes]) -> None:
        """Send a burst in order: runs of one size in one segmented send where the kernel can
        (a direct or LAN pair: GSO); one by one otherwise (TURN frames each datagram)."""
        pair = _nominated(self.connection) or self._pair
        if pair is None or self.closed.is_set():
            return
        transport, address = pair.protocol.transport, pair.remote_addr
        drain = self._drain
        if drain is None or not drain.segments(pair.protocol, transport):
            for data in datagrams:
                transport.sendto(data, address)
            return
        for run in _runs(datagrams):
            if len(run) == 1 or not drain.send_segmented(run, address):
                for data in run:
                    transport.sendto(data, address)

    def _on_data(self, data: bytes) -> None:
        self._datagram(self, data)
        if self._drain is not None:
            self._drain.read_more()

    async def _receive(self) -> None:
        """Datagrams go to `datagram` as they arrive (`_Connection`): this waits for the end."""
        try:
            while True:
                await self.connection.recv()
        except ConnectionError:
            pass  # closed here, or consent to send expired (the peer is gone from this path)
        except asyncio.CancelledError:
            raise
        finally:
            self.closed.set()

    async def close(self) -> None:
        if self._receiver is not None and self._receiver is not asyncio.current_task():
            self._receiver.cancel()
        self.closed.set()
        if self.mapping is not None and self._port_mapper is not None:
            mapping, self.mapping = self.mapping, None
            await self._port_mapper.release(mapping)
        if self._drain is not None:
            self._drain.close()
            self._drain = None
        with contextlib.suppress(Exception):
            await self.connection.close()


class _Drain:
    """Reads every datagram waiting on the path's socket once asyncio reported one.

    asyncio reads one datagram per turn of the loop, and a turn costs a poll of the sockets:
    at tens of thousands of datagrams a second that is most of a peer's CPU, and the reason a
    fast sender overruns the receiver. This reads the rest of what is queued through a duplicate
    of the socket (`TransportSocket.dup()`, public) and hands each datagram to the same aioice
    protocol asyncio would, so STUN (consent checks) and TURN framing are handled as before.

    For a TURN pair the socket is the one under aioice's TURN transport, which aioice keeps
    private (`TurnTransport.__inner_protocol`, aioice 0.13, pinned; tests/test_p2p_unit.py
    checks it); without it that pair is read one datagram per turn, as before.
    """

    def __init__(
        self, sock: socket.socket, protocol: asyncio.DatagramProtocol, *, turn: bool = False
    ) -> None:
        self._socket = sock
        self._protocol = protocol
        self._reading = False
        self.gso = not turn and hasattr(sock, "sendmsg")  # until the kernel says otherwise

    @classmethod
    def of(cls, pair: Any) -> _Drain | None:
        if pair is None:
            return None
        protocol, transport = pair.protocol, pair.protocol.transport
        inner = getattr(transport, "_TurnTransport__inner_protocol", None)
        if inner is not None:  # a TURN pair: the socket is the TURN client's
            protocol, transport = inner, inner.transport
        wrapped = transport.get_extra_info("socket") if transport is not None else None
        if wrapped is None:
            return None
        try:
            wrapped.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock = wrapped.dup()
        except OSError as exc:
            logger.debug("path socket not read in batches: %s", exc)
            return None
        sock.setblocking(False)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < RECEIVE_BUFFER:  # Linux reports twice what it grants
            logger.debug(
                "the path socket's receive buffer is %d bytes (net.core.rmem_max caps it); "
                "a fast peer may overrun it",
                granted,
            )
        return cls(sock, protocol, turn=inner is not None)

    def segments(self, protocol: Any, transport: Any) -> bool:
        """Whether a burst for this pair may go out segmented now: GSO works here, the pair
        sends from this socket, and asyncio holds nothing unsent for it (that would reorder)."""
        return self.gso and protocol is self._protocol and not transport.get_write_buffer_size()

    def send_segmented(self, run: list[bytes], address: tuple[str, int]) -> bool:
        """One sendmsg() for datagrams of one size (the last may be shorter). False when it
        did not go: the caller sends them one by one."""
        try:
            self._socket.sendmsg(
                [b"".join(run)],
                [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0])))],
                0,
                address,
            )
        except (BlockingIOError, InterruptedError):
            return False  # the socket is full: asyncio queues them
        except OSError as exc:  # no GSO on this kernel or device: never again on this socket
            logger.debug("segmented sends off for this path: %s", exc)
            self.gso = False
            return False
        return True

    def read_more(self) -> None:
        if self._reading:
            return  # this datagram came from our own read below
        self._reading = True
        try:
            for _ in range(DRAIN_MAX):
                try:
                    data, address = self._socket.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # an ICMP error for an earlier send, or closed
                    self._protocol.error_received(exc)
                    return
                self._protocol.datagram_received(data, address)
        finally:
            self._reading = False

    def close(self) -> None:
        self._socket.close()


def _runs(datagrams: list[bytes]) -> list[list[bytes]]:
    """Consecutive datagrams cut into runs one segmented send can carry: the size of the first,
    the last one of a run possibly shorter, at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES."""
    runs: list[list[bytes]] = []
    run: list[bytes] = []
    size = total = 0
    for data in datagrams:
        if run and (
            len(data) > size
            or len(run[-1]) < size
            or len(run) == GSO_MAX_SEGMENTS
            or total + len(data) > GSO_MAX_BYTES
        ):
            runs.append(run)
            run = []
        if not run:
            size, total = len(data), 0
        run.append(data)
        total += len(data)
    if run:
        runs.append(run)
    return runs


def _nominated(connection: aioice.Connection) -> Any:
    """The nominated candidate pair of component 1, or None. aioice has no public accessor:
    this reads `_nominated` (aioice 0.13, pinned in pyproject.toml; tests/test_p2p_unit.py checks
    it)."""
    return connection._nominated.get(1)


def _nominated_by_peer(connection: aioice.Connection) -> Any:
    """On the controlled side, the best pair the controlling peer nominated with a check that
    arrived here, or None. aioice keeps it private: `_check_list` (sorted best first) and each
    pair's `remote_nominated` (aioice 0.13, pinned in pyproject.toml; tests/test_p2p_unit.py
    checks both)."""
    if connection.ice_controlling:
        return None
    for pair in connection._check_list:
        if pair.remote_nominated and pair.state != aioice.ice.CandidatePair.State.FAILED:
            return pair
    return None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no working candidate pair within {timeout:g}s"
    text = str(exc) or type(exc).__name__
    if "401" in text or "Unauthorized" in text:
        return f"the TURN server refused the credentials ({text}): expired?"
    return text
