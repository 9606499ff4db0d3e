"""The worker sockets this process holds, and the connection limits on them.

A consumer attaches its socket once registered and detaches it once its close is recorded; in
between, commands from any instance (runtime.py) and housekeeping (housekeeping.py) reach it
through here. Attach and detach run on the event loop; housekeeping reads from its thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings

from registry.core import protocol
from registry.core.peer_policy import Policy
from registry.ops import metrics
from registry.presence.admission import Admission

# The logger's name is the one operators' log pipelines know (docs/operations.md).
log = logging.getLogger("registry.runtime")

Closer = Callable[[int], Coroutine[Any, Any, None]]
Deliverer = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
Relayer = Callable[[bytes], Coroutine[Any, Any, None]]
PolicyListener = Callable[[Policy], Coroutine[Any, Any, int]]


@dataclass(slots=True)
class HeldSocket:
    """What the instance can do with one socket: close it, and hand its consumer messages."""

    close: Closer
    loop: asyncio.AbstractEventLoop
    attached_at: datetime
    address: str | None
    deliver: Deliverer | None = None
    relay: Relayer | None = None
    policy_changed: PolicyListener | None = None


class HeldSockets:
    def __init__(self) -> None:
        self._sockets: dict[int, HeldSocket] = {}
        self._admission: Admission | None = None  # built on first use, from settings

    @property
    def admission(self) -> Admission:
        if self._admission is None:
            config = settings.RENDEZVOUS
            self._admission = Admission(
                max_total=config["MAX_CONNECTIONS"],
                max_per_address=config["MAX_CONNECTIONS_PER_ADDRESS"],
                handshake_rate=config["HANDSHAKE_RATE_PER_ADDRESS"],
                auth_failures_per_minute=config["AUTH_FAILURES_PER_MINUTE"],
            )
        return self._admission

    def attach(self, connection_id: int, held: HeldSocket) -> None:
        self._sockets[connection_id] = held
        if self._admission is not None:
            self._admission.opened(held.address)
        metrics.socket_attached()

    def detach(self, connection_id: int) -> None:
        held = self._sockets.pop(connection_id, None)
        if held is not None:
            if self._admission is not None:
                self._admission.closed(held.address)
            metrics.socket_detached()

    def get(self, connection_id: int | None) -> HeldSocket | None:
        return self._sockets.get(connection_id)  # type: ignore[arg-type]

    def all(self) -> list[HeldSocket]:
        return list(self._sockets.values())

    def ids(self) -> list[int]:
        return list(self._sockets)

    def attached_since(self) -> list[tuple[int, datetime]]:
        """Every socket held now and when it was attached (a copy: safe from another thread)."""
        return [(pk, held.attached_at) for pk, held in list(self._sockets.items())]

    def __len__(self) -> int:
        return len(self._sockets)

    def a_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the sockets live on, if any is still running."""
        return next((held.loop for held in self.all() if not held.loop.is_closed()), None)

    def close_from_thread(self, connection_id: int, code: int) -> bool:
        """Close a socket from another thread (housekeeping); False if it is not held here."""
        held = self._sockets.get(connection_id)
        if held is None or held.loop.is_closed():
            return False
        if code not in protocol.CloseCode._value2member_map_:
            code = protocol.CloseCode.INSTANCE_RESET  # e.g. 1006, which no one may send
        future = asyncio.run_coroutine_threadsafe(held.close(code), held.loop)
        future.add_done_callback(_log_failure)
        return True


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("closing a socket from housekeeping failed: %s", future.exception())
