"""What the agent tells the service once registered: who it is (agent info), its public address
(from the IP echo), and that it is alive (heartbeats at the interval the welcome gives).

Runs in a thread of its own per connection, so a slow IP echo never holds up the socket.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import websocket

from .. import wire
from ..version import __version__
from .attempt import Attempt

logger = logging.getLogger("worker_agent")

Send = Callable[[Attempt, str], bool]
Log = Callable[..., None]


def default_agent_info() -> dict[str, wire.Scalar]:
    """What the agent tells the server about itself once per connection."""
    return {
        "agent": "rendezvous-worker-agent",
        "agent_version": __version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "websocket_client_version": getattr(websocket, "__version__", "unknown"),
    }


class Reporter:
    def __init__(
        self,
        *,
        worker_id: str,
        agent_info: Mapping[str, wire.Scalar] | None,
        fetch_public_ip: Callable[[], str | None],
        heartbeat_interval: float | None,
        start_nat_check: Callable[[], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.agent_info = wire.clean_agent_info({**default_agent_info(), **(agent_info or {})})
        self._fetch_public_ip = fetch_public_ip
        self.heartbeat_interval = heartbeat_interval
        self._start_nat_check = start_nat_check
        self._lock = threading.Lock()
        self._public_ip: str | None = None
        self._public_ip_registered: str | None = None

    @property
    def public_ip(self) -> str | None:
        with self._lock:
            return self._public_ip

    @property
    def public_ip_registered(self) -> str | None:
        with self._lock:
            return self._public_ip_registered

    def acknowledged(self, attempt: Attempt, ip: Any) -> None:
        """The server answered `public_ip_registered` on this attempt's socket."""
        attempt.public_ip_acked = True
        with self._lock:
            self._public_ip_registered = ip

    def heartbeat_every(self, welcome: Mapping[str, Any]) -> float | None:
        if self.heartbeat_interval is not None:
            return float(self.heartbeat_interval)
        value = welcome.get("heartbeat_interval")
        return float(value) if _positive(value) else None

    def run(
        self, attempt: Attempt, welcome: dict[str, Any], welcomed_at: float, send: Send, log: Log
    ) -> None:
        """Agent info, the NAT check, the public address, then heartbeats until the end."""
        if not send(attempt, wire.agent_info(self.agent_info)):
            return
        if self._start_nat_check is not None:
            self._start_nat_check()
        report = self._public_ip_report(attempt, send, log)
        if attempt.ended.is_set():
            return
        interval = self.heartbeat_every(welcome)
        if interval is None:
            log(logging.WARNING, attempt, "welcome gave no heartbeat interval; sending none")
            return
        next_at = welcomed_at + interval
        while not attempt.ended.wait(max(0.0, next_at - time.monotonic())):
            if report is not None and not attempt.public_ip_acked:
                # Not acknowledged (say the server answered UNAVAILABLE): report it again.
                send(attempt, report)
            if not send(attempt, wire.heartbeat()):
                return
            next_at = max(next_at + interval, time.monotonic())

    def _public_ip_report(self, attempt: Attempt, send: Send, log: Log) -> str | None:
        """Ask the IP echo and report what it said; the frame, to repeat until acknowledged."""
        try:
            ip = self._fetch_public_ip()
        except Exception:
            logger.exception("worker=%s: the public ip fetcher raised", self.worker_id)
            ip = None
        if attempt.ended.is_set() or not ip:
            return None
        try:
            report = wire.register_public_ip(ip)
        except ValueError:
            log(logging.WARNING, attempt, "not reporting invalid public ip %r", ip)
            return None
        with self._lock:
            self._public_ip = ip
        if send(attempt, report):
            log(logging.INFO, attempt, "reported public ip %s", ip)
        return report


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
