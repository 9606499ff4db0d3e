"""`WorkerAgent`: one worker's connection to the Rendezvous service and to its peers, the
public face of the agent's layers.

It puts the layers together and says nothing of its own: the session with the service
(`service`: the WebSocket, enrolment, reporting, reconnects), signalling and peer sessions
(`peers`: introductions, paths, QUIC), and the host program's callbacks, each of which gets the
agent first. Configuration comes in groups (`options`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import options, wire
from .errors import P2PUnavailable, PeerError
from .paths.portmap.holder import enabled_by_environment
from .peerapi.peer_api import PeerApi
from .peers import DEFAULT_CONNECT_TIMEOUT as DEFAULT_PEER_CONNECT_TIMEOUT
from .peers import Peers
from .service import credentials
from .service.enrolment import Enrolment
from .service.public_ip import fetch_public_ip
from .service.reconnect import ReconnectPolicy
from .service.reporting import Reporter
from .service.session import ServiceSession
from .service.status import FINAL_STATES, AgentState
from .version import __version__

if TYPE_CHECKING:
    from .connection import PeerConnection
    from .paths.path import PeerPath
    from .paths.turncheck import Credentials
    from .peer_session import PeerSession
    from .secure.identity import WorkerIdentity

__all__ = ["FINAL_STATES", "AgentState", "WorkerAgent"]

logger = logging.getLogger("worker_agent")


class WorkerAgent:
    """Keeps one worker registered with the Rendezvous service until stopped.

    `url` is the service base URL (http, https, ws or wss); the agent connects to
    `/ws/register/{worker_id}` under it. Options come as groups (`service=ServiceOptions(...)`,
    `enrolment=`, `reporting=`, `reconnect=`, `peers=`, `callbacks=`; see `options`) or, as a
    shorthand, as keywords named after their fields (`heartbeat_interval=5`, `on_peer=echo`).
    Callbacks run on the agent's threads: keep them short.
    """

    def __init__(
        self,
        url: str,
        worker_id: str | None = None,
        *,
        service: options.ServiceOptions | None = None,
        enrolment: options.EnrolmentOptions | None = None,
        reporting: options.ReportingOptions | None = None,
        reconnect: options.ReconnectOptions | None = None,
        peers: options.PeerOptions | None = None,
        callbacks: options.Callbacks | None = None,
        **shorthand: Any,
    ) -> None:
        given = {
            "service": service,
            "enrolment": enrolment,
            "reporting": reporting,
            "reconnect": reconnect,
            "peers": peers,
            "callbacks": callbacks,
        }
        config = options.grouped(given, shorthand)
        self.config = config
        on = config["callbacks"]
        self.callbacks: options.Callbacks = on
        self.enrolment = Enrolment(
            worker_id=worker_id,
            service_url=url,
            enrolment_key=config["enrolment"].enrolment_key,
            credential=config["enrolment"].credential,
            credential_file=config["enrolment"].credential_file,
            make_identity=_identity,
        )
        self.worker_id = self.enrolment.worker_id
        self.service_url = url
        self.url = self.enrolment.url
        self.reporting = config["reporting"]
        self.peer_api: PeerApi | None = None
        self.peers = self._peers(config["peers"], on)
        self.session = self._service_session(config["service"], config["reconnect"])
        self.enrolment.persist()  # once everything given was found valid

    def _peers(self, peer_options: options.PeerOptions, on: options.Callbacks) -> Peers:
        """The peer side; with the peer API, its router takes the connections peers open and
        hands the host's `on_peer` what is not its own."""
        on_peer = (lambda conn: on.on_peer(self, conn)) if on.on_peer is not None else None
        if peer_options.peer_api:
            self.peer_api = PeerApi(
                self.worker_id,
                lambda peer_id, timeout: self.connect(peer_id, timeout),
                expose=peer_options.expose,
                inbox=peer_options.inbox,
            )
            on_peer = _serving(self.peer_api, on_peer)
        return Peers(
            self.worker_id,
            self._send_text,
            send_binary=self._send_binary,
            stun_servers=peer_options.stun_servers,
            on_peer=on_peer,
            on_peer_path=(lambda path: on.on_peer_path(self, path)) if on.on_peer_path else None,
            use_udp=peer_options.peer_udp,
            identity=self.identity,
            port_mapping=(
                enabled_by_environment()
                if peer_options.port_mapping is None
                else peer_options.port_mapping
            ),
        )

    def _service_session(
        self, service: options.ServiceOptions, reconnect: options.ReconnectOptions
    ) -> ServiceSession:
        reporting = self.reporting
        session = ServiceSession(
            url=self.url,
            enrolment=self.enrolment,
            reporter=Reporter(
                worker_id=self.worker_id,
                agent_info=reporting.agent_info,
                fetch_public_ip=reporting.public_ip_fetcher
                or (
                    lambda: fetch_public_ip(
                        reporting.ip_echo_url, timeout=reporting.ip_echo_timeout
                    )
                ),
                heartbeat_interval=service.heartbeat_interval,
                start_nat_check=self._start_nat_check,
            ),
            reconnect=ReconnectPolicy(
                reconnect.backoff,
                superseded_delay=reconnect.superseded_delay,
                max_superseded=reconnect.max_superseded,
                superseded_reset_after=reconnect.superseded_reset_after,
            ),
            ping_interval=service.ping_interval,
            ping_timeout=service.ping_timeout,
            connect_timeout=service.connect_timeout,
            close_timeout=service.close_timeout,
            header=service.header,
            suppress_origin=service.suppress_origin,
            sslopt=service.sslopt,
        )
        session.handle_frame = self.peers.signalling.handle
        session.handle_binary = self.peers.signalling.relay_frame
        session.on_welcome = self.peers.signalling.session_started
        session.on_message = self._message
        session.status.on_change = lambda old, new: self._call(
            self.callbacks.on_state_change, old, new
        )
        session.on_ended = self.peers.close
        return session

    # ---- the connection to the service ----------------------------------------------------------

    @property
    def identity(self) -> WorkerIdentity | None:
        """This worker's key pair and certificate for peer connections (None without the extra)."""
        return self.enrolment.identity

    @property
    def credential(self) -> str | None:
        """The credential the service bound to this worker id (kept in memory, and in the
        credential file when given)."""
        return self.enrolment.credential

    @property
    def state(self) -> str:
        return str(self.session.state)

    @property
    def registered(self) -> bool:
        return self.session.registered

    @property
    def ping_interval(self) -> float:
        return self.session.ping_interval

    @property
    def ping_timeout(self) -> float | None:
        return self.session.ping_timeout

    def start(self) -> None:
        """Connect in a daemon thread and keep connecting until stop() or a final state."""
        self.session.start()
        # So that the first connect() (or the first peer's) does not wait for the imports.
        warm_up = threading.Thread(target=self.peers.warm_up, name="worker-agent-warm-up")
        warm_up.daemon = True
        warm_up.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close with code 1000 and wait for the loop to end. False if it is still running.

        The server gets `close_timeout` seconds to answer the close; then the socket is cut.
        Called from one of the agent's own callbacks it only asks, and returns False.
        """
        if self.peer_api is not None:
            self.peer_api.close()
        self.peers.goodbye("the agent stopped")
        return self.session.stop(timeout)

    def wait_registered(self, timeout: float | None = None) -> bool:
        """True once the current connection got the server's welcome; False on timeout or end."""
        return self.session.wait_registered(timeout)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """True once the agent reached a final state (stopped, superseded or refused)."""
        return self.session.wait_finished(timeout)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot; connection fields come from the latest welcome."""
        connection = self.session.status.snapshot(self.session.reporter.heartbeat_every)
        return {
            "worker_id": self.worker_id,
            "service_url": self.service_url,
            "url": self.url,
            "agent_version": __version__,
            **{key: connection[key] for key in _STATUS_BEFORE_ADDRESS},
            "public_ip": self.session.reporter.public_ip,
            "public_ip_registered": self.session.reporter.public_ip_registered,
            **{key: connection[key] for key in _STATUS_AFTER_ADDRESS},
            "superseded_count": self.session.reconnect.superseded_count,
            "enrolled": self.enrolment.enrolled,
            "port_mapping": self.peers.port_mapping.status(),
            "next_attempt_at": connection["next_attempt_at"],
            "final_reason": connection["final_reason"],
        }

    # ---- peers -------------------------------------------------------------------------------

    def connect(
        self, peer_id: str, timeout: float = DEFAULT_PEER_CONNECT_TIMEOUT
    ) -> PeerConnection:
        """An encrypted connection to another worker (QUIC, both identities pinned), as soon as
        its handshake completes over the first route that carries data: the service relay at
        first, moving to TURN, a direct or a LAN path underneath when one comes up.

        Raises a `PeerError` subclass that says why there is none, at once when the service or
        the peer says so: PeerUnavailable, PeerUnresponsive, PeerRefused, IdentityMismatch,
        NoPath, P2PUnavailable (docs/peer-connections.md).
        """
        deadline = time.monotonic() + timeout
        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        return self.peers.connect(peer_id, timeout=max(0.1, deadline - time.monotonic()))

    def connect_path(self, peer_id: str, timeout: float = DEFAULT_PEER_CONNECT_TIMEOUT) -> PeerPath:
        """A raw datagram path to another worker (not encrypted; the peer gets it in
        `on_peer_path`), as soon as a route carries data. See `connect` for the errors."""
        deadline = time.monotonic() + timeout
        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        return self.peers.connect_path(peer_id, timeout=max(0.1, deadline - time.monotonic()))

    def list_peers(
        self, tag: str | None = None, timeout: float = 5.0, *, offline: bool = False
    ) -> list[dict[str, Any]]:
        """Connected workers this one may connect to: id, tags, NAT mapping. With `offline`,
        the registry's workers that are not connected too, each with `online` and `last_seen`
        (a service older than this agent lists the connected ones only)."""
        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        return self.peers.signalling.list_peers(tag=tag, timeout=timeout, offline=offline)

    def peer_connections(self) -> list[dict[str, Any]]:
        """Every open peer connection and raw path, JSON-ready: the peer, the route and the
        peer's address on it, since when, bytes each way, the round trip, who opened it, and
        what it is for (`commands`, `served` by the peer API, or the host program's)."""
        rows = []
        for session in self.peers.sessions():
            connection = session.connection
            row = connection.snapshot() if connection is not None else session.path.snapshot()
            row["transport"] = session.transport
            row["opened_by"] = self.worker_id if session.controlling else session.peer_id
            row["use"] = (self.peer_api.use_of(connection) if self.peer_api else None) or "program"
            rows.append(row)
        return rows

    def netcheck(self, *, peer_id: str | None = None, timeout: float = 3.0) -> dict[str, Any]:
        """What this machine's network lets the agent do (docs/cli.md, `netcheck`): needs the
        p2p extra and a registration. With `peer_id`, an introduction to it lends its TURN
        credentials, so that the TURN allocation is tried too."""
        from . import diagnostics

        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        if peer_id is not None:
            if self.peer_api is not None:
                self.peer_api.pool.connection(peer_id, timeout=max(timeout, 10.0))
            else:
                self.connect(peer_id, timeout=max(timeout, 10.0))
        welcome = self.session.status.welcome
        stun = self.peers.signalling.stun_servers()
        udp_half = self.peers.loop().call(
            diagnostics.check(
                stun_servers=stun,
                turn_servers=[str(s) for s in welcome.get("turn_servers") or []],
                credentials=_turn_credentials(self.peers.sessions(), peer_id),
                use_udp=self.peers.use_udp,
                timeout=timeout,
            ),
            4 * timeout + 5,
        )
        relay = welcome.get("relay")
        return diagnostics.report(
            udp_half,
            stun_servers=stun,
            service_rtt=self.session.round_trip(timeout),
            relay=relay if isinstance(relay, bool) else None,
            use_udp=self.peers.use_udp,
        )

    def subscribe_peers(self, tag: str | None = None) -> None:
        """`peer_joined` / `peer_left` frames to `on_message` from now on (kept on reconnect)."""
        self.peers.signalling.subscribe(tag)

    def unsubscribe_peers(self) -> None:
        self.peers.signalling.unsubscribe()

    # ---- between the layers ----------------------------------------------------------------------

    def _send_text(self, frame: str) -> bool:
        return self.session.send_current(frame)

    def _send_binary(self, frame: bytes) -> bool:
        return self.session.send_current(frame, binary=True)

    def _message(self, message: dict[str, Any]) -> None:
        self._call(self.callbacks.on_message, message)
        if message.get("type") == wire.ServerMessageType.WELCOME:
            self._call(self.callbacks.on_registered, message)

    def _start_nat_check(self) -> None:
        """Once registered: the NAT report, in a thread of its own, where STUN servers are known."""
        if self.reporting.report_nat and self.peers.signalling.stun_servers():
            threading.Thread(
                target=self._report_nat, name="worker-agent-netcheck", daemon=True
            ).start()

    def _report_nat(self) -> None:
        try:
            self.peers.report_nat()
        except P2PUnavailable:
            logger.debug("worker=%s: no NAT check without the p2p extra", self.worker_id)
        except Exception as exc:  # the registration stands without it
            logger.warning("worker=%s: NAT check failed: %s", self.worker_id, exc)

    def _call(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(self, *args)
        except Exception:
            logger.exception("worker=%s: callback %r raised", self.worker_id, callback)

    def __repr__(self) -> str:
        return f"<WorkerAgent {self.worker_id} {self.session.state}>"


_STATUS_BEFORE_ADDRESS = (
    "state",
    "registered",
    "connection_id",
    "instance_id",
    "observed_ip",
    "observed_port",
    "heartbeat_interval",
)
_STATUS_AFTER_ADDRESS = (
    "attempts",
    "connects",
    "started_at",
    "connected_at",
    "registered_at",
    "last_heartbeat_ack_at",
    "last_error",
    "last_server_error",
    "last_close_code",
    "last_close_reason",
)


def _serving(
    peer_api: PeerApi, host_on_peer: Callable[[PeerConnection], None] | None
) -> Callable[[PeerConnection], None]:
    """The agent's on_peer with the peer API: its streams served, the rest to the host's."""
    return lambda connection: peer_api.accepted(connection, host_on_peer)


def _turn_credentials(sessions: list[PeerSession], peer_id: str | None) -> Credentials | None:
    """TURN credentials of a live introduction (the peer's, when given), still valid."""
    from .paths.turncheck import Credentials

    for session in sessions:
        turn = session.paths.turn
        if turn is None or turn.expires_at <= time.time() + 5:
            continue
        if peer_id is None or session.peer_id == peer_id:
            return Credentials(turn.username, turn.password)
    return None


def _identity(stored: credentials.Identity | None, worker_id: str) -> WorkerIdentity | None:
    """The stored key pair, or a new one; None without the p2p extra (no cryptography)."""
    try:
        from .secure import identity
    except ImportError:
        return None
    if stored is not None and stored.private_key and stored.certificate:
        return identity.WorkerIdentity(
            private_key_pem=stored.private_key.encode(), certificate_pem=stored.certificate.encode()
        )
    return identity.create(worker_id)
