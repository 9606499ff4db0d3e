"""What arrived on one QUIC stream and was not read yet: filled by the peer loop, read from any
thread (the public `PeerStream` reads it, `quic.QuicSession` fills it)."""

from __future__ import annotations

import threading

from ..errors import PeerError


class StreamBuffer:
    """What arrived on one stream and was not read yet; filled by the loop, read from any
    thread."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._eof = False
        self._error: PeerError | None = None
        self._changed = threading.Condition()

    def feed(self, data: bytes, end: bool) -> None:
        """Append what arrived; the reader hears of it at `wake()` (once per burst of packets,
        not per packet)."""
        with self._changed:
            self._data += data
            self._eof = self._eof or end

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def fail(self, error: PeerError) -> None:
        with self._changed:
            if self._error is None and not self._eof:
                self._error = error
            self._changed.notify_all()

    def unread(self, data: bytes) -> None:
        """Put bytes a reader took back in front (a reader that only looked at the start of a
        stream to decide who handles it)."""
        if data:
            with self._changed:
                self._data[:0] = data
                self._changed.notify_all()

    def read(self, max_bytes: int, timeout: float | None) -> bytes:
        with self._changed:
            if not self._changed.wait_for(lambda: self._data or self._eof or self._error, timeout):
                raise TimeoutError(f"nothing arrived on the stream within {timeout}s")
            if self._data:
                chunk = bytes(self._data[:max_bytes])
                del self._data[:max_bytes]
                return chunk
            if self._error is not None:
                raise self._error
            return b""  # the peer's end of stream

    @property
    def buffered(self) -> int:
        return len(self._data)
