"""The pings a QUIC session has in flight, timed as ping(8) times its echo, at this side's
edges: from the datagram carrying the PING leaving to the one carrying its acknowledgement
arriving. The peer's processing is in the round trip; this side's encryption is not (it is not
the path's). The peer acknowledges a PING at once (`pinned.py`).
"""

from __future__ import annotations

import asyncio
import itertools

Pong = tuple[float, "str | None"]  # seconds, the route kind the acknowledgement came on


class Pings:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.latest: float | None = None  # the latest round trip
        self._waiting: dict[int, tuple[list[float | None], asyncio.Future[Pong]]] = {}

    def new(self) -> tuple[int, asyncio.Future[Pong]]:
        uid = next(self._ids)
        waiter: asyncio.Future[Pong] = asyncio.get_running_loop().create_future()
        self._waiting[uid] = ([None], waiter)
        return uid, waiter

    def forget(self, uid: int) -> None:
        self._waiting.pop(uid, None)

    def sent(self, now: float) -> None:
        """The PINGs asked for so far left in the datagrams just sent."""
        for left, _ in self._waiting.values():
            left[0] = left[0] or now

    def answered(self, uid: int, arrived: float, kind: str | None) -> None:
        entry = self._waiting.pop(uid, None)
        if entry is not None and not entry[1].done():
            left = entry[0][0] or arrived
            self.latest = arrived - left
            entry[1].set_result((self.latest, kind))

    def fail(self, error: BaseException) -> None:
        for _, waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: the caller may have given up
        self._waiting.clear()

    def __bool__(self) -> bool:
        return bool(self._waiting)
