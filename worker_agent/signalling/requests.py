"""A frame sent to the service and its reply awaited: request ids, and who waits for what.

Replies arrive on the service session's reading thread (`wake`, which never blocks); the asker
waits on a queue of its own (`ask`). A `connect_pending` on the way files later replies under
its introduction id too, since the service names introductions, not requests, from then on.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import PeerError

Send = Callable[[str], bool]


def request_id() -> str:
    return uuid.uuid4().hex[:16]


class Requests:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}

    def waiting(self, key: Any) -> bool:
        """Whether somebody waits for a reply filed under `key`."""
        with self._lock:
            return isinstance(key, str) and key in self._waiters

    def wake(self, message: dict[str, Any]) -> None:
        """Hand a reply to whoever waits: under its request id, or its introduction id."""
        with self._lock:
            for key in (message.get("request_id"), message.get("introduction_id")):
                waiter = self._waiters.get(key) if isinstance(key, str) else None
                if waiter is not None:
                    waiter.put(message)
                    return

    def ask(
        self,
        frame: str,
        key: str,
        timeout: float,
        *,
        until: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Send `frame` and wait for the reply filed under `key` (one of `until`, if given)."""
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        keys = [key]
        with self._lock:
            if key in self._waiters:
                raise PeerError(f"a request {key} is already waiting for its answer")
            self._waiters[key] = waiter
        try:
            if not self._send(frame):
                raise PeerError("not connected to the rendezvous service")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    reply = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise PeerError(
                        f"no answer from the service within {timeout:.1f}s"
                        + (" (the peer did not answer the introduction)" if until else "")
                    ) from None
                introduction_id = reply.get("introduction_id")
                if reply.get("type") == wire.ServerMessageType.CONNECT_PENDING and isinstance(
                    introduction_id, str
                ):
                    with self._lock:
                        self._waiters[introduction_id] = waiter
                    keys.append(introduction_id)
                if until is None or reply.get("type") in until:
                    return reply
        finally:
            with self._lock:
                for name in keys:
                    self._waiters.pop(name, None)
