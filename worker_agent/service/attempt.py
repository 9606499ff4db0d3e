"""One connection attempt to the service and what its websocket-client callbacks saw.

The callbacks only record here; the session's own loop decides what to do once the attempt
ended (`reconnect.ReconnectPolicy` reads its `outcome()`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import websocket

from .reconnect import Outcome


class Attempt:
    def __init__(self, number: int) -> None:
        self.number = number
        self.app: websocket.WebSocketApp | None = None
        self.ws: websocket.WebSocket | None = None  # the open socket, kept to close it ourselves
        self.opened_at: float | None = None
        self.ended_at: float | None = None
        self.welcome: dict[str, Any] | None = None
        self.connection_id: Any = None
        self.closing: dict[str, Any] | None = None
        self.public_ip_acked = False  # the server answered `public_ip_registered` on this socket
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.error: BaseException | None = None
        self.handshake_status: int | None = None
        self.reporter: threading.Thread | None = None
        self.ended = threading.Event()

    def effective_close(self) -> tuple[int | None, str | None]:
        """The server's `closing` frame when it sent one (daphne drops close reasons)."""
        if self.closing is not None and isinstance(self.closing.get("code"), int):
            reason = self.closing.get("reason")
            return self.closing["code"], reason if isinstance(reason, str) else None
        return self.close_code, self.close_reason

    def outcome(self) -> Outcome:
        uptime = 0.0
        if self.opened_at is not None:
            uptime = max(0.0, (self.ended_at or time.monotonic()) - self.opened_at)
        code, reason = self.effective_close()
        return Outcome(
            opened=self.opened_at is not None,
            registered=self.welcome is not None,
            uptime=uptime,
            close_code=code,
            close_reason=reason,
            handshake_status=self.handshake_status,
        )

    def abort(self) -> None:
        """Shut the raw socket down (without closing it) so the reading thread wakes up."""
        app = self.app
        ws = self.ws or (app.sock if app is not None else None)
        raw = getattr(ws, "sock", None)
        if raw is None:
            return
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)

    def describe_end(self, why: str) -> str:
        """How this attempt ended, and `why` the session does what it does next."""
        outcome = self.outcome()
        code, reason = self.effective_close()
        if not outcome.opened:
            error = self.describe_error() if self.error else "no answer"
            return f"connection failed ({error})"
        text = f"connection ended after {outcome.uptime:.1f}s"
        if code is not None:
            text += f" with close code {code}"
            if reason:
                text += f" ({reason})"
        elif self.error is not None:
            text += f" ({self.describe_error()})"
        return f"{text}: {why}"

    def describe_error(self) -> str | None:
        exc = self.error
        if exc is None:
            return None
        if isinstance(exc, websocket.WebSocketBadStatusException):
            return f"HTTP {exc.status_code} at the handshake"
        text = str(exc).split(" -+-+- ")[0]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
