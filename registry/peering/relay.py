"""The service relay: binary frames between the two workers of an accepted introduction.

Each connection keeps the peers it was introduced to (`PeerLinks`); a relay frame, or ICE
candidates, for an introduction the connection is not part of are refused. A frame goes to the
peer's consumer unchanged: directly when this instance holds the peer, through the channel layer
otherwise (`runtime.RELAY`). What a worker may send is budgeted per connection (bytes and frames
per second); a peer whose socket does not keep up has frames dropped for it (`SendWindow`), so a
slow reader never makes the service buffer without bound. Dropping is what a router does with
datagrams it cannot carry: the layer above (QUIC) retransmits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from registry.core import protocol
from registry.core.ratelimit import Streak, TokenBucket
from registry.ops import metrics
from registry.peering.links import PeerLink, PeerLinks

log = logging.getLogger("registry.relay")

# Twisted pauses a producer when a socket's unsent bytes pass the transport's buffer size (64 KiB
# by default, less than one relay frame); a relayed worker's socket may hold this much.
SEND_BUFFER_BYTES = 1024 * 1024
# Frames daphne has read from a worker and not yet handed to its consumer: above the first, the
# worker's socket is no longer read (TCP pushes back on the sender); below the second, it is again.
READ_QUEUE_PAUSE = 64  # frames: 4 MiB of full relay frames
READ_QUEUE_RESUME = 16

# Relay frames for one consumer on another instance, waiting to cross the channel layer: the
# sending consumer waits while more is queued (TCP pushes back on the worker, as above), and a
# batch crosses as one channel message of at most OUTBOX_BATCH_BYTES.
OUTBOX_MAX_BYTES = 1024 * 1024
OUTBOX_BATCH_BYTES = 256 * 1024

# Refused relay frames of one code less than this many seconds apart are one streak: the first
# gets an error frame and a log line, the others are counted (rendezvous_relay_dropped_total).
REFUSAL_QUIET = 10.0

# Why a relay frame was not delivered (the `reason` label of rendezvous_relay_dropped).
DROP_RATE_LIMITED = "rate_limited"
DROP_NOT_INTRODUCED = "not_introduced"
DROP_MALFORMED = "malformed"
DROP_TOO_LARGE = "too_large"
DROP_PEER_SLOW = "peer_slow"
DROP_PEER_GONE = "peer_gone"
DROP_RELAY_OFF = "relay_off"
_DROP_REASONS = {
    protocol.ErrorCode.RELAY_RATE_LIMITED: DROP_RATE_LIMITED,
    protocol.ErrorCode.RELAY_NOT_INTRODUCED: DROP_NOT_INTRODUCED,
    protocol.ErrorCode.RELAY_MALFORMED: DROP_MALFORMED,
    protocol.ErrorCode.RELAY_FRAME_TOO_LARGE: DROP_TOO_LARGE,
    protocol.ErrorCode.RELAY_OFF: DROP_RELAY_OFF,
}

Forward = Callable[[PeerLink, bytes], Awaitable[bool]]


class RelayPort:
    """One connection's side of the relay: what it sends (checked, budgeted, forwarded)."""

    def __init__(
        self,
        *,
        links: PeerLinks,
        forward: Forward,
        bytes_per_second: float,
        frames_per_second: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.links = links
        self._forward = forward
        self._clock = clock
        # Bursts of one second's worth, and never less than one full frame.
        self._bytes = TokenBucket(
            rate=bytes_per_second,
            burst=max(int(bytes_per_second), protocol.RELAY_MAX_FRAME_BYTES),
            clock=clock,
        )
        self._frames = TokenBucket(
            rate=frames_per_second, burst=max(int(frames_per_second), 1), clock=clock
        )
        self._refusals: dict[protocol.ErrorCode, Streak] = {}

    async def from_worker(self, frame: bytes) -> protocol.RelayError | None:
        """Relay a frame from this connection's worker; the error to tell it about, if any
        (only the first of a streak of refused frames of one code gets one)."""
        try:
            link = self._check(frame)
        except protocol.RelayError as exc:
            metrics.relay_dropped(_DROP_REASONS.get(exc.code, DROP_MALFORMED))
            streak = self._refusals.get(exc.code)
            if streak is None:
                streak = self._refusals[exc.code] = Streak(quiet=REFUSAL_QUIET, clock=self._clock)
            return exc if streak.refused() else None
        link.relayed_bytes += len(frame)
        link.relayed_frames += 1
        metrics.relayed(len(frame))
        if not await self._forward(link, frame):
            metrics.relay_dropped(DROP_PEER_GONE)
        return None

    def _check(self, frame: bytes) -> PeerLink:
        introduction_id = protocol.relay_frame_introduction(frame)
        link = self.links.get(introduction_id)
        if link is None:
            raise protocol.RelayError(
                "no introduction under that id on this connection (closed, or never made)",
                code=protocol.ErrorCode.RELAY_NOT_INTRODUCED,
                introduction_id=introduction_id,
            )
        if not link.relay:
            raise protocol.RelayError(
                "this service does not relay (RENDEZVOUS_RELAY is off): use the UDP path",
                code=protocol.ErrorCode.RELAY_OFF,
                introduction_id=introduction_id,
            )
        if not self._frames.peek() or not self._bytes.take(len(frame)):
            raise protocol.RelayError(
                "relay budget exceeded; frames beyond it are dropped",
                code=protocol.ErrorCode.RELAY_RATE_LIMITED,
                introduction_id=introduction_id,
            )
        self._frames.take()
        return link


def _daphne_protocol(send: Callable[..., Any]) -> Any:
    """The daphne protocol behind a consumer's send callable, or None (another server, or
    WebsocketCommunicator): daphne hands each application
    `functools.partial(server.handle_reply, protocol)`."""
    return next(iter(getattr(send, "args", ())), None)


class ReadWindow:
    """Stops reading a worker's socket while daphne holds more of its frames than the consumer
    has handled, so a worker that sends faster than its frames can be relayed (say, across
    instances) is slowed down by TCP instead of filling the service's memory: daphne itself
    reads every frame at once and queues it for the application, without a bound."""

    def __init__(self, transport: Any, queue: Any) -> None:
        self._transport = transport
        self._queue = queue
        self.paused = False
        self.pauses = 0

    @classmethod
    def attach(cls, send: Callable[..., Any]) -> ReadWindow | None:
        server_protocol = _daphne_protocol(send)
        transport = getattr(server_protocol, "transport", None)
        queue = getattr(server_protocol, "application_queue", None)
        if transport is None or not hasattr(queue, "qsize"):
            return None
        return cls(transport, queue)

    def handled(self) -> None:
        """After each frame the consumer handled: pause or resume reading as the queue says."""
        waiting = self._queue.qsize()
        if not self.paused and waiting > READ_QUEUE_PAUSE:
            self.paused = True
            self.pauses += 1
            self._transport.pauseProducing()
        elif self.paused and waiting <= READ_QUEUE_RESUME:
            self.paused = False
            self._transport.resumeProducing()


class SendWindow:
    """Whether a worker's socket keeps up: `paused` while Twisted holds more than
    SEND_BUFFER_BYTES of it unsent, so frames for that worker can be dropped, not buffered.

    Twisted pauses a socket's registered streaming producer when its buffer passes the
    transport's `bufferSize`, and says so in the transport's `producerPaused`. daphne leaves the
    HTTP channel that upgraded the connection registered as that producer, so the flag is kept
    up to date already; where no producer is registered, the window registers itself. Built from
    the send callable daphne gives the consumer; None elsewhere (WebsocketCommunicator, other
    servers), where nothing is dropped.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._own = False
        self._paused = False

    @property
    def paused(self) -> bool:
        if self._own:
            return self._paused
        return bool(getattr(self._transport, "producerPaused", False))

    @classmethod
    def attach(cls, send: Callable[..., Any]) -> SendWindow | None:
        transport = getattr(_daphne_protocol(send), "transport", None)
        if transport is None or not hasattr(transport, "producerPaused"):
            return None
        window = cls(transport)
        try:
            _hold_more_unsent(transport, SEND_BUFFER_BYTES)
            if getattr(transport, "producer", None) is None:
                transport.registerProducer(window, True)
                window._own = True
        except Exception:  # a closed transport
            log.debug("no send window on this socket", exc_info=True)
            return None
        return window

    # IPushProducer (Twisted's names), when the window registered itself
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        self._paused = True


def _hold_more_unsent(transport: Any, limit: int) -> None:
    """Let Twisted hold `limit` unsent bytes for this socket before it pauses its producer.

    Not by raising the transport's `bufferSize`: Twisted also reads that much from the socket at
    a time, and a socket read 1 MiB at once had its frames parsed in one go while every other
    connection waited (a pair relaying both ways held another pair's round trips up by 20 ms).
    Reads stay at Twisted's 64 KiB; only its test for a full send buffer changes.
    """

    def full() -> bool:
        return len(transport.dataBuffer) + transport._tempDataLen > limit

    transport._isSendBufferFull = full


SendBatch = Callable[[str, int, list[bytes]], Awaitable[None]]


@dataclass
class _Queue:
    frames: list[bytes] = field(default_factory=list)
    bytes: int = 0
    flushing: bool = False
    room: asyncio.Event = field(default_factory=asyncio.Event)


class RelayOutbox:
    """Relay frames for consumers on other instances, carried through the channel layer in
    batches. A frame waits for a channel layer round trip only while one is under way for the
    same consumer; whatever arrives meanwhile crosses with the next message. Sent one frame per
    message, a pair's frames would cross one Redis round trip at a time, and the latency of that
    queue is what QUIC would see (tens of milliseconds instead of one).
    """

    def __init__(
        self,
        send: SendBatch,
        spawn: Callable[..., None],
        *,
        max_bytes: int = OUTBOX_MAX_BYTES,
        batch_bytes: int = OUTBOX_BATCH_BYTES,
    ) -> None:
        self._send = send
        self._spawn = spawn
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes
        self._queues: dict[tuple[str, int], _Queue] = {}

    async def put(self, channel_name: str, connection_id: int, frame: bytes) -> None:
        """Queue `frame`; waits while the consumer's queue is full (its sender is read slower)."""
        key = (channel_name, connection_id)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        while queue.frames and queue.bytes + len(frame) > self.max_bytes:
            queue.room.clear()
            await queue.room.wait()
        queue.frames.append(frame)
        queue.bytes += len(frame)
        if not queue.flushing:
            queue.flushing = True
            self._spawn(self._flush(key, queue), what=f"relay frames for {connection_id}")

    async def _flush(self, key: tuple[str, int], queue: _Queue) -> None:
        try:
            while queue.frames:
                batch, size = _take(queue.frames, self.batch_bytes)
                try:
                    await self._send(key[0], key[1], batch)
                except Exception:  # a full channel or Redis away: lost, as datagrams are on UDP
                    log.debug("relay batch for %s not sent", key, exc_info=True)
                    for _ in batch:
                        metrics.relay_dropped(DROP_PEER_GONE)
                queue.bytes -= size
                queue.room.set()
        finally:
            queue.flushing = False
            if not queue.frames and self._queues.get(key) is queue:
                del self._queues[key]

    def __len__(self) -> int:
        return len(self._queues)


def _take(frames: list[bytes], limit: int) -> tuple[list[bytes], int]:
    """The first frames up to `limit` bytes (at least one), removed from `frames`."""
    count, size = 0, 0
    for frame in frames:
        if count and size + len(frame) > limit:
            break
        count += 1
        size += len(frame)
    batch = frames[:count]
    del frames[:count]
    return batch, size
