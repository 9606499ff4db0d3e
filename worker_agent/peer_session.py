"""One introduction as the agent carries it: a `PathSession` (paths: the relay at once, ICE for
better routes) and, for an encrypted connection, a `QuicSession` on that path (secure) wrapped in
the `PeerConnection` the host program uses. `Peers` (peers.py) opens one per introduction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import NoPath, PeerError

if TYPE_CHECKING:
    from .connection import PeerConnection
    from .paths.loop import LoopThread
    from .paths.session import PathSession
    from .secure.identity import WorkerIdentity
    from .secure.quic import QuicSession


class PeerSession:
    """One introduction as the agent carries it (a signalling `Carrier`): its path session and,
    for an encrypted connection, QUIC on that path. Created on the session's reading thread;
    everything else runs on the peer loop."""

    def __init__(
        self,
        *,
        introduction: dict[str, Any],
        loop: LoopThread,
        paths: PathSession,
        identity: WorkerIdentity | None,
        on_end: Callable[[PeerSession], None],
        on_link_lost: Callable[[PeerSession], None],
    ) -> None:
        self.introduction_id = paths.introduction_id
        self.peer_id = paths.peer_id
        self.transport = introduction.get("transport") or wire.Transport.QUIC
        self.paths = paths
        self.path = paths.path
        self.quic: QuicSession | None = None
        self.connection: PeerConnection | None = None
        self._loop = loop
        self._identity = identity
        self._peer_certificate = introduction.get("peer_certificate")
        self._on_link_lost = on_link_lost
        paths.on_closing = self._closing
        paths.on_end = lambda reason: on_end(self)

    def __repr__(self) -> str:
        return f"<PeerSession {self.introduction_id[:8]} with {self.peer_id} {self.path.kind}>"

    @property
    def failure(self) -> PeerError | None:
        return self.paths.failure

    @property
    def closed_reason(self) -> str | None:
        return self.path.closed_reason

    # ---- signalling's Carrier: from the service session's reading thread --------------------

    def start(self) -> None:
        self._loop.call_soon(self._start)

    def ice_candidates(self, message: dict[str, Any]) -> None:
        self._loop.call_soon(self.paths.remote_candidates, message)

    def relayed(self, datagrams: list[bytes]) -> None:
        self._loop.call_soon(self.paths.relayed, datagrams)

    def peer_closed(self, reason: str) -> None:
        self._loop.call_soon(self.paths.end, reason)

    def relay_lost(self, reason: str, *, resumable: bool) -> None:
        """This side's connection to the service was renewed: the service link is gone; the
        introduction is resumed where the service can (else, with no route left, it ends)."""
        self._loop.call_soon(self.paths.relay_lost, reason, resumable)
        if resumable:
            self._on_link_lost(self)

    def peer_offline(self, reason: str) -> None:
        """The peer's connection to the service ended; it may come back and resume."""
        self._loop.call_soon(self.paths.relay_lost, reason, True)
        self._on_link_lost(self)

    def resume(self, introduction: dict[str, Any]) -> None:
        self.introduction_id = str(introduction["introduction_id"])
        self._loop.call_soon(self.paths.resume, introduction)

    @property
    def controlling(self) -> bool:
        return self.paths.controlling

    @property
    def ended(self) -> bool:
        return self.paths.ended

    def end(self, reason: str) -> None:
        self._loop.call_soon(self.paths.end, reason)

    # ---- on the peer loop ----------------------------------------------------------------------

    def _start(self) -> None:
        if self.paths.start() and self.transport == wire.Transport.QUIC:
            self._start_quic()

    def _start_quic(self) -> None:
        """QUIC over the path from the start: the initiator is the client."""
        from .connection import PeerConnection
        from .secure.identity import certificate_from_header
        from .secure.quic import QuicSession

        try:
            if self._identity is None:
                raise NoPath("this agent has no identity (no p2p extra, or it could not make one)")
            if not self._peer_certificate:
                raise NoPath(f"worker {self.peer_id} has no identity: its agent is too old")
            peer = certificate_from_header(self._peer_certificate)
            self.quic = QuicSession(
                path=self.path,
                own=self._identity,
                peer_certificate=peer,
                client=self.paths.controlling,
            )
        except NoPath as exc:
            self.paths.fail(exc)
            return
        except (ValueError, TypeError) as exc:  # an unusable certificate, ours or the peer's
            self.paths.fail(NoPath(f"cannot start QUIC: {exc}"))
            return
        self.quic.on_closed = lambda quic: self.paths.end(
            f"connection closed: {quic.closed_reason}"
        )
        self.connection = PeerConnection(session=self.quic, loop=self._loop, path=self.path)
        self.quic.start()

    async def established(self) -> PeerConnection:
        """The connection once its handshake completed (pinned identities checked both ways)."""
        if self.quic is None or self.connection is None:
            raise self.failure or NoPath("no QUIC connection on this introduction")
        await asyncio.shield(self.quic.handshake)
        return self.connection

    def _closing(self, reason: str) -> None:
        if self.quic is not None:
            self.quic.close(reason)
