"""A tiny HTTP server beside the agent: 200 `OK` to any GET, the status snapshot on `/status`.

Cloud Run health-checks every revision over HTTP, so the proof-of-concept worker answered any
GET with 200; this keeps that and adds a JSON view of what the agent is doing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

StatusProvider = Callable[[], Mapping[str, Any]]

STATUS_PATHS = frozenset({"/status", "/status.json"})

logger = logging.getLogger("worker_agent")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    status_provider: StatusProvider | None = None


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if urlsplit(self.path).path in STATUS_PATHS and self.server.status_provider is not None:
            self._send_status()
        else:
            self._send(200, b"OK", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self._send(200, b"", "text/plain; charset=utf-8", length=2)

    def _send_status(self) -> None:
        provider = self.server.status_provider
        assert provider is not None
        try:
            body = json.dumps(dict(provider()), default=str, sort_keys=True).encode()
        except Exception:
            logger.exception("health: building the status snapshot failed")
            self._send(500, b'{"error":"status unavailable"}', "application/json")
            return
        self._send(200, body, "application/json")

    def _send(self, status: int, body: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("health: %s %s", self.address_string(), format % args)


class HealthServer:
    """Serves in a daemon thread. Port 0 picks a free port; `port` tells which one after start."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = 8080, status: StatusProvider | None = None
    ) -> None:
        self.host = host
        self.requested_port = port
        self.status = status
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_address[1]

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("the health server is already running")
        server_class = _V6Server if ":" in self.host else _Server
        server = server_class((self.host, self.requested_port), _Handler)
        server.status_provider = self.status
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"worker-agent-health-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("health: listening on %s:%s", self.host, self.port)
        return server.server_address[1]

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
