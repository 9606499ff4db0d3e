"""The connections this agent opened for the peer API, one per peer, reused by every command
until they have been idle for IDLE_AFTER seconds (a ping, then a forward, then a send to the
same peer share one connection and its path, already moved to direct).

Only connections this agent opened are used for its own requests: a connection a peer opened
was introduced in the other direction, which the peer policy may not allow this way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..connection import PeerConnection, PeerStream
from ..errors import PeerClosed, PeerError
from . import header

logger = logging.getLogger("worker_agent")

IDLE_AFTER = 600.0  # seconds without a stream in use before a pooled connection is closed
REAP_EVERY = 10.0

Connect = Callable[[str, float], PeerConnection]
Serve = Callable[[PeerConnection], None]


class _Pooled:
    def __init__(self, connection: PeerConnection) -> None:
        self.connection = connection
        self.in_use = 0
        self.last_used = time.monotonic()


class Pool:
    def __init__(self, connect: Connect, serve: Serve, *, idle_after: float = IDLE_AFTER) -> None:
        self._connect = connect
        self._serve = serve
        self.idle_after = idle_after
        self._lock = threading.Lock()
        self._pooled: dict[str, _Pooled] = {}
        self._connecting: dict[str, threading.Lock] = {}
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="worker-agent-pool", daemon=True)
        self._reaper.start()

    def connection(self, peer_id: str, *, timeout: float = 10.0) -> PeerConnection:
        """The open connection to `peer_id`, or a new one (the PeerError that says why not)."""
        with self._lock:
            dialing = self._connecting.setdefault(peer_id, threading.Lock())
        with dialing:  # one introduction at a time per peer; the others reuse what it made
            with self._lock:
                pooled = self._pooled.get(peer_id)
                if pooled is not None and not pooled.connection.closed:
                    pooled.last_used = time.monotonic()
                    return pooled.connection
            if self._closed.is_set():
                raise PeerClosed("the agent is stopping")
            connection = self._connect(peer_id, timeout)
            with self._lock:
                self._pooled[peer_id] = _Pooled(connection)
            threading.Thread(
                target=self._serve,
                args=(connection,),
                name=f"worker-agent-pooled-{peer_id[:12]}",
                daemon=True,
            ).start()
            return connection

    @contextlib.contextmanager
    def stream(
        self,
        peer_id: str,
        request: dict[str, Any],
        *,
        timeout: float = 10.0,
        reply_timeout: float = header.REPLY_TIMEOUT,
    ) -> Iterator[tuple[PeerStream, dict[str, Any]]]:
        """A peer-API stream to `peer_id` whose request the peer accepted, and its acceptance;
        the refusal raised as its kind. A pooled connection that died meanwhile is replaced
        once. The stream is closed when the block ends."""
        for attempt in (1, 2):
            connection = self.connection(peer_id, timeout=timeout)
            try:
                stream = connection.open_stream()
                stream.sendall(header.request_bytes(request), timeout=timeout)
                break
            except PeerClosed:
                self._forget(connection)
                if attempt == 2:
                    raise
        self._use(peer_id, +1)
        try:
            reply = header.read_reply(stream, peer_id, timeout=reply_timeout)
            yield stream, reply
        finally:
            stream.close()
            self._use(peer_id, -1)

    def owns(self, connection: PeerConnection) -> bool:
        with self._lock:
            return any(p.connection is connection for p in self._pooled.values())

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            pooled, self._pooled = list(self._pooled.values()), {}
        for entry in pooled:
            entry.connection.close("the agent stopped", linger=1)

    def _use(self, peer_id: str, change: int) -> None:
        with self._lock:
            pooled = self._pooled.get(peer_id)
            if pooled is not None:
                pooled.in_use += change
                pooled.last_used = time.monotonic()

    def _forget(self, connection: PeerConnection) -> None:
        with self._lock:
            for peer_id, pooled in list(self._pooled.items()):
                if pooled.connection is connection:
                    del self._pooled[peer_id]

    def _reap(self) -> None:
        while not self._closed.wait(REAP_EVERY):
            now = time.monotonic()
            with self._lock:
                idle = [(peer_id, p) for peer_id, p in self._pooled.items() if self._idle(p, now)]
                for peer_id, _ in idle:
                    del self._pooled[peer_id]
            for peer_id, pooled in idle:
                if not pooled.connection.closed:
                    logger.info("connection to %s idle %.0fs: closing", peer_id, self.idle_after)
                    with contextlib.suppress(PeerError):
                        pooled.connection.close("idle")

    def _idle(self, pooled: _Pooled, now: float) -> bool:
        if pooled.connection.closed:
            return True
        return pooled.in_use <= 0 and now - pooled.last_used > self.idle_after
