"""`PeerApi`: the peer API of one agent, as `WorkerAgent(peer_api=True)` runs it and the
command line uses it. What peers may do here (forward to what is exposed, pipe to a waiting
command, send files to a receiving folder) and what this agent asks of peers (ping, forward,
pipe, send), over one pooled connection per peer.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..connection import PeerConnection, PeerStream
from .exposure import Endpoint, Exposures
from .forward import Event, Forward, serve_forward
from .pipe import PipeListener, Pipes
from .pool import Pool
from .receiving import Inbox, Inboxes, serve_files
from .router import Router
from .sending import SendOutcome, send_files

DIRECT_KINDS = ("direct", "lan")
PING_TIMEOUT = 2.0  # seconds a ping waits for its pong

Connect = Callable[[str, float], PeerConnection]
Fallback = Callable[[PeerConnection], None]


class PeerApi:
    def __init__(
        self,
        worker_id: str,
        connect: Connect,
        *,
        expose: Iterable[str] = (),
        inbox: str | Path | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.exposures = Exposures(expose)
        self.pipes = Pipes()
        self.inboxes = Inboxes(Path(inbox) if inbox else None)
        self.router = Router(
            worker_id,
            {
                "forward": lambda r: serve_forward(r, self.exposures, worker_id),
                "pipe": self.pipes.serve,
                "files": lambda r: serve_files(r, self.inboxes),
            },
        )
        self.pool = Pool(connect, lambda conn: self.router.serve(conn, incoming=False))
        self._served: weakref.WeakSet[PeerConnection] = weakref.WeakSet()

    # ---- connections peers open ----------------------------------------------------------------

    def accepted(self, connection: PeerConnection, fallback: Fallback | None = None) -> None:
        """A connection a peer opened (the agent's `on_peer`): its peer-API streams are served
        here, the others go to `fallback` (the host program's `on_peer`). Blocks until it ends."""
        self._served.add(connection)
        self.router.serve(connection, incoming=True, fallback=fallback)

    def use_of(self, connection: PeerConnection | None) -> str | None:
        """`commands` (opened here for the peer API), `served` (a peer's, served here), or None
        (the host program's own)."""
        if connection is None:
            return None
        if self.pool.owns(connection):
            return "commands"
        return "served" if connection in self._served else None

    # ---- what this agent asks of peers -----------------------------------------------------------

    def ping(
        self,
        peer_id: str,
        *,
        count: int = 4,
        interval: float = 1.0,
        until_direct: bool = False,
        timeout: float = PING_TIMEOUT,
        stop: threading.Event | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Pings over the pooled connection (opened first if need be: the PeerError that says why
        not is raised before anything is yielded): one `pong` or `timeout` per ping, `count`
        of them, or until one comes back over a direct or LAN route with `until_direct`."""
        connection = self.pool.connection(peer_id)
        stop = stop or threading.Event()
        for seq in range(1, count + 1):
            try:
                pong = connection.ping(timeout=timeout)
            except TimeoutError:
                yield {"event": "timeout", "seq": seq, "peer": peer_id, "after": timeout}
            else:
                yield {
                    "event": "pong",
                    "seq": seq,
                    "peer": peer_id,
                    "kind": pong.kind,
                    "address": list(pong.address) if pong.address else None,
                    "ms": round(1000 * pong.seconds, 3),
                }
                if until_direct and pong.kind in DIRECT_KINDS:
                    return
            if seq < count and stop.wait(interval):
                return

    def forward(self, peer_id: str, target: Endpoint, bind: Endpoint, event: Event) -> Forward:
        """A listening forward (PortInUse, the peer's refusal, or why it cannot be reached)."""
        forward = Forward(self.pool, peer_id, target, bind, event)
        forward.start()
        return forward

    @contextlib.contextmanager
    def pipe(self, peer_id: str) -> Iterator[PeerStream]:
        with self.pool.stream(peer_id, {"kind": "pipe"}) as (stream, _):
            yield stream

    def send(
        self,
        peer_id: str,
        paths: list[str],
        event: Event,
        *,
        cancelled: threading.Event | None = None,
    ) -> SendOutcome:
        return send_files(self.pool, peer_id, paths, event, cancelled=cancelled)

    # ---- what this agent lets peers do, while a command asks for it ------------------------------

    def expose(self, target: Endpoint) -> int:
        return self.exposures.add(target)

    def withdraw(self, handle: int) -> None:
        self.exposures.remove(handle)

    def listen_pipe(self, from_peer: str | None) -> PipeListener:
        return self.pipes.listen(from_peer)

    def receive(self, inbox: Inbox) -> None:
        self.inboxes.open(inbox)

    def stop_receiving(self, inbox: Inbox) -> None:
        self.inboxes.close(inbox)

    def describe(self) -> dict[str, Any]:
        return {"exposed": self.exposures.listed(), "receiving": self.inboxes.listed()}

    def close(self) -> None:
        self.pool.close()
