"""`PeerPath`: datagrams to one peer over whichever route is best right now.

A path holds up to one live route of each kind (the service relay, TURN, direct, LAN) and sends
on the best of them: LAN, then direct, then TURN, then the relay. Routes come up and go away
underneath (ICE finishing after the relay already carries data, consent to a direct pair
expiring) and the path moves its traffic without the caller doing anything; it receives from
every route. This is the layer the encrypted streams run on: they see one datagram path whose
route may change, as iroh's QUIC sees its magicsock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from .. import wire
from ..errors import PeerClosed
from .liveness import RouteWatch
from .loop import LoopThread
from .relay import RelayLink

logger = logging.getLogger("worker_agent.p2p")

RANK = {
    wire.PathKind.LAN: 4,
    wire.PathKind.DIRECT: 3,
    wire.PathKind.TURN: 2,
    wire.PathKind.RELAY: 1,
}
# Datagrams received and not yet read by recv() at most; more are dropped, as a full socket
# buffer drops them.
MAX_RECEIVED = 4096

Endpoint = tuple[str, int]
ChangeCallback = Callable[["PeerPath", str | None, str | None], None]
DatagramHandler = Callable[[bytes], None]


class Route(Protocol):
    kind: wire.PathKind | None
    remote: Endpoint | None

    def send(self, data: bytes) -> None: ...

    def send_many(self, datagrams: list[bytes]) -> None: ...


@dataclass
class RelayRoute:
    """The service relay for one introduction."""

    link: RelayLink
    header: bytes
    remote: Endpoint | None = None
    kind: wire.PathKind | None = wire.PathKind.RELAY

    def send(self, data: bytes) -> None:
        self.link.send(self.header, data)  # never waits: from the loop, a full queue drops

    def send_many(self, datagrams: list[bytes]) -> None:
        self.link.send_many(self.header, datagrams)


@dataclass
class PathStats:
    sent: dict[str, int] = field(default_factory=dict)  # datagrams sent, by route kind
    received: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    bytes_sent: int = 0  # datagram payloads, every route together
    bytes_received: int = 0


class PeerPath:
    """A datagram path to `peer_id` whose route can change underneath. Thread-safe; the sync
    methods may be called from any thread but the agent's peer loop."""

    def __init__(
        self,
        *,
        peer_id: str,
        introduction_id: str,
        loop: LoopThread,
        on_close: Callable[[str], None],
    ) -> None:
        self.peer_id = peer_id
        self.introduction_id = introduction_id
        self._loop = loop
        self._on_close = on_close
        self._routes: dict[wire.PathKind, Route] = {}
        self._best: Route | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._received: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog = 0
        self._handler: DatagramHandler | None = None
        self._callbacks: list[ChangeCallback] = []
        self.history: list[tuple[float, str]] = []  # (monotonic time, kind) of each move
        self.stats = PathStats()
        self.opened_at = time.time()  # when the introduction made it (Unix seconds)
        self._opened = time.monotonic()
        self.last_kind: str | None = None  # the route the latest datagram from the peer came on
        self.closed_reason: str | None = None
        # The layers that use the path: whether one is owed an answer (a route that stays
        # silent then is given up), and who closes a route given up (liveness.py).
        self.expecting: Callable[[], bool] | None = None
        self.on_route_failed: Callable[[Route], None] | None = None
        self.watch = RouteWatch(self)

    # ---- what the caller sees ------------------------------------------------------------------

    @property
    def kind(self) -> str | None:
        """`lan`, `direct`, `turn` or `relay`: the route datagrams go out on now (None: none)."""
        best = self._best
        return None if best is None or best.kind is None else str(best.kind)

    @property
    def remote_address(self) -> Endpoint | None:
        """The peer's address on the current route: its LAN or NAT address (direct), the TURN
        relay address (turn), None through the service relay."""
        best = self._best
        return None if best is None else best.remote

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def on_change(self, callback: ChangeCallback) -> None:
        """`callback(path, old_kind, new_kind)` on every move (on the peer loop: keep it short)."""
        self._callbacks.append(callback)

    def wait_for_kind(self, *kinds: str, timeout: float | None = None) -> bool:
        """Wait until the path runs on one of `kinds` (say "direct", "lan"); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.kind in kinds or self.closed, timeout) and (
                self.kind in kinds
            )

    def send(self, data: bytes, *, timeout: float | None = None) -> None:
        """Send one datagram (at most 65,517 bytes). Through the relay it waits up to `timeout`
        while the relay's queue is full (like a blocking UDP socket); raises PeerClosed once
        the path has ended. Datagrams may be lost or reordered, as on UDP."""
        if len(data) > wire.MAX_DATAGRAM_BYTES:
            raise ValueError(f"datagrams are limited to {wire.MAX_DATAGRAM_BYTES} bytes")
        best = self._best
        if best is None:
            raise PeerClosed(f"path to {self.peer_id} closed: {self.closed_reason or 'no route'}")
        self._count(self.stats.sent, best.kind)
        self.stats.bytes_sent += len(data)
        if isinstance(best, RelayRoute):
            if not best.link.send(best.header, data, timeout=timeout):
                self.stats.dropped += 1
        else:
            self._loop.call_soon(best.send, data)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next datagram from the peer, from any route; TimeoutError after `timeout`,
        PeerClosed once the path has ended and nothing is left to read."""
        try:
            data = self._received.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no datagram from {self.peer_id} within {timeout}s") from None
        if data is None:
            self._received.put(None)  # for every later recv() too
            raise PeerClosed(f"path to {self.peer_id} closed: {self.closed_reason}")
        with self._lock:
            self._backlog -= 1
        return data

    def close(self, reason: str = "closed") -> None:
        """End the path: every route is closed and the peer is told."""
        if not self.closed:
            self._loop.call_soon(self._on_close, reason)

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
        return f"PeerPath(peer_id={self.peer_id!r}, kind={self.kind!r})"

    # ---- the asynchronous side (on the peer loop), for the layers above ---------------------

    def send_nowait(self, data: bytes) -> None:
        """Send on the best route from the peer loop; a full relay queue drops the datagram."""
        best = self._best
        if best is None:
            return
        self._count(self.stats.sent, best.kind)
        self.stats.bytes_sent += len(data)
        best.send(data)

    def send_many_nowait(self, datagrams: list[bytes]) -> None:
        """`send_nowait` for a burst, in order: what the route can do at once (one relay
        frame, one segmented UDP send) is done at once."""
        best = self._best
        if best is None or not datagrams:
            return
        key = str(best.kind)
        self.stats.sent[key] = self.stats.sent.get(key, 0) + len(datagrams)
        self.stats.bytes_sent += sum(map(len, datagrams))
        best.send_many(datagrams)

    def set_datagram_handler(self, handler: DatagramHandler | None) -> None:
        """Deliver datagrams to `handler` (on the peer loop) instead of recv()."""
        self._handler = handler

    # ---- routes (on the peer loop) -----------------------------------------------------------

    def add_route(self, route: Route) -> None:
        if self.closed or route.kind is None:
            return
        with self._changed:
            self._routes[route.kind] = route
            self._select()

    def remove_route(self, route: Route) -> None:
        with self._changed:
            if route.kind is not None and self._routes.get(route.kind) is route:
                del self._routes[route.kind]
                self._select()

    def routes(self) -> dict[str, Route]:
        with self._lock:
            return {str(kind): route for kind, route in self._routes.items()}

    def address_of(self, kind: str | None) -> Endpoint | None:
        """The peer's address on the live route of `kind` (None through the relay, or gone)."""
        with self._lock:
            for route_kind, route in self._routes.items():
                if str(route_kind) == kind:
                    return route.remote
        return None

    def snapshot(self) -> dict[str, Any]:
        """What the path is and has carried, JSON-ready (`rendezvous-worker status`)."""
        remote = self.remote_address
        return {
            "peer_id": self.peer_id,
            "introduction_id": self.introduction_id,
            "kind": self.kind,
            "remote_address": list(remote) if remote else None,
            "opened_at": self.opened_at,
            "history": [[round(at - self._opened, 3), kind] for at, kind in self.history],
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
            "datagrams_sent": sum(self.stats.sent.values()),
            "datagrams_received": sum(self.stats.received.values()),
            "dropped": self.stats.dropped,
            "closed_reason": self.closed_reason,
        }

    @property
    def best_route(self) -> Route | None:
        return self._best

    def fail_route(self, route: Route, reason: str) -> None:
        """Stop sending on `route` (it no longer reaches the peer: liveness.py) and tell its
        owner, who closes it; the next best route carries the data from now on."""
        with self._changed:
            if route.kind is None or self._routes.get(route.kind) is not route:
                return
            del self._routes[route.kind]
            logger.info(
                "path to %s (introduction %s): %s route given up: %s",
                self.peer_id,
                self.introduction_id,
                route.kind,
                reason,
            )
            self._select()
        if self.on_route_failed is not None:
            self.on_route_failed(route)

    def _select(self) -> None:
        """Pick the best route (lock held) and tell whoever listens when it changed."""
        old = self._best
        self._best = max(self._routes.values(), key=lambda r: RANK[r.kind], default=None)  # type: ignore[index]
        if self._best is old:
            return
        old_kind = None if old is None else str(old.kind)
        new_kind = self.kind
        self.history.append((time.monotonic(), new_kind or "none"))
        self._changed.notify_all()
        logger.info(
            "path to %s (introduction %s): %s -> %s%s",
            self.peer_id,
            self.introduction_id,
            old_kind,
            new_kind,
            f" via {self.remote_address}" if self.remote_address else "",
        )
        for callback in list(self._callbacks):
            self._loop.call_soon(_safely, callback, self, old_kind, new_kind)

    def deliver(self, data: bytes, kind: wire.PathKind) -> None:
        """A datagram from the peer, on route `kind` (on the peer loop)."""
        self._count(self.stats.received, kind)
        self.stats.bytes_received += len(data)
        self.last_kind = str(kind)
        handler = self._handler
        if handler is not None:
            handler(data)
            return
        with self._lock:
            if self._backlog >= MAX_RECEIVED:
                self.stats.dropped += 1
                return
            self._backlog += 1
        self._received.put(data)

    def ended(self, reason: str) -> None:
        """The session is over (either side closed, or every route is gone): on the peer loop."""
        if self.closed:
            return
        with self._changed:
            self.closed_reason = reason
            self._routes.clear()
            self._select()
            self._changed.notify_all()
        self.watch.stop()
        self._received.put(None)

    @staticmethod
    def _count(counter: dict[str, int], kind: Any) -> None:
        key = str(kind)
        counter[key] = counter.get(key, 0) + 1


def _safely(callback: ChangeCallback, path: PeerPath, old: str | None, new: str | None) -> None:
    try:
        callback(path, old, new)
    except Exception:
        logger.exception("path change callback %r raised", callback)
