"""Who takes a stream a peer opened: the peer API, by the header it starts with, or the host
program's own `on_peer`, which sees the connection as if the peer API were not there.

Streams of the peer API go in the direction the service introduced the pair: on a connection a
peer opened to this agent (the service checked that it may reach this one), its streams are
served; on a connection this agent opened, the peer's streams are refused (`NOT_SERVED`), since
the peer policy says who may reach whom, one way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..connection import DEFAULT_TIMEOUT, PeerConnection, PeerStream
from ..errors import PeerError
from . import header
from .errors import NotServed, PeerApiError

logger = logging.getLogger("worker_agent")

RESET_NOT_SERVED = 0x5256  # the stream code of a stream nobody here takes ("RV")


class Request:
    """One peer-API stream as its handler sees it: who, what was asked, and the one reply."""

    def __init__(self, connection: PeerConnection, stream: PeerStream, ask: dict[str, Any]):
        self.connection = connection
        self.stream = stream
        self.ask = ask
        self.peer_id = connection.peer_id
        self.replied = False

    def accept(self, **fields: Any) -> None:
        self.replied = True
        header.write(self.stream, {"ok": True, **fields})

    def refuse(self, exc: PeerApiError) -> None:
        self.replied = True
        header.write(self.stream, header.refusal(exc), timeout=5)
        self.stream.close()


Handler = Callable[[Request], None]


class RoutedConnection(PeerConnection):
    """The connection as the host program's `on_peer` gets it: the same connection, whose
    `accept_stream` returns only the streams that are not the peer API's."""

    def __init__(self, connection: PeerConnection, handed: queue.SimpleQueue[int | None]):
        super().__init__(session=connection._session, loop=connection._loop, path=connection.path)
        self._handed = handed

    def accept_stream(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> PeerStream:
        try:
            stream_id = self._handed.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no stream from {self.peer_id} within {timeout}s") from None
        if stream_id is None:
            self._handed.put(None)
            return super().accept_stream(timeout=0)  # raises PeerClosed with the reason
        return PeerStream(self, stream_id, self._session.streams[stream_id])


class Router:
    def __init__(self, worker_id: str, handlers: Mapping[str, Handler]) -> None:
        self.worker_id = worker_id
        self.handlers = dict(handlers)

    def serve(
        self,
        connection: PeerConnection,
        *,
        incoming: bool,
        fallback: Callable[[PeerConnection], None] | None = None,
    ) -> None:
        """Take the connection's streams until it ends (blocks). `incoming`: the peer opened the
        connection, so its peer-API streams are served. `fallback` gets the connection, in a
        thread of its own, with the other streams."""
        handed: queue.SimpleQueue[int | None] | None = None
        if fallback is not None:
            handed = queue.SimpleQueue()
            routed = RoutedConnection(connection, handed)
            threading.Thread(
                target=_run_fallback,
                args=(fallback, routed, self.worker_id),
                name=f"worker-agent-peer-{connection.peer_id[:12]}",
                daemon=True,
            ).start()
        try:
            while True:
                try:
                    stream = connection.accept_stream(timeout=None)
                except PeerError:
                    return
                threading.Thread(
                    target=self._route,
                    args=(connection, stream, incoming, handed),
                    name=f"worker-agent-stream-{connection.peer_id[:12]}",
                    daemon=True,
                ).start()
        finally:
            if handed is not None:
                handed.put(None)

    def _route(
        self,
        connection: PeerConnection,
        stream: PeerStream,
        incoming: bool,
        handed: queue.SimpleQueue[int | None] | None,
    ) -> None:
        try:
            ours = header.is_peer_api(stream)
        except PeerError:
            return  # the stream or the connection broke before it said anything
        if not ours:
            if handed is not None:
                handed.put(stream.stream_id)
            else:
                logger.info(
                    "worker=%s: a stream from %s that is not the peer API's: reset",
                    self.worker_id,
                    connection.peer_id,
                )
                stream.reset(RESET_NOT_SERVED)
            return
        self._serve(connection, stream, incoming)

    def _serve(self, connection: PeerConnection, stream: PeerStream, incoming: bool) -> None:
        request: Request | None = None
        try:
            ask = header.read_request(stream)
            request = Request(connection, stream, ask)
            handler = self.handlers.get(ask["kind"])
            if not incoming:
                raise NotServed(
                    f"{self.worker_id} opened this connection: it serves peer-API streams only "
                    "on connections a peer opens to it"
                )
            if handler is None:
                raise NotServed(f"{self.worker_id} does not serve {ask['kind']!r} streams")
            handler(request)
        except PeerApiError as exc:
            logger.warning(
                "worker=%s: refused a %s stream from %s: %s (%s)",
                self.worker_id,
                request.ask.get("kind") if request else "peer-API",
                connection.peer_id,
                exc,
                exc.code,
            )
            if request is None or not request.replied:
                with contextlib.suppress(PeerError, TimeoutError):
                    header.write(stream, header.refusal(exc), timeout=5)
                    stream.close()
            else:
                stream.reset(RESET_NOT_SERVED)
        except (PeerError, TimeoutError) as exc:
            logger.info(
                "worker=%s: a peer-API stream from %s ended: %s",
                self.worker_id,
                connection.peer_id,
                exc,
            )
            stream.reset(RESET_NOT_SERVED)
        except Exception:
            logger.exception("worker=%s: a peer-API handler raised", self.worker_id)
            stream.reset(RESET_NOT_SERVED)


def _run_fallback(
    fallback: Callable[[PeerConnection], None], connection: PeerConnection, worker_id: str
) -> None:
    try:
        fallback(connection)
    except Exception:
        logger.exception("worker=%s: the on_peer callback raised", worker_id)
