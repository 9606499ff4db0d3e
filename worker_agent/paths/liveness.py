"""Whether the route a path sends on still reaches the peer, noticed in about a second.

A NAT that moves a worker's public port (a rebinding), or a firewall that starts dropping,
leaves a direct route up in ICE's eyes for as long as its consent checks take to fail (30 s in
aioice). The path knows sooner: the peer's datagrams stop arriving on that route. It is given up
(`PeerPath.fail_route`) when nothing arrived on it for `SILENCE` seconds and either

- the peer's datagrams arrive on another route meanwhile: the peer has moved off it, so this
  side's sends on it are not reaching it either (a one-way break: ACKs lost on the way back); or
- the layer above is owed an answer (`PeerPath.expecting`: QUIC has unacknowledged packets in
  flight): what was sent on it is not being received.

The relay is never given up this way (the service session watches it); whoever owns the route
(`PeerPath.on_route_failed`) closes it, and ICE tries again with fresh sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import wire

SILENCE = 1.0  # seconds without a datagram on the route before it is given up
INTERVAL = 0.25  # seconds between two looks


class Watched(Protocol):
    """What the watch needs of a path (`PeerPath`, which owns the watch)."""

    stats: Any  # `received`: datagrams received, by route kind
    expecting: Callable[[], bool] | None
    closed_reason: str | None

    @property
    def best_route(self) -> Any: ...

    def fail_route(self, route: Any, reason: str) -> None: ...


class RouteWatch:
    """Looks at one path's best route every INTERVAL seconds, on the peer loop."""

    def __init__(self, path: Watched, *, silence: float = SILENCE) -> None:
        self.path = path
        self.silence = silence
        self._route: Any = None
        self._count = 0  # datagrams received on it, at the last look
        self._others = 0  # datagrams received on every other route, when it went quiet
        self._quiet_since = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self.path.closed_reason is None:
            await asyncio.sleep(INTERVAL)
            self.look(time.monotonic())

    def look(self, now: float) -> None:
        """One look: give the best route up if it has gone silent (see the module docstring)."""
        route = self.path.best_route
        received = self.path.stats.received
        if route is None or route.kind == wire.PathKind.RELAY:
            self._route = None
            return
        count = received.get(str(route.kind), 0)
        others = sum(received.values()) - count
        if route is not self._route or count != self._count:
            self._route, self._count = route, count
            self._others, self._quiet_since = others, now
            return
        quiet = now - self._quiet_since
        if quiet < self.silence:
            return
        if others > self._others:
            why = "the peer's datagrams arrive on another route"
        elif self.path.expecting is not None and self.path.expecting():
            why = "what was sent on it is not answered"
        else:
            return
        self._route = None
        self.path.fail_route(route, f"nothing from the peer on it for {quiet:.1f}s; {why}")
