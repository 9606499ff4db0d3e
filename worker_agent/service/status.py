"""What the session with the service knows of itself: its state, what the last welcome said,
what went wrong last. One lock, one condition for those who wait, and every change of state
through `set`, which tells `on_change` (old -> new).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class AgentState(StrEnum):
    IDLE = "idle"  # built, not started
    CONNECTING = "connecting"  # opening the WebSocket
    CONNECTED = "connected"  # socket open, waiting for the server's welcome
    REGISTERED = "registered"  # welcome received: the server knows this worker
    BACKOFF = "backoff"  # waiting before the next attempt
    STOPPING = "stopping"  # stop() called
    STOPPED = "stopped"  # final: stopped on request
    SUPERSEDED = "superseded"  # final: gave the worker id up to another process
    REFUSED = "refused"  # final: the server refused the worker id (HTTP 403)


FINAL_STATES = frozenset({AgentState.STOPPED, AgentState.SUPERSEDED, AgentState.REFUSED})


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SessionStatus:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.on_change: Callable[[str, str], None] = lambda old, new: None
        self.state = AgentState.IDLE
        self.registered = False
        self.attempts = 0
        self.connects = 0
        self.started_at: str | None = None
        self.connected_at: str | None = None
        self.registered_at: str | None = None
        self.welcome: dict[str, Any] = {}
        self.last_heartbeat_ack_at: str | None = None
        self.heartbeat_acks = 0
        self.last_error: str | None = None
        self.last_server_error: dict[str, Any] | None = None
        self.last_close_code: int | None = None
        self.last_close_reason: str | None = None
        self.next_attempt_at: str | None = None
        self.final_reason: str | None = None

    def set(self, new: AgentState) -> None:
        """Move to `new`, unless the session is final (or stopping, and `new` is not final)."""
        with self.lock:
            old = self.state
            if old == new or old in FINAL_STATES:
                return
            if old == AgentState.STOPPING and new not in FINAL_STATES:
                return
            if old == AgentState.IDLE and new == AgentState.STOPPING:
                new = AgentState.STOPPED
            self.state = new
            self.changed.notify_all()
        self.on_change(str(old), str(new))

    def wait_registered(self, timeout: float | None) -> bool:
        with self.changed:
            self.changed.wait_for(lambda: self.registered or self.state in FINAL_STATES, timeout)
            return self.registered

    def wait_finished(self, timeout: float | None) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.state in FINAL_STATES, timeout)

    def welcomed(self, welcome: dict[str, Any]) -> None:
        with self.lock:
            self.welcome = dict(welcome)
            self.registered = True
            self.registered_at = now_iso()
            self.changed.notify_all()

    def ended(
        self, *, opened: bool, close: tuple[int | None, str | None], error: str | None
    ) -> None:
        """A connection ended (`error`: what went wrong, when it ended without a close code)."""
        with self.lock:
            self.registered = False
            if opened:
                self.last_close_code, self.last_close_reason = close
            if error is not None and close[0] is None:
                self.last_error = error
            self.changed.notify_all()

    def snapshot(self, heartbeat_every: Callable[[dict[str, Any]], float | None]) -> dict[str, Any]:
        """The connection's part of the agent's status (see `WorkerAgent.status`)."""
        with self.lock:
            welcome = self.welcome
            return {
                "state": str(self.state),
                "registered": self.registered,
                "connection_id": welcome.get("connection_id"),
                "instance_id": welcome.get("instance_id"),
                "observed_ip": welcome.get("observed_ip"),
                "observed_port": welcome.get("observed_port"),
                "heartbeat_interval": heartbeat_every(welcome) if welcome else None,
                "attempts": self.attempts,
                "connects": self.connects,
                "started_at": self.started_at,
                "connected_at": self.connected_at,
                "registered_at": self.registered_at,
                "last_heartbeat_ack_at": self.last_heartbeat_ack_at,
                "last_error": self.last_error,
                "last_server_error": self.last_server_error,
                "last_close_code": self.last_close_code,
                "last_close_reason": self.last_close_reason,
                "next_attempt_at": self.next_attempt_at,
                "final_reason": self.final_reason,
            }
