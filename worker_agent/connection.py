"""`PeerConnection` and `PeerStream`: the encrypted connection to a peer, as the host program
uses it. Synchronous and socket-like, safe to use from any thread but the agent's peer loop,
with an `a`-prefixed asyncio twin of each blocking call; timeouts everywhere.

The work happens in `quic.QuicSession` on the agent's peer loop: reads wait on buffers the loop
fills, writes hand their bytes to the loop and wait there while the peer has not acknowledged
enough (`quic.SEND_WINDOW`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import PeerClosed, PeerError
from .paths.loop import LoopThread
from .paths.path import ChangeCallback, Endpoint, PeerPath
from .secure.streams import StreamBuffer

if TYPE_CHECKING:
    from .secure.quic import QuicSession

DEFAULT_TIMEOUT = 30.0
READ_SIZE = 64 * 1024
MAX_DATAGRAM = 1200  # a QUIC datagram frame fits one packet (quic.MAX_PACKET)
LINGER = 5.0  # how long close() waits for the peer to acknowledge what was written
# Bytes read before the peer's send window grows by them: a sixteenth of quic.STREAM_WINDOW, so
# the peer always has most of its window while the reader keeps up.
WINDOW_STEP = 256 * 1024


class PeerStream:
    """One bidirectional QUIC stream: bytes in order, reliably, until each side's end."""

    def __init__(self, connection: PeerConnection, stream_id: int, buffer: StreamBuffer) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._buffer = buffer
        self._write_closed = False
        self._unannounced = 0  # bytes read and not yet given back to the peer's send window

    def sendall(self, data: bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send every byte, waiting while the peer is behind; TimeoutError after `timeout`."""
        if self._write_closed:
            raise PeerClosed("this stream's writing side is shut down")
        if data:
            self.connection._call(self._session.write(self.stream_id, bytes(data), False), timeout)

    def recv(self, max_bytes: int = READ_SIZE, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        """Up to `max_bytes` bytes, as soon as any arrived; b"" once the peer ended the stream.
        TimeoutError after `timeout`; PeerClosed, StreamReset when the stream broke."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        data = self._buffer.read(max_bytes, timeout)
        if data:
            # The peer may send as much more as was read: told in steps, not per read (each
            # step is a wake-up of the loop and a window update on the wire).
            self._unannounced += len(data)
            if self._unannounced >= WINDOW_STEP:
                self.connection._loop.call_soon(
                    self._session.consumed_bytes, self.stream_id, self._unannounced
                )
                self._unannounced = 0
        return data

    def recv_exactly(self, size: int, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        """Exactly `size` bytes; PeerClosed if the stream ends first."""
        parts: list[bytes] = []
        missing = size
        while missing:
            part = self.recv(min(missing, READ_SIZE), timeout=timeout)
            if not part:
                raise PeerClosed(f"the stream ended {missing} bytes short")
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put bytes just read back in front, for whoever reads the stream next (a reader that
        looked at its start to decide who handles it)."""
        self._buffer.unread(data)
        self._unannounced -= len(data)

    def shutdown_write(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """End this side of the stream: the peer's recv() returns b"" after the last byte."""
        if not self._write_closed:
            self._write_closed = True
            self.connection._call(self._session.write(self.stream_id, b"", True), timeout)

    def reset(self, code: int = 0) -> None:
        """Abandon the stream both ways at once (a socket closed with RST): what was not sent
        never will be, the peer's reads raise StreamReset and its writes stop; reads here end
        with StreamReset too."""
        self._write_closed = True
        self.connection._loop.call_soon(self._session.abort_stream, self.stream_id, code)

    def close(self) -> None:
        """End the writing side (if still open) and stop caring about what arrives."""
        if not self._write_closed and not self.connection.closed:
            with contextlib.suppress(PeerClosed, TimeoutError):
                self.shutdown_write(timeout=5)

    def makefile(self, mode: str = "rwb", buffering: int = io.DEFAULT_BUFFER_SIZE) -> Any:
        """A buffered binary file object over the stream (`rb`, `wb` or `rwb`)."""
        raw = _StreamIO(self)
        reader = io.BufferedReader(raw, buffering) if "r" in mode else None
        writer = io.BufferedWriter(raw, buffering) if "w" in mode else None
        if reader is not None and writer is not None:
            return io.BufferedRWPair(reader, writer, buffering)
        return reader or writer

    # asyncio twins
    async def asendall(self, data: bytes, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await asyncio.to_thread(self.sendall, data, timeout=timeout)

    async def arecv(
        self, max_bytes: int = READ_SIZE, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> bytes:
        return await asyncio.to_thread(self.recv, max_bytes, timeout=timeout)

    @property
    def _session(self) -> QuicSession:
        return self.connection._session

    def __enter__(self) -> PeerStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PeerStream {self.stream_id} with {self.connection.peer_id}>"


class _StreamIO(io.RawIOBase):
    def __init__(self, stream: PeerStream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        self._stream.sendall(bytes(data))
        return len(data)


@dataclass(frozen=True)
class Pong:
    """A ping's answer: the round trip, and the route the answer came back on."""

    seconds: float
    kind: str | None  # lan, direct, turn or relay
    address: Endpoint | None  # the peer's address on that route (None through the relay)


class PeerConnection:
    """An encrypted connection to `peer_id`, pinned to the certificate the service introduced.

    Runs over a `PeerPath` whose route may change underneath (relay, TURN, direct, LAN) without
    the connection noticing. Get one from `agent.connect(peer_id)`, or in `on_peer(agent, conn)`.
    """

    def __init__(self, *, session: QuicSession, loop: LoopThread, path: PeerPath) -> None:
        self._session = session
        self._loop = loop
        self.path = path
        self.peer_id = path.peer_id

    # ---- who, and how ----------------------------------------------------------------------

    @property
    def introduction_id(self) -> str:
        """The introduction the connection runs under now (a new one after a resume)."""
        return self.path.introduction_id

    @property
    def peer_fingerprint(self) -> str | None:
        """SHA-256 of the peer's certificate (64 hex digits), as pinned and proven."""
        return self._session.peer_fingerprint

    @property
    def path_kind(self) -> str | None:
        """The route under the connection now: `lan`, `direct`, `turn` or `relay`."""
        return self.path.kind

    @property
    def remote_address(self) -> Endpoint | None:
        return self.path.remote_address

    @property
    def closed(self) -> bool:
        return self._session.closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        return self._session.closed_reason

    @property
    def handshake_seconds(self) -> float | None:
        return self._session.handshake_seconds

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed round trip (seconds) over the route the connection runs on."""
        return self._session.rtt

    def ping(self, *, timeout: float | None = 5.0) -> Pong:
        """One round trip over the connection, answered by the peer's QUIC at once: a PING
        frame and its acknowledgement. TimeoutError when none came within `timeout`."""
        seconds, kind = self._call(self._session.ping(), timeout)
        return Pong(seconds, kind, self.path.address_of(kind))

    def snapshot(self) -> dict[str, Any]:
        """The path's snapshot with what the connection adds: the latest PING's round trip (a
        `ping`'s, or the keep-alive's every 10 s on a quiet connection), QUIC's smoothed one
        (queueing under load included), the identity."""
        rtt, ping = self.rtt, self._session.last_ping
        return {
            **self.path.snapshot(),
            "ping_ms": None if ping is None else round(1000 * ping, 3),
            "rtt_ms": None if rtt is None else round(1000 * rtt, 3),
            "peer_fingerprint": self.peer_fingerprint,
            "handshake_ms": None
            if self.handshake_seconds is None
            else round(1000 * self.handshake_seconds, 1),
            "closed_reason": self.closed_reason,
        }

    def on_path_change(self, callback: ChangeCallback) -> None:
        """`callback(path, old_kind, new_kind)` each time the route underneath moves."""
        self.path.on_change(callback)

    # ---- streams -----------------------------------------------------------------------------

    def open_stream(self) -> PeerStream:
        stream_id = self._call(self._open(), DEFAULT_TIMEOUT)
        return PeerStream(self, stream_id, self._session.streams[stream_id])

    def accept_stream(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> PeerStream:
        """The next stream the peer opened (as soon as its first bytes arrive)."""
        try:
            stream_id = self._session.incoming.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no stream from {self.peer_id} within {timeout}s") from None
        if stream_id is None:
            self._session.incoming.put(None)
            raise PeerClosed(f"connection to {self.peer_id} closed: {self.closed_reason}")
        return PeerStream(self, stream_id, self._session.streams[stream_id])

    # ---- datagrams -----------------------------------------------------------------------------

    def send_datagram(self, data: bytes) -> None:
        """One unreliable, unordered message of at most 1,200 bytes (encrypted, like streams)."""
        if len(data) > MAX_DATAGRAM:
            raise ValueError(f"datagrams are limited to {MAX_DATAGRAM} bytes")
        if self.closed:
            raise PeerClosed(f"connection to {self.peer_id} closed: {self.closed_reason}")
        self._loop.call_soon(self._session.send_datagram, bytes(data))

    def recv_datagram(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        try:
            data = self._session.datagrams.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no datagram from {self.peer_id} within {timeout}s") from None
        if data is None:
            self._session.datagrams.put(None)
            raise PeerClosed(f"connection to {self.peer_id} closed: {self.closed_reason}")
        self._loop.call_soon(self._session.datagram_taken)
        return data

    # ---- the end -------------------------------------------------------------------------------

    def close(self, reason: str = "closed", *, linger: float = LINGER) -> None:
        """Close the connection (the peer's reads end with PeerClosed) and its path, once what
        was written has been acknowledged (up to `linger` seconds), as a socket closes after
        sending what it holds."""
        if not self.closed:
            with contextlib.suppress(TimeoutError, PeerError):
                self._call(self._session.drain(), linger)
        # The peer session closes the QUIC connection and tells the service (which records the
        # end and tells the peer's agent); closing QUIC alone would leave the service unaware.
        self.path.close(reason)

    def __enter__(self) -> PeerConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PeerConnection to {self.peer_id} over {self.path_kind}>"

    # asyncio twins
    async def aopen_stream(self) -> PeerStream:
        return await asyncio.to_thread(self.open_stream)

    async def aaccept_stream(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> PeerStream:
        return await asyncio.to_thread(self.accept_stream, timeout=timeout)

    async def arecv_datagram(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        return await asyncio.to_thread(self.recv_datagram, timeout=timeout)

    # ---- plumbing --------------------------------------------------------------------------

    async def _open(self) -> int:
        self._session._check_open()
        return self._session.open_stream()

    def _call(self, coroutine: Any, timeout: float | None) -> Any:
        return self._loop.call(coroutine, timeout)
