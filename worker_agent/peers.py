"""The agent's peer side: the layers put together for each introduction.

`Signalling` (over the service session) introduces two workers; for each introduction a
`PeerSession` (peer_session.py) carries it. `Peers` owns what they share (the asyncio loop of the
p2p layers, the relay link over the agent's WebSocket) and the host program's side:
`connect()`, `connect_path()`, and handing connections a peer opened to `on_peer`.

Discovery needs only the standard library; connections need the `p2p` extra, imported on first
use (and ahead of it by `warm_up`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import MISSING_EXTRA, NoPath, P2PUnavailable, PeerError, PeerRefused
from .paths.portmap.holder import PortMapperHolder
from .peer_session import PeerSession
from .signalling.introductions import Carrier, Signalling

if TYPE_CHECKING:
    from .connection import PeerConnection
    from .paths.loop import LoopThread
    from .paths.netcheck import NatReport
    from .paths.path import PeerPath
    from .paths.relay import RelayLink
    from .secure.identity import WorkerIdentity

logger = logging.getLogger("worker_agent")

DEFAULT_CONNECT_TIMEOUT = 10.0
NAT_CHECK_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 10.0  # the answering side's wait for the initiator's QUIC handshake
# Asking to resume an introduction: each request's wait, and the pauses between requests while
# the peer is not back (the service allows a connect request a second after a burst of five).
RESUME_TIMEOUT = 5.0
RESUME_DELAYS = (0.25, 0.5, 1.0)

Send = Callable[[str], bool]
SendBinary = Callable[[bytes], bool]
PeerCallback = Callable[["PeerConnection"], None]
PathCallback = Callable[["PeerPath"], None]


class Peers:
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
        port_mapping: bool = True,
    ) -> None:
        self.worker_id = worker_id
        self._send = send
        self._send_binary = send_binary
        self.on_peer = on_peer
        self.on_peer_path = on_peer_path
        self.use_udp = use_udp
        self.identity = identity
        self.signalling = Signalling(
            worker_id,
            send,
            open_carrier=self._open,
            refusal=self._refusal,
            incoming=self._incoming,
            stun_servers=stun_servers,
        )
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._relay: RelayLink | None = None
        self._resuming: set[PeerSession] = set()
        self._closed = False
        self.port_mapping = PortMapperHolder(enabled=port_mapping and use_udp)
        self.last_nat_report: NatReport | None = None

    # ---- what the host program calls ------------------------------------------------------------

    def connect(self, peer_id: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> PeerConnection:
        """An encrypted connection to `peer_id`, pinned to its introduced identity, once its
        handshake completed over the first route that carries data (the relay, normally)."""
        started = time.monotonic()
        session = self._introduce(peer_id, wire.Transport.QUIC, timeout)
        try:
            connection = self.loop().call(
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
        path = self._introduce(peer_id, wire.Transport.DATAGRAMS, timeout).path
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
        self.loop()  # P2PUnavailable at once, before the peer is bothered
        carrier = self.signalling.introduce(peer_id, transport, timeout)
        assert isinstance(carrier, PeerSession)
        return carrier

    def sessions(self) -> list[PeerSession]:
        return [c for c in self.signalling.carriers() if isinstance(c, PeerSession)]

    def report_nat(self) -> NatReport | None:
        """Classify the NAT from a fresh socket and tell the service (admin, API, peer list)."""
        servers = self.signalling.stun_servers()
        if not servers:
            return None
        from .paths.netcheck import classify_nat

        loop = self.loop()
        report = loop.call(
            classify_nat(servers, timeout=NAT_CHECK_TIMEOUT, port_mapper=self.port_mapping.get()),
            NAT_CHECK_TIMEOUT + 2,
        )
        self.last_nat_report = report
        self._send(wire.nat_report(report.mapping.value, report.mapped, report.port_mapping))
        logger.info(
            "worker=%s: NAT mapping %s, UDP endpoint %s, port mapping %s",
            self.worker_id,
            report.mapping.value,
            report.mapped,
            report.port_mapping or "none",
        )
        return report

    def goodbye(self, reason: str) -> None:
        """The agent is stopping: each peer is told through the service while the connection to
        it is still up (a peer whose service link merely dropped waits for a resume instead)."""
        for carrier in self.signalling.carriers():
            self._send(wire.peer_close(introduction_id=carrier.introduction_id, reason=reason))
            carrier.end(reason)

    def close(self) -> None:
        """The agent stops: every path ends, the peer loop stops."""
        with self._lock:
            self._closed = True
            loop, relay = self._loop, self._relay
        for carrier in self.signalling.carriers():
            carrier.end("the agent stopped")
        if relay is not None:
            relay.close()
        if loop is not None:
            self.port_mapping.release(loop)
            loop.stop()

    # ---- what signalling asks (on the service session's reading thread) -------------------------

    def _refusal(self, transport: str) -> str | None:
        """Why this worker refuses an introduction a peer asked for, or None to accept it."""
        quic = transport == wire.Transport.QUIC
        if (self.on_peer if quic else self.on_peer_path) is None:
            return (
                "this worker does not accept peer connections"
                if quic
                else "this worker does not accept raw datagram paths"
            )
        if quic and self.identity is None:
            return "this worker has no identity for encrypted connections"
        try:
            self.loop()
        except P2PUnavailable:
            return f"this worker cannot take peer connections ({MISSING_EXTRA})"
        return None

    def _open(self, introduction: dict[str, Any], started: float | None) -> Carrier:
        from .paths.session import PathSession

        loop = self.loop()
        servers = self.signalling.stun_servers()
        paths = PathSession(
            introduction=introduction,
            loop=loop,
            relay=self._relay_link(),
            signal=self._send,
            stun_server=servers[0] if servers else None,
            use_udp=self.use_udp,
            started=started,
            port_mapper=self.port_mapping.get(),
        )
        return PeerSession(
            introduction=introduction,
            loop=loop,
            paths=paths,
            identity=self.identity,
            on_end=self.signalling.ended,
            on_link_lost=self._link_lost,
        )

    def _link_lost(self, session: PeerSession) -> None:
        """A session lost its service link: the side that asked for it resumes it under a new
        introduction, in a thread of its own; the other side waits for that."""
        if not session.controlling:
            return
        with self._lock:
            if session in self._resuming or self._closed:
                return
            self._resuming.add(session)
        threading.Thread(
            target=self._resume,
            args=(session,),
            name=f"worker-agent-resume-{session.peer_id[:12]}",
            daemon=True,
        ).start()

    def _resume(self, session: PeerSession) -> None:
        """Ask for a new introduction to the same peer until it comes (the peer may be on its
        way back to the service), it is refused, or the session ends."""
        from .paths.session import RESUME_WITHIN

        deadline = time.monotonic() + RESUME_WITHIN
        delays = iter(RESUME_DELAYS)
        try:
            while not session.ended and time.monotonic() < deadline:
                try:
                    self.signalling.introduce(
                        session.peer_id, session.transport, RESUME_TIMEOUT, resumes=session
                    )
                    return
                except PeerRefused as exc:  # the policy, or nothing left to resume there
                    session.end(f"not resumed: {exc}")
                    return
                except PeerError as exc:  # offline for now, rate limited, no answer yet
                    logger.info(
                        "worker=%s: introduction with %s not resumed yet: %s",
                        self.worker_id,
                        session.peer_id,
                        exc,
                    )
                time.sleep(next(delays, RESUME_DELAYS[-1]))
        finally:
            with self._lock:
                self._resuming.discard(session)

    def _incoming(self, carrier: Carrier) -> None:
        assert isinstance(carrier, PeerSession)
        threading.Thread(
            target=self._hand_over,
            args=(carrier,),
            name=f"worker-agent-peer-{carrier.peer_id[:12]}",
            daemon=True,
        ).start()

    def _hand_over(self, session: PeerSession) -> None:
        """The answering side: `on_peer(connection)` once the handshake completed, or
        `on_peer_path(path)` for a raw datagram path."""
        try:
            if session.transport == wire.Transport.QUIC:
                connection = self.loop().call(session.established(), HANDSHAKE_TIMEOUT)
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

    # ---- what the layers share -----------------------------------------------------------------

    def warm_up(self) -> None:
        """Import what peer connections need (aioice, aioquic, cryptography: about a quarter of a
        second of CPU) ahead of the first one, in the caller's thread; nothing without the
        extra. The agent does it in the background when it starts."""
        try:
            from .paths import session  # noqa: F401
            from .secure import quic  # noqa: F401
        except ImportError:
            logger.debug("worker=%s: no p2p extra; peer connections unavailable", self.worker_id)
            return
        with contextlib.suppress(PeerError):  # stopped meanwhile
            self.port_mapping.probe_soon(self.loop())  # the gateway, at start

    def loop(self) -> LoopThread:
        """The peer loop, started on first use; P2PUnavailable without the extra."""
        try:  # outside the lock: the first import takes a while
            from .paths.loop import LoopThread
            from .paths.session import PathSession  # noqa: F401 - aioice present?
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
        from .paths.relay import RelayLink

        with self._lock:
            if self._relay is None:
                self._relay = RelayLink(self._send_binary)
            return self._relay
