"""The service relay, from the agent's side: datagrams to peers over the agent's own WebSocket.

Every peer connection can use it from the moment it is introduced: it works wherever the
registration WebSocket works (HTTPS-only networks, Cloud Run). Datagrams for peers are queued
here and written by one thread, which packs whatever is waiting for the same peer into one relay
frame: under light load each datagram goes alone and at once, under heavy load frames fill up,
so the service handles a few large frames instead of many small ones.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from .. import wire

logger = logging.getLogger("worker_agent.p2p")

# Bytes of datagrams waiting for the writer at most; beyond it `send` waits or drops, as a full
# UDP socket buffer would.
MAX_QUEUED_BYTES = 1024 * 1024
_ROOM = wire.RELAY_MAX_FRAME_BYTES - wire.RELAY_HEADER_BYTES

SendBinary = Callable[[bytes], bool]


class RelayLink:
    def __init__(self, send_binary: SendBinary, *, max_queued: int = MAX_QUEUED_BYTES) -> None:
        self._send_binary = send_binary
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: deque[tuple[bytes, bytes]] = deque()  # (frame header, datagram)
        self._queued = 0
        self._closed = False
        self.dropped = 0
        self.frames_sent = 0
        self.datagrams_sent = 0
        self._thread = threading.Thread(target=self._write, name="worker-agent-relay", daemon=True)
        self._thread.start()

    def send(self, header: bytes, datagram: bytes, *, timeout: float | None = 0.0) -> bool:
        """Queue one datagram for the peer whose frame header this is. Waits up to `timeout`
        (None: as long as it takes) for room; False when it was dropped."""
        size = len(datagram) + wire.RELAY_LENGTH_BYTES
        with self._cond:
            if self._queued + size > self.max_queued and timeout != 0:
                self._cond.wait_for(
                    lambda: self._closed or self._queued + size <= self.max_queued, timeout
                )
            if self._closed or self._queued + size > self.max_queued:
                self.dropped += 1
                return False
            self._queue.append((header, datagram))
            self._queued += size
            self._cond.notify_all()
        return True

    def send_many(self, header: bytes, datagrams: list[bytes]) -> None:
        """Queue a burst for one peer without waiting; what does not fit is dropped."""
        with self._cond:
            for datagram in datagrams:
                size = len(datagram) + wire.RELAY_LENGTH_BYTES
                if self._closed or self._queued + size > self.max_queued:
                    self.dropped += 1
                    continue
                self._queue.append((header, datagram))
                self._queued += size
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def _write(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queue)
                if self._closed:
                    return
                items = list(self._queue)
                self._queue.clear()
            for frame in _frames(items):
                if not self._send_binary(frame):
                    self.dropped += 1  # not connected: these datagrams are lost, as on UDP
                self.frames_sent += 1
            self.datagrams_sent += len(items)
            written = sum(len(d) + wire.RELAY_LENGTH_BYTES for _, d in items)
            with self._cond:
                # Only now: senders wait while the socket is busy writing what they queued.
                self._queued -= written
                self._cond.notify_all()


def _frames(items: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Pack consecutive datagrams for the same peer into frames of at most the frame limit."""
    frames: list[bytes] = []
    header: bytes | None = None
    batch: list[bytes] = []
    room = 0
    for item_header, datagram in items:
        size = len(datagram) + wire.RELAY_LENGTH_BYTES
        if item_header != header or size > room:
            if batch and header is not None:
                frames.append(wire.relay_frame(header, batch))
            header, batch, room = item_header, [], _ROOM
        batch.append(datagram)
        room -= size
    if batch and header is not None:
        frames.append(wire.relay_frame(header, batch))
    return frames
