"""TCP forwarding, as `ssh -L` does it: a local listener whose every connection becomes a
stream to a peer, which connects it to a host and port its operator exposed.

The answering side forwards **only** to what was exposed (`Exposures`: `RENDEZVOUS_EXPOSE` at
start, `rendezvous-worker expose` while it runs); anything else is refused with `NOT_EXPOSED`
and logged on both sides. A forward checks at its start that the peer would take its target, so
a refusal is said before anyone connects.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..errors import PeerError
from .errors import NotExposed, PeerApiError, PortInUse, TargetUnreachable, code_of
from .exposure import Endpoint, Exposures, format_endpoint
from .pool import Pool
from .router import Request
from .splice import SocketEnd, splice

logger = logging.getLogger("worker_agent")

Event = Callable[[dict[str, Any]], None]
CONNECT_TIMEOUT = 5.0


# ---- the answering side ------------------------------------------------------------------------


def serve_forward(request: Request, exposures: Exposures, worker_id: str) -> None:
    """A peer asks for a TCP connection to a host and port: only to what is exposed."""
    try:
        target = (str(request.ask["host"]), int(request.ask["port"]))
    except (KeyError, TypeError, ValueError):
        raise NotExposed("a forward needs a host and a port") from None
    shown = format_endpoint(target)
    if not exposures.allows(target):
        raise NotExposed(f"{shown} is not exposed")
    if request.ask.get("check"):
        request.accept()
        return
    try:
        sock = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise TargetUnreachable(f"cannot connect to {shown}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    logger.info("worker=%s: forwarding a stream from %s to %s", worker_id, request.peer_id, shown)
    end = SocketEnd(sock)
    try:
        request.accept()
        done = splice(end, request.stream)
    finally:
        end.close()
    logger.info(
        "worker=%s: forward from %s to %s ended: %d bytes in, %d out%s",
        worker_id,
        request.peer_id,
        shown,
        done.sent,
        done.received,
        f" ({done.error})" if done.error else "",
    )


# ---- the asking side -----------------------------------------------------------------------------


class Forward:
    """A local listener at `bind` whose connections go to `target` on `peer_id`."""

    def __init__(
        self, pool: Pool, peer_id: str, target: Endpoint, bind: Endpoint, event: Event
    ) -> None:
        self.pool = pool
        self.peer_id = peer_id
        self.target = target
        self.bind = bind
        self.event = event
        self.listener: socket.socket | None = None
        self._open = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> Endpoint:
        assert self.listener is not None
        host, port = self.listener.getsockname()[:2]
        return host, port

    def start(self, timeout: float = 10.0) -> None:
        """Listen, then ask the peer whether it takes the target: PortInUse, NotExposed, or
        why the peer cannot be reached."""
        try:
            self.listener = socket.create_server(
                self.bind, family=_family(self.bind[0]), backlog=128
            )
        except OSError as exc:
            shown = format_endpoint(self.bind)
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{shown} is in use by another program") from None
            raise PortInUse(f"cannot listen on {shown}: {exc.strerror or exc}") from None
        try:
            with self.pool.stream(self.peer_id, self._request(check=True), timeout=timeout):
                pass
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._accept, name="worker-agent-forward", daemon=True).start()

    def stop(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _request(self, *, check: bool = False) -> dict[str, Any]:
        request: dict[str, Any] = {
            "kind": "forward",
            "host": self.target[0],
            "port": self.target[1],
        }
        if check:
            request["check"] = True
        return request

    def _accept(self) -> None:
        while (listener := self.listener) is not None:
            try:
                client, address = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(
                target=self._serve,
                args=(client, address),
                name="worker-agent-forwarded",
                daemon=True,
            ).start()

    def _serve(self, client: socket.socket, address: tuple[Any, ...]) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = SocketEnd(client)
        source = format_endpoint((address[0], address[1]))
        with self._lock:
            self._open += 1
        try:
            with self.pool.stream(self.peer_id, self._request()) as (stream, _):
                self.event({"event": "opened", "from": source, "open": self._open})
                done = splice(end, stream)
            self.event(
                {
                    "event": "closed",
                    "from": source,
                    "sent": done.sent,
                    "received": done.received,
                    "error": done.error,
                }
            )
        except (PeerApiError, PeerError, TimeoutError) as exc:
            logger.warning(
                "forward %s -> %s:%s refused: %s", source, self.peer_id, self.target, exc
            )
            self.event(
                {"event": "refused", "from": source, "code": code_of(exc), "error": str(exc)}
            )
            end.abort()
        finally:
            end.close()
            with self._lock:
                self._open -= 1


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
