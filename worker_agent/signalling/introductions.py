"""The agent's side of peer discovery and introductions: signalling over the agent's WebSocket.

`WorkerAgent` owns one `Peering` and hands it the peer frames (text and binary); the host
program calls `agent.connect(peer_id)`, `agent.list_peers()` and `agent.subscribe_peers()`.
Discovery needs nothing beyond the standard library. Connections need the `p2p` extra (aioice):
`worker_agent.p2p` runs ICE, the service relay and the path that moves between them, on an
asyncio loop of its own (docs/nat-traversal.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import wire
from .p2p.errors import (
    MISSING_EXTRA,
    NoPath,
    P2PUnavailable,
    PeerClosed,
    PeerError,
    PeerRefused,
    PeerUnavailable,
    PeerUnresponsive,
    PolicyDenied,
)

if TYPE_CHECKING:
    from .p2p.connection import PeerConnection
    from .p2p.identity import WorkerIdentity
    from .p2p.loop import LoopThread
    from .p2p.netcheck import NatReport
    from .p2p.path import PeerPath
    from .p2p.relay import RelayLink
    from .p2p.session import PeerSession

logger = logging.getLogger("worker_agent")

DEFAULT_CONNECT_TIMEOUT = 10.0
NAT_CHECK_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 10.0  # the answering side's wait for the initiator's QUIC handshake
ENDED_KEPT = 16

Send = Callable[[str], bool]
SendBinary = Callable[[bytes], bool]
PeerCallback = Callable[["PeerConnection"], None]
PathCallback = Callable[["PeerPath"], None]

_FAILURES: dict[str, type[PeerError]] = {
    wire.ConnectFailure.PEER_UNAVAILABLE: PeerUnavailable,
    wire.ConnectFailure.PEER_UNRESPONSIVE: PeerUnresponsive,
    wire.ConnectFailure.PEER_REFUSED: PeerRefused,
    wire.ConnectFailure.POLICY_DENIED: PolicyDenied,
}
_ANSWERS = (
    wire.ServerMessageType.INTRODUCTION,
    wire.ServerMessageType.CONNECT_FAILED,
    wire.ServerMessageType.PEER_CLOSED,
)


class Peering:
    def __init__(
        self,
        worker_id: str,
        send: Send,
        *,
        send_binary: SendBinary,
        stun_servers: Sequence[str] | None = None,
        on_peer: PeerCallback | None = None,
        on_peer_path: PathCallback | None = None,
        use_udp: bool = True,
        identity: WorkerIdentity | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._send = send
        self._send_binary = send_binary
        self._configured_stun = list(stun_servers) if stun_servers else None
        self._advertised_stun: list[str] = []
        self.on_peer = on_peer
        self.on_peer_path = on_peer_path
        self.use_udp = use_udp
        self.identity = identity
        self._lock = threading.Lock()
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._answering: set[str] = set()
        self._sessions: dict[str, PeerSession] = {}
        # Sessions that ended lately, so a connect() that looks its session up just after it
        # ended can say why (the last few only).
        self._ended: OrderedDict[str, PeerSession] = OrderedDict()
        self._connects: dict[str, float] = {}  # request id -> when connect() began
        self._subscription: tuple[bool, str | None] = (False, None)
        self._loop: LoopThread | None = None
        self._relay: RelayLink | None = None
        self._closed = False
        self.last_nat_report: NatReport | None = None

    # ---- the session with the service ---------------------------------------------------------

    def session_started(self, welcome: dict[str, Any]) -> None:
        """A new registration: the service's STUN servers, the subscription renewed; relay links
        of the previous connection are gone (direct routes carry on)."""
        advertised = welcome.get("stun_servers")
        if isinstance(advertised, list):
            self._advertised_stun = [s for s in advertised if isinstance(s, str)]
        subscribed, tag = self._subscription
        if subscribed:
            self._send(wire.subscribe_peers(tag))
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._on_loop(session.relay_lost, "the connection to the service was renewed")

    def stun_servers(self) -> list[tuple[str, int]]:
        servers = []
        for text in self._configured_stun or self._advertised_stun:
            try:
                servers.append(wire.parse_host_port(text))
            except ValueError:
                logger.warning("worker=%s: ignoring STUN server %r", self.worker_id, text)
        return servers

    def report_nat(self) -> NatReport | None:
        """Classify the NAT from a fresh socket and tell the service (admin, API, peer list)."""
        servers = self.stun_servers()
        if not servers:
            return None
        from .p2p.netcheck import classify_nat

        report = self._p2p_loop().call(
            classify_nat(servers, timeout=NAT_CHECK_TIMEOUT), NAT_CHECK_TIMEOUT + 2
        )
        self.last_nat_report = report
        self._send(wire.nat_report(report.mapping.value, report.mapped))
        logger.info(
            "worker=%s: NAT mapping %s, UDP endpoint %s",
            self.worker_id,
            report.mapping.value,
            report.mapped,
        )
        return report

    def close(self) -> None:
        """The agent stops: every path ends, the peer loop stops."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            loop, relay = self._loop, self._relay
        for session in sessions:
            self._on_loop(session.end, "the agent stopped")
        if relay is not None:
            relay.close()
        if loop is not None:
            loop.stop()

    # ---- what the host program calls ------------------------------------------------------------

    def list_peers(self, *, tag: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        request_id = _request_id()
        reply = self._ask(wire.list_peers(request_id=request_id, tag=tag), request_id, timeout)
        peers = reply.get("peers")
        return peers if isinstance(peers, list) else []

    def subscribe(self, tag: str | None = None) -> None:
        """Peer events (`peer_joined`, `peer_left`) from now on, renewed after reconnects."""
        self._subscription = (True, tag)
        self._send(wire.subscribe_peers(tag))

    def unsubscribe(self) -> None:
        self._subscription = (False, None)
        self._send(wire.unsubscribe_peers())

    def connect(self, peer_id: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> PeerConnection:
        """An encrypted connection to `peer_id`, pinned to its introduced identity, once its
        handshake completed over the first route that carries data (the relay, normally)."""
        started = time.monotonic()
        session = self._introduce(peer_id, wire.Transport.QUIC, timeout)
        try:
            connection = self._p2p_loop().call(
                session.established(), max(0.1, started + timeout - time.monotonic())
            )
        except TimeoutError:
            session.path.close("no QUIC handshake in time")
            raise NoPath(
                f"introduced to {peer_id}, but the encrypted handshake did not complete within "
                f"{timeout:g}s (path: {session.path.kind})"
            ) from None
        except PeerError:
            session.path.close("no QUIC connection")
            raise
        logger.info(
            "worker=%s: connected to %s over %s in %.0f ms (handshake %.0f ms)",
            self.worker_id,
            peer_id,
            connection.path_kind,
            1000 * (time.monotonic() - started),
            1000 * (connection.handshake_seconds or 0),
        )
        return connection

    def connect_path(self, peer_id: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> PeerPath:
        """A raw datagram path to `peer_id` (not encrypted), as soon as a route carries data."""
        started = time.monotonic()
        session = self._introduce(peer_id, wire.Transport.DATAGRAMS, timeout)
        path = session.path
        if path.kind is None and not path.wait_for_kind(
            *[k.value for k in wire.PathKind],
            timeout=max(0.0, started + timeout - time.monotonic()),
        ):
            path.close("no path came up")
            raise NoPath(
                f"introduced to {peer_id}, but no route carried data within {timeout:g}s "
                f"({path.closed_reason or 'the relay was not offered and ICE found no pair'})"
            )
        logger.info(
            "worker=%s: path to %s over %s in %.0f ms",
            self.worker_id,
            peer_id,
            path.kind,
            1000 * (time.monotonic() - started),
        )
        return path

    def _introduce(self, peer_id: str, transport: str, timeout: float) -> PeerSession:
        """Ask the service to introduce us to `peer_id`; the session the introduction opened."""
        started = time.monotonic()
        self._p2p_loop()  # P2PUnavailable at once, before the peer is bothered
        request_id = _request_id()
        with self._lock:
            self._connects[request_id] = started
        try:
            reply = self._ask(
                wire.connect_request(peer_id=peer_id, request_id=request_id, transport=transport),
                request_id,
                timeout,
                until=_ANSWERS,
            )
        finally:
            with self._lock:
                self._connects.pop(request_id, None)
        kind = reply["type"]
        if kind == wire.ServerMessageType.CONNECT_FAILED:
            code = str(reply.get("code", ""))
            failure = _FAILURES.get(code, PeerError)
            raise failure(f"cannot reach {peer_id}: {reply.get('reason')}", code=code)
        if kind == wire.ServerMessageType.PEER_CLOSED:
            raise PeerClosed(f"cannot reach {peer_id}: {reply.get('reason')}")
        introduction_id = str(reply.get("introduction_id"))
        session = self._session(introduction_id)
        if session is None:  # ended between the introduction and now
            with self._lock:
                ended = self._ended.get(introduction_id)
            if ended is not None and ended.quic_failure is not None:
                raise ended.quic_failure
            reason = ended.path.closed_reason if ended is not None else None
            raise PeerClosed(f"the connection to {peer_id} ended at once: {reason or 'closed'}")
        return session

    # ---- frames from the service (on the agent's socket thread: never block) ------------------

    def handle(self, message: dict[str, Any]) -> bool:
        """Take a peer frame; False if it is not one of ours."""
        kind = message.get("type")
        if kind == wire.ServerMessageType.INTRODUCTION_REQUEST:
            self._requested(message)
            return True
        if kind == wire.ServerMessageType.INTRODUCTION:
            self._introduced(message)
            return True
        if kind == wire.ServerMessageType.ICE_CANDIDATES:
            session = self._session(message.get("introduction_id"))
            if session is not None:
                self._on_loop(session.remote_candidates, message)
            return True
        if kind == wire.ServerMessageType.PEER_CLOSED:
            session = self._session(message.get("introduction_id"))
            if session is not None:
                self._on_loop(session.end, f"closed by the peer: {message.get('reason')}")
            else:
                self._wake(message)
            return True
        if kind == wire.ServerMessageType.CONNECT_FAILED:
            with self._lock:
                self._answering.discard(str(message.get("introduction_id")))
            self._wake(message)
            return True
        if kind in (wire.ServerMessageType.PEERS, wire.ServerMessageType.CONNECT_PENDING):
            self._wake(message)
            return True
        return kind in (
            wire.ServerMessageType.PATH_REPORT_RECORDED,
            wire.ServerMessageType.INTRODUCTION_REJECTED,
        )

    def relay_frame(self, frame: bytes) -> None:
        """A binary frame: datagrams from a peer through the service relay."""
        try:
            introduction_id, datagrams = wire.parse_relay_frame(frame)
        except wire.ServerFrameError as exc:
            logger.warning("worker=%s: ignoring a binary frame: %s", self.worker_id, exc)
            return
        session = self._session(introduction_id)
        if session is not None:
            self._on_loop(session.relayed, datagrams)

    # ---- introductions -------------------------------------------------------------------------

    def _requested(self, request: dict[str, Any]) -> None:
        """Another worker asks to reach this one: accept at once, or say why not."""
        introduction_id = str(request.get("introduction_id"))
        reason = None
        quic = request.get("transport", wire.Transport.QUIC) == wire.Transport.QUIC
        if (self.on_peer if quic else self.on_peer_path) is None:
            reason = (
                "this worker does not accept peer connections"
                if quic
                else "this worker does not accept raw datagram paths"
            )
        elif quic and self.identity is None:
            reason = "this worker has no identity for encrypted connections"
        else:
            try:
                self._p2p_loop()
            except P2PUnavailable:
                reason = f"this worker cannot take peer connections ({MISSING_EXTRA})"
        if reason is not None:
            self._send(wire.introduction_reject(introduction_id=introduction_id, reason=reason))
            return
        with self._lock:
            self._answering.add(introduction_id)
        self._send(wire.introduction_accept(introduction_id=introduction_id))

    def _introduced(self, introduction: dict[str, Any]) -> None:
        """Both sides get this: the session starts now, before any relayed datagram arrives."""
        introduction_id = str(introduction.get("introduction_id"))
        responder = introduction.get("role") == "responder"
        with self._lock:
            answering = introduction_id in self._answering
            self._answering.discard(introduction_id)
            waited_for = introduction.get("request_id") in self._waiters
        if (responder and not answering) or (not responder and not waited_for):
            # Nobody here asked for it any more (connect() gave up): end it for the peer too.
            self._send(
                wire.peer_close(introduction_id=introduction_id, reason="the requester gave up")
            )
            return
        session = self._open_session(introduction)
        if not responder:
            self._wake(introduction)
            return
        threading.Thread(
            target=self._hand_over,
            args=(session,),
            name=f"worker-agent-peer-{session.peer_id[:12]}",
            daemon=True,
        ).start()

    def _hand_over(self, session: PeerSession) -> None:
        """The answering side: `on_peer(connection)` once the handshake completed, or
        `on_peer_path(path)` for a raw datagram path."""
        try:
            if session.transport == wire.Transport.QUIC:
                connection = self._p2p_loop().call(session.established(), HANDSHAKE_TIMEOUT)
                callback: Callable[[Any], None] | None = self.on_peer
                handed: Any = connection
            else:
                callback, handed = self.on_peer_path, session.path
        except (PeerError, TimeoutError) as exc:
            logger.warning(
                "worker=%s: connection from %s failed: %s", self.worker_id, session.peer_id, exc
            )
            session.path.close(f"no connection: {exc}")
            return
        if callback is None:
            return
        try:
            callback(handed)
        except Exception:
            logger.exception("worker=%s: the on_peer callback raised", self.worker_id)

    def _open_session(self, introduction: dict[str, Any]) -> PeerSession:
        from .p2p.session import PeerSession

        loop, relay = self._p2p_loop(), self._relay_link()
        servers = self.stun_servers()
        with self._lock:
            started = self._connects.get(str(introduction.get("request_id")))
        session = PeerSession(
            introduction=introduction,
            loop=loop,
            relay=relay,
            signal=self._send,
            stun_server=servers[0] if servers else None,
            use_udp=self.use_udp,
            started=started,
            on_end=self._session_ended,
            identity=self.identity,
        )
        with self._lock:
            self._sessions[session.introduction_id] = session
        loop.call_soon(session.start)
        return session

    def _session_ended(self, session: PeerSession) -> None:
        with self._lock:
            if self._sessions.get(session.introduction_id) is session:
                del self._sessions[session.introduction_id]
            self._ended[session.introduction_id] = session
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    def ended_here(self, introduction_id: Any) -> bool:
        """Whether this agent ended the introduction lately (its last packets may still reach
        the service after the service ended the link: their errors are no news)."""
        with self._lock:
            return isinstance(introduction_id, str) and introduction_id in self._ended

    def _session(self, introduction_id: Any) -> PeerSession | None:
        with self._lock:
            return self._sessions.get(introduction_id) if isinstance(introduction_id, str) else None

    def sessions(self) -> list[PeerSession]:
        with self._lock:
            return list(self._sessions.values())

    # ---- plumbing ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Import what peer connections need (aioice, aioquic, cryptography: about a quarter of a
        second of CPU) ahead of the first one, in the caller's thread; nothing without the
        extra. The agent does it in the background when it starts."""
        try:
            from .p2p import quic, session  # noqa: F401
        except ImportError:
            logger.debug("worker=%s: no p2p extra; peer connections unavailable", self.worker_id)

    def _p2p_loop(self) -> LoopThread:
        try:  # outside the lock: the first import takes a while
            from .p2p.loop import LoopThread
            from .p2p.session import PeerSession  # noqa: F401 - aioice present?
        except ImportError as exc:
            raise P2PUnavailable(f"{MISSING_EXTRA} ({exc})") from None
        with self._lock:
            if self._loop is not None:
                return self._loop
            if self._closed:
                raise PeerError("the agent has stopped")
            self._loop = LoopThread(f"worker-agent-p2p-{self.worker_id[:12]}")
            return self._loop

    def _relay_link(self) -> RelayLink:
        from .p2p.relay import RelayLink

        with self._lock:
            if self._relay is None:
                self._relay = RelayLink(self._send_binary)
            return self._relay

    def _on_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon(callback, *args)

    def _wake(self, message: dict[str, Any]) -> None:
        """Hand a reply to whoever waits: under its request id, or its introduction id."""
        with self._lock:
            for key in (message.get("request_id"), message.get("introduction_id")):
                waiter = self._waiters.get(key) if isinstance(key, str) else None
                if waiter is not None:
                    waiter.put(message)
                    return

    def _ask(
        self,
        frame: str,
        key: str,
        timeout: float,
        *,
        until: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Send `frame` and wait for the reply filed under `key` (one of `until`, if given).
        A `connect_pending` on the way files later replies under its introduction id too."""
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


def _request_id() -> str:
    return uuid.uuid4().hex[:16]
