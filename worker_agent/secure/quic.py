"""QUIC (aioquic) over a PeerPath: encrypted, mutually authenticated streams and datagrams.

aioquic is sans-IO: every datagram from the path goes to `receive_datagram`, everything from
`datagrams_to_send` goes out on the path, and `get_timer` / `handle_timer` drive it. The peer's
address is a constant placeholder: the path below owns addressing, so its route can change
(relay to direct) under a running connection without QUIC ever seeing a migration.

Both sides pin the other's certificate, the one the service introduced: the initiator (QUIC
client) trusts only that certificate (`cadata`), and both compare the certificate the peer
proved possession of with the pin once the handshake completes, before any data is taken. A
peer presenting any other certificate is refused, in both directions.

Everything this session needs of aioquic's private parts (the pin's certificate, congestion
control reset on a route move, what is unacknowledged, the round trip, PINGs answered at once)
goes through `pinned.PinnedConnection`, where each is listed and tests/test_quic.py checks it.
The pacer (`_loss._pacer`) is replaced by pacing.py's, which lets a burst carry what the loop's
timers can space.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import ssl
import time
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509

from .. import wire
from ..errors import HandshakeFailed, PeerClosed, PeerError, StreamReset
from ..paths.path import RANK, PeerPath
from . import identity
from .pings import Pings
from .pinned import CLOSE_IDENTITY, STREAM_WINDOW, PinnedConnection, pin_check, pin_failure
from .streams import StreamBuffer

logger = logging.getLogger("worker_agent.p2p")

ALPN = "rendezvous/1"
PLACEHOLDER = ("peer", 0)  # the path routes; QUIC never sees an address change
IDLE_TIMEOUT = 30.0  # seconds without anything from the peer before the connection is dead
KEEPALIVE = 10.0  # a PING after this long without sending, so a quiet connection stays up
CONNECTION_WINDOW = 16 * 1024 * 1024
SEND_WINDOW = 2 * 1024 * 1024  # bytes written to a stream and not yet acknowledged, at most
WRITE_CHUNK = 256 * 1024
# QUIC packets on the path: above QUIC's floor of 1,200 bytes, below what an IPv4 or IPv6 path
# with a TURN header or a tunnel still carries without fragments (1,500 - IP, UDP, TURN headers).
MAX_PACKET = 1350
CONGESTION_CONTROL = "cubic"  # aioquic's choices: "reno", "cubic"
MAX_QUEUED_DATAGRAMS = 1024
CID_LENGTH = 8  # aioquic's default connection id length
CLOSE_NORMAL = 0  # application close codes (QUIC application error space); pinned.py has more

_EOF = object()


class QuicSession:
    """One QUIC connection over one path, run on the agent's peer loop."""

    def __init__(
        self,
        *,
        path: PeerPath,
        own: identity.WorkerIdentity,
        peer_certificate: x509.Certificate,
        client: bool,
    ) -> None:
        self.path = path
        self.client = client
        self.expected = identity.fingerprint(identity.to_der(peer_certificate))
        configuration = QuicConfiguration(
            is_client=client,
            alpn_protocols=[ALPN],
            idle_timeout=IDLE_TIMEOUT,
            max_datagram_frame_size=65536,
            max_data=CONNECTION_WINDOW,
            max_stream_data=STREAM_WINDOW,
            max_datagram_size=MAX_PACKET,
            congestion_control_algorithm=CONGESTION_CONTROL,
            server_name=identity.SERVER_NAME if client else None,
            verify_mode=ssl.CERT_REQUIRED if client else ssl.CERT_NONE,
            cadata=identity.to_pem(peer_certificate) if client else None,
        )
        configuration.certificate = own.certificate
        configuration.private_key = own.private_key
        self._configuration = configuration
        self.consumed: dict[int, int] = {}
        # A server's connection is made from the client's first packet (its connection id).
        self.quic: PinnedConnection | None = (
            PinnedConnection(configuration=configuration, consumed=self.consumed)
            if client
            else None
        )
        self.streams: dict[int, StreamBuffer] = {}
        self._fed: set[StreamBuffer] = set()  # buffers with data their reader has not heard of
        self.incoming: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # peer-opened ids
        self.datagrams: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued_datagrams = 0
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake_started = time.monotonic()
        self.handshake_seconds: float | None = None
        self.peer_fingerprint: str | None = None
        self.closed_reason: str | None = None
        self.on_closed: Callable[[QuicSession], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transmit_scheduled = False
        self._progress = asyncio.Event()
        self._last_sent = time.monotonic()
        self._keepalive: asyncio.Task[None] | None = None
        self._connected = False  # the client sent its first packet
        self._pings = Pings()
        self._stopped: dict[int, int] = {}  # streams the peer asked us to stop sending on: code

    # ---- the path below ----------------------------------------------------------------------

    def start(self) -> None:
        self.path.set_datagram_handler(self.datagram_received)
        self.path.on_change(self._route_moved)
        self.path.expecting = self._awaiting_acknowledgements
        self.path.watch.start()
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())
        if self.quic is None:
            return  # the server: it starts with the client's first packet
        if self.path.kind is not None:
            self._connect()
        else:  # no relay: the first packet goes out once ICE has a route, not into the void
            self.path.on_change(self._route_up)

    def _route_up(self, path: PeerPath, old: str | None, new: str | None) -> None:
        if new is not None and self.closed_reason is None and not self._connected:
            self._connect()

    def _route_moved(self, path: PeerPath, old: str | None, new: str | None) -> None:
        """The packets take another route now (the relay, then the LAN, say; or the relay again
        after an outage of the service): a new network path, for which QUIC starts its
        congestion control afresh (RFC 9000, 9.4). aioquic does not see the move (the address
        below it stays the same), so it is done here; otherwise the window CUBIC shrank on the
        relay's losses grows back on the direct path at the pace of the relay's. A move down,
        or back from no route at all, also probes at once: what was in flight is gone, and
        waiting for the probe timeout, doubled by every silent second, would stall the
        connection for as long again."""
        if new is None or old == new or self.quic is None:
            return
        self.quic.new_network_path(
            CONGESTION_CONTROL, MAX_PACKET, probe=old is None or _rank(new) < _rank(old)
        )
        self.transmit()

    def _awaiting_acknowledgements(self) -> bool:
        """Whether the peer owes this side an answer: packets in flight, not yet acknowledged."""
        return self.quic is not None and self.quic.in_flight() > 0

    def _connect(self) -> None:
        assert self.quic is not None
        self._connected = True
        self.handshake_started = time.monotonic()
        self.quic.connect(PLACEHOLDER, now=self.handshake_started)
        self.transmit()

    def datagram_received(self, data: bytes) -> None:
        if self.closed_reason is not None:
            return
        if self.quic is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:
                return  # not a QUIC packet: garbage on the path
            if header.packet_type != QuicPacketType.INITIAL:
                return
            self.quic = PinnedConnection(
                configuration=self._configuration,
                consumed=self.consumed,
                original_destination_connection_id=header.destination_cid,
            )
        arrived = time.monotonic()
        self.quic.receive_datagram(data, PLACEHOLDER, now=arrived)
        self._process_events(arrived)
        # Once for everything that arrived in this turn of the loop: one round of ACKs and
        # sends for a burst of datagrams, not one per datagram.
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            asyncio.get_running_loop().call_soon(self.transmit)

    def transmit(self) -> None:
        self._transmit_scheduled = False
        while self._fed:
            self._fed.pop().wake()
        if self.quic is None:
            return
        now = time.monotonic()
        datagrams = [data for data, _ in self.quic.datagrams_to_send(now=now)]
        if datagrams:
            self.path.send_many_nowait(datagrams)
            self._last_sent = now
            if self._pings and not self.quic.pings_pending():
                self._pings.sent(time.monotonic())
        self._arm_timer()
        self._wake_writers()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.quic is not None
        when = self.quic.get_timer()
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.quic is None:
            return
        self.quic.handle_timer(now=time.monotonic())
        self._process_events()
        self.transmit()

    async def _keep_alive(self) -> None:
        while self.closed_reason is None:
            await asyncio.sleep(KEEPALIVE / 2)
            if (
                self.quic is not None
                and time.monotonic() - self._last_sent > KEEPALIVE
                and self.handshake.done()
            ):
                uid, _ = self._pings.new()  # timed too: the latest round trip, when quiet
                self.quic.send_ping(uid)
                self.transmit()

    # ---- events ----------------------------------------------------------------------------

    def _process_events(self, arrived: float | None = None) -> None:
        """What aioquic made of what arrived (`arrived`: when the datagram did)."""
        assert self.quic is not None
        while (event := self.quic.next_event()) is not None:
            if self.closed_reason is not None and not isinstance(
                event, events.ConnectionTerminated
            ):
                continue  # refused (pin), or closed: nothing more is taken from this peer
            if isinstance(event, events.HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, events.StreamDataReceived):
                buffer = self._stream(event.stream_id)
                buffer.feed(event.data, event.end_stream)
                self._fed.add(buffer)
            elif isinstance(event, events.DatagramFrameReceived):
                if self._queued_datagrams < MAX_QUEUED_DATAGRAMS:
                    self._queued_datagrams += 1
                    self.datagrams.put(event.data)
            elif isinstance(event, events.StreamReset):
                self._stream(event.stream_id).fail(
                    StreamReset(f"the peer reset the stream (code {event.error_code})")
                )
            elif isinstance(event, events.StopSendingReceived):
                self._stopped[event.stream_id] = event.error_code
                self._wake_writers()
            elif isinstance(event, events.PingAcknowledged):
                self._pings.answered(event.uid, arrived or time.monotonic(), self.path.last_kind)
            elif isinstance(event, events.ConnectionTerminated):
                self._terminated(event)

    def _handshake_completed(self) -> None:
        assert self.quic is not None
        presented, refusal = pin_check(self.quic, self.expected, self.path.peer_id)
        if refusal is not None:
            logger.warning("%s; closing", refusal)
            self._fail_handshake(refusal)
            self.close(str(refusal), code=CLOSE_IDENTITY)
            return
        self.peer_fingerprint = presented
        self.handshake_seconds = time.monotonic() - self.handshake_started
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _terminated(self, event: events.ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"QUIC error {event.error_code:#x}"
        mismatch = pin_failure(event.error_code, reason, self.path.peer_id)
        if mismatch is not None:
            self._fail_handshake(mismatch)
        self._closed(reason)

    def _fail_handshake(self, error: PeerError) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
            self.handshake.exception()  # retrieved: no "never retrieved" warning

    def _closed(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._fail_handshake(HandshakeFailed(f"connection closed: {reason}"))
        error = PeerClosed(f"connection to {self.path.peer_id} closed: {self.closed_reason}")
        for buffer in self.streams.values():
            buffer.fail(error)
        self.incoming.put(None)
        self.datagrams.put(None)
        if self._timer is not None:
            self._timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._pings.fail(error)
        self._wake_writers()
        if self.on_closed is not None:
            self.on_closed(self)

    def _stream(self, stream_id: int) -> StreamBuffer:
        buffer = self.streams.get(stream_id)
        if buffer is None:
            buffer = self.streams[stream_id] = StreamBuffer()
            self.consumed.setdefault(stream_id, 0)
            if self._peer_opened(stream_id):
                self.incoming.put(stream_id)
        return buffer

    def _peer_opened(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated != self.client

    # ---- what the API calls (on the loop) ----------------------------------------------------

    def open_stream(self) -> int:
        assert self.quic is not None  # the handshake completed
        stream_id = self.quic.get_next_available_stream_id()
        # aioquic takes the id only once something is sent on it: take it now, so the next
        # open_stream() gets another.
        self.quic.send_stream_data(stream_id, b"", end_stream=False)
        self.streams[stream_id] = StreamBuffer()
        self.consumed[stream_id] = 0
        return stream_id

    async def write(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Queue `data` on the stream, waiting while SEND_WINDOW bytes are unacknowledged."""
        view = memoryview(data)
        offset = 0
        while True:
            self._check_writable(stream_id)
            while self._unacknowledged(stream_id) > SEND_WINDOW:
                await self._progress.wait()
                self._check_writable(stream_id)
            chunk = view[offset : offset + WRITE_CHUNK]
            offset += len(chunk)
            last = offset >= len(view)
            assert self.quic is not None
            self.quic.send_stream_data(stream_id, bytes(chunk), end_stream and last)
            self.transmit()
            if last:
                return

    async def drain(self) -> None:
        """Wait until the peer has acknowledged everything written on every stream."""
        while self.closed_reason is None and any(
            self._unacknowledged(stream_id) for stream_id in list(self.streams)
        ):
            await self._progress.wait()

    def consumed_bytes(self, stream_id: int, count: int) -> None:
        """The reader took `count` bytes: the peer may send that much more."""
        self.consumed[stream_id] = self.consumed.get(stream_id, 0) + count
        if self.closed_reason is None:
            self.transmit()

    def send_datagram(self, data: bytes) -> None:
        self._check_open()
        assert self.quic is not None
        self.quic.send_datagram_frame(data)
        self.transmit()

    def datagram_taken(self) -> None:
        self._queued_datagrams -= 1

    def reset_stream(self, stream_id: int, code: int = 0) -> None:
        if self.closed_reason is None and self.quic is not None:
            self.quic.reset_stream(stream_id, code)
            self.transmit()

    def abort_stream(self, stream_id: int, code: int) -> None:
        """Give the stream up both ways: the peer's reads raise StreamReset (RESET_STREAM), its
        writes are stopped (STOP_SENDING), and reads on this side end with StreamReset."""
        buffer = self.streams.get(stream_id)
        if buffer is not None:
            buffer.fail(StreamReset(f"the stream was reset on this side (code {code})"))
        if self.closed_reason is not None or self.quic is None:
            return
        self.quic.reset_stream(stream_id, code)
        with contextlib.suppress(ValueError):  # nothing received on it yet, or finished
            self.quic.stop_stream(stream_id, code)
        self.transmit()
        self._wake_writers()

    async def ping(self) -> tuple[float, str | None]:
        """A QUIC PING (pings.py): the round trip in seconds, and the route kind its
        acknowledgement came back on."""
        self._check_open()
        assert self.quic is not None
        uid, waiter = self._pings.new()
        self.quic.send_ping(uid)
        self.transmit()
        try:
            return await asyncio.shield(waiter)
        finally:
            self._pings.forget(uid)

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed round trip on the connection (seconds), once it has a sample."""
        return None if self.quic is None else self.quic.smoothed_rtt()

    @property
    def last_ping(self) -> float | None:
        """The latest PING's round trip (seconds): a `ping`'s, or the keep-alive's."""
        return self._pings.latest

    def close(self, reason: str = "closed", *, code: int = CLOSE_NORMAL) -> None:
        if self.closed_reason is not None:
            return
        if self.quic is not None:
            self.quic.close(error_code=code, reason_phrase=reason[:200])
            self.transmit()
        self._closed(reason)

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise PeerClosed(f"connection to {self.path.peer_id} closed: {self.closed_reason}")

    def _check_writable(self, stream_id: int) -> None:
        self._check_open()
        if stream_id in self._stopped:
            code = self._stopped[stream_id]
            raise StreamReset(f"the peer stopped reading the stream (code {code})")
        assert self.quic is not None
        if self.quic.sending_reset(stream_id):
            raise StreamReset("the stream was reset on this side")

    def _unacknowledged(self, stream_id: int) -> int:
        assert self.quic is not None
        return self.quic.unacknowledged(stream_id)

    def _wake_writers(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


def _rank(kind: str) -> int:
    return RANK.get(wire.PathKind(kind), 0)
