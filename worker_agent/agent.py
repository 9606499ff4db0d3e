"""`WorkerAgent`: one worker's connection to the Rendezvous service, kept up in a thread.

The class owns the connection's life and nothing more: frames come from `wire`, delays and the
give-up rules from `policy`, the public address from `public_ip`. websocket-client callbacks only
record what happened on their connection; decisions are taken in the agent's own loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import websocket

from . import credentials, wire
from .backoff import Backoff
from .p2p.errors import P2PUnavailable, PeerError
from .p2p.path import PeerPath

if TYPE_CHECKING:
    from .p2p.connection import PeerConnection
    from .p2p.identity import WorkerIdentity
from .peering import DEFAULT_CONNECT_TIMEOUT as DEFAULT_PEER_CONNECT_TIMEOUT
from .peering import Peering
from .policy import (
    DEFAULT_MAX_SUPERSEDED,
    DEFAULT_SUPERSEDED_DELAY,
    DEFAULT_SUPERSEDED_RESET_AFTER,
    Decision,
    Outcome,
    ReconnectPolicy,
)
from .public_ip import DEFAULT_IP_ECHO_URL, DEFAULT_TIMEOUT, fetch_public_ip
from .version import __version__

logger = logging.getLogger("worker_agent")

DEFAULT_PING_INTERVAL = 25.0
DEFAULT_PING_TIMEOUT = 25.0
# websocket-client insists on ping_interval > ping_timeout; the PoC's 25/25 is clamped to this.
PING_TIMEOUT_CLAMP = 0.8
DEFAULT_CONNECT_TIMEOUT = 30.0
# How long stop() waits for the server to answer the close frame before cutting the socket.
CLOSE_GRACE = 3.0

MessageCallback = Callable[["WorkerAgent", dict[str, Any]], None]
StateCallback = Callable[["WorkerAgent", str, str], None]
PeerCallback = Callable[["WorkerAgent", "PeerConnection"], None]
PathCallback = Callable[["WorkerAgent", PeerPath], None]


class AgentState(StrEnum):
    IDLE = "idle"  # built, not started
    CONNECTING = "connecting"  # opening the WebSocket
    CONNECTED = "connected"  # socket open, waiting for the server's welcome
    REGISTERED = "registered"  # welcome received: the server knows this worker
    BACKOFF = "backoff"  # waiting before the next attempt
    STOPPING = "stopping"  # stop() called
    STOPPED = "stopped"  # final: stopped on request
    SUPERSEDED = "superseded"  # final: gave the worker id up to another process
    REFUSED = "refused"  # final: the server refused the worker id (HTTP 403)


FINAL_STATES = frozenset({AgentState.STOPPED, AgentState.SUPERSEDED, AgentState.REFUSED})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


class _Connection:
    """One connection attempt and what its callbacks saw; callbacks write nothing else."""

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
        self.session: threading.Thread | None = None
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
        return Outcome(
            opened=self.opened_at is not None,
            registered=self.welcome is not None,
            uptime=uptime,
            close_code=self.effective_close()[0],
            close_reason=self.effective_close()[1],
            handshake_status=self.handshake_status,
        )


class WorkerAgent:
    """Keeps one worker registered with the Rendezvous service until stopped.

    `url` is the service base URL (http, https, ws or wss); the agent connects to
    `/ws/register/{worker_id}` under it. Callbacks run on the agent's threads: keep them short.
    """

    def __init__(
        self,
        url: str,
        worker_id: str | None = None,
        *,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        ip_echo_url: str | None = DEFAULT_IP_ECHO_URL,
        ip_echo_timeout: float = DEFAULT_TIMEOUT,
        public_ip_fetcher: Callable[[], str | None] | None = None,
        heartbeat_interval: float | None = None,
        agent_info: Mapping[str, wire.Scalar] | None = None,
        backoff: Backoff | None = None,
        superseded_delay: float = DEFAULT_SUPERSEDED_DELAY,
        max_superseded: int | None = DEFAULT_MAX_SUPERSEDED,
        superseded_reset_after: float = DEFAULT_SUPERSEDED_RESET_AFTER,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_GRACE,
        header: Mapping[str, str] | None = None,
        enrolment_key: str | None = None,
        credential: str | None = None,
        credential_file: str | os.PathLike[str] | None = None,
        stun_servers: Sequence[str] | None = None,
        on_peer: PeerCallback | None = None,
        on_peer_path: PathCallback | None = None,
        peer_udp: bool = True,
        report_nat: bool = True,
        suppress_origin: bool = False,
        sslopt: Mapping[str, Any] | None = None,
        on_message: MessageCallback | None = None,
        on_registered: MessageCallback | None = None,
        on_state_change: StateCallback | None = None,
    ) -> None:
        # A credential file decides the id: it is the identity the service knows.
        self.credential_file = credential_file
        stored = credentials.load(credential_file) if credential_file is not None else None
        if stored is not None and worker_id is not None and stored.worker_id != worker_id:
            raise ValueError(
                f"credential file {credential_file} belongs to worker {stored.worker_id!r}, "
                f"not {worker_id!r}"
            )
        if stored is not None:
            worker_id = stored.worker_id
        self.worker_id = str(uuid.uuid4()) if worker_id is None else worker_id
        self.enrolment_key = enrolment_key
        self._credential = credential or (stored.credential if stored else None) or None
        self._enrolled = bool(credential) or (stored is not None and stored.enrolled)
        if self._credential is None and enrolment_key:
            # Made here, presented at enrolment: the service binds it, so nobody else holding
            # the same key can redo this enrolment; a lost welcome costs nothing either.
            self._credential, self._enrolled = credentials.new_credential(), False
        self.service_url = url
        self.url = wire.websocket_url(url, self.worker_id)  # ValueError says what is wrong
        self.identity = _identity(stored, self.worker_id)  # None without the p2p extra

        self.ping_interval, self.ping_timeout = _ping_settings(ping_interval, ping_timeout)
        if heartbeat_interval is not None and not _positive(heartbeat_interval):
            raise ValueError("heartbeat_interval must be a positive number of seconds")
        if not _positive(connect_timeout):
            raise ValueError("connect_timeout must be a positive number of seconds")
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = float(connect_timeout)
        self.close_timeout = float(close_timeout)
        self.ip_echo_url = ip_echo_url
        self.ip_echo_timeout = ip_echo_timeout
        self._fetch_public_ip = public_ip_fetcher or (
            lambda: fetch_public_ip(self.ip_echo_url, timeout=self.ip_echo_timeout)
        )
        self.agent_info = wire.clean_agent_info({**default_agent_info(), **(agent_info or {})})
        self.policy = ReconnectPolicy(
            backoff,
            superseded_delay=superseded_delay,
            max_superseded=max_superseded,
            superseded_reset_after=superseded_reset_after,
        )
        self.header = dict(header or {})
        self.suppress_origin = suppress_origin
        self.sslopt = dict(sslopt or {})
        self.report_nat = report_nat
        self.peering = Peering(
            self.worker_id,
            self._send_current,
            send_binary=self._send_binary_current,
            stun_servers=stun_servers,
            # Like every callback here, these get the agent first.
            on_peer=(lambda conn: on_peer(self, conn)) if on_peer is not None else None,
            on_peer_path=(lambda path: on_peer_path(self, path)) if on_peer_path else None,
            use_udp=peer_udp,
            identity=self.identity,
        )
        self.on_message = on_message
        self.on_registered = on_registered
        self.on_state_change = on_state_change

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: _Connection | None = None
        self._state = AgentState.IDLE
        self._registered = False
        self._attempts = 0
        self._connects = 0
        self._started_at: str | None = None
        self._connected_at: str | None = None
        self._registered_at: str | None = None
        self._welcome: dict[str, Any] = {}
        self._public_ip: str | None = None
        self._public_ip_registered: str | None = None
        self._last_heartbeat_ack_at: str | None = None
        self._last_error: str | None = None
        self._last_server_error: dict[str, Any] | None = None
        self._last_close_code: int | None = None
        self._last_close_reason: str | None = None
        self._next_attempt_at: str | None = None
        self._final_reason: str | None = None
        self._key_fallback_used = False
        if credential_file is not None and self._stored() != stored:
            credentials.save(credential_file, self._stored())  # before any enrolment starts

    def _stored(self) -> credentials.Identity:
        """What the credential file holds for this agent now."""
        identity = self.identity
        return credentials.Identity(
            worker_id=self.worker_id,
            credential=self._credential or "",
            service_url=self.service_url,
            enrolled=self._enrolled,
            private_key=identity.private_key_pem.decode() if identity else "",
            certificate=identity.certificate_pem.decode() if identity else "",
        )

    # ---- public surface ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self._state)

    @property
    def registered(self) -> bool:
        return self._registered

    def start(self) -> None:
        """Connect in a daemon thread and keep connecting until stop() or a final state."""
        with self._lock:
            if self._thread is not None or self._state in FINAL_STATES:
                raise RuntimeError("a WorkerAgent can be started once")
            self._started_at = _now_iso()
            self._thread = threading.Thread(
                target=self._run, name=f"worker-agent-{self.worker_id[:12]}", daemon=True
            )
            self._thread.start()
        # So that the first connect() (or the first peer's) does not wait for the imports.
        warm_up = threading.Thread(target=self.peering.warm_up, name="worker-agent-warm-up")
        warm_up.daemon = True
        warm_up.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close with code 1000 and wait for the loop to end. False if it is still running.

        The server gets `close_timeout` seconds to answer the close; then the socket is cut.
        Called from one of the agent's own callbacks it only asks, and returns False.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._set_state(AgentState.STOPPING)
        with self._lock:
            conn, thread = self._conn, self._thread
        if conn is not None and not conn.ended.is_set():
            self._close(conn)
        if thread is None:
            self._set_state(AgentState.STOPPED)
            return True
        if thread is threading.current_thread():
            return False
        thread.join(min(self.close_timeout, timeout))
        if thread.is_alive() and conn is not None:
            _abort(conn)
            thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def wait_registered(self, timeout: float | None = None) -> bool:
        """True once the current connection got the server's welcome; False on timeout or end."""
        with self._changed:
            self._changed.wait_for(lambda: self._registered or self._state in FINAL_STATES, timeout)
            return self._registered

    def wait_finished(self, timeout: float | None = None) -> bool:
        """True once the agent reached a final state (stopped, superseded or refused)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._state in FINAL_STATES, timeout)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot; connection fields come from the latest welcome."""
        with self._lock:
            welcome = self._welcome
            return {
                "worker_id": self.worker_id,
                "service_url": self.service_url,
                "url": self.url,
                "agent_version": __version__,
                "state": str(self._state),
                "registered": self._registered,
                "connection_id": welcome.get("connection_id"),
                "instance_id": welcome.get("instance_id"),
                "observed_ip": welcome.get("observed_ip"),
                "observed_port": welcome.get("observed_port"),
                "heartbeat_interval": self._heartbeat_every(welcome) if welcome else None,
                "public_ip": self._public_ip,
                "public_ip_registered": self._public_ip_registered,
                "attempts": self._attempts,
                "connects": self._connects,
                "started_at": self._started_at,
                "connected_at": self._connected_at,
                "registered_at": self._registered_at,
                "last_heartbeat_ack_at": self._last_heartbeat_ack_at,
                "last_error": self._last_error,
                "last_server_error": self._last_server_error,
                "last_close_code": self._last_close_code,
                "last_close_reason": self._last_close_reason,
                "superseded_count": self.policy.superseded_count,
                "enrolled": self._enrolled,
                "next_attempt_at": self._next_attempt_at,
                "final_reason": self._final_reason,
            }

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                conn = _Connection(number)
                try:
                    self._connect_once(conn)
                    if self._stop.is_set():
                        break
                    decision = self._fall_back_to_key(conn, self.policy.after(conn.outcome()))
                except Exception as exc:  # a bug must not end the agent silently
                    logger.exception(
                        "worker=%s: unexpected error in the agent loop", self.worker_id
                    )
                    with self._lock:
                        self._last_error = f"internal error: {exc!r}"
                    decision = Decision(
                        retry=True, delay=self.policy.backoff.next_delay(), reason="internal error"
                    )
                if not decision.retry:
                    self._finish(conn, decision)
                    return
                self._log(
                    logging.INFO,
                    conn,
                    "%s; reconnecting in %.1fs",
                    self._describe_end(conn, decision),
                    decision.delay,
                )
                with self._lock:
                    self._next_attempt_at = datetime.fromtimestamp(
                        time.time() + decision.delay, UTC
                    ).isoformat(timespec="milliseconds")
                self._set_state(AgentState.BACKOFF)
                if self._stop.wait(decision.delay):
                    break
        finally:
            self.peering.close()  # every peer path ends with the agent
            with self._lock:
                self._next_attempt_at = None
            self._set_state(AgentState.STOPPED)
            if self._state == AgentState.STOPPED:
                logger.info("worker=%s: stopped", self.worker_id)

    # ---- peers (worker_agent/peering.py) ---------------------------------------------------------

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
        return self.peering.connect(peer_id, timeout=max(0.1, deadline - time.monotonic()))

    def connect_path(self, peer_id: str, timeout: float = DEFAULT_PEER_CONNECT_TIMEOUT) -> PeerPath:
        """A raw datagram path to another worker (not encrypted; the peer gets it in
        `on_peer_path`), as soon as a route carries data. See `connect` for the errors."""
        deadline = time.monotonic() + timeout
        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        return self.peering.connect_path(peer_id, timeout=max(0.1, deadline - time.monotonic()))

    def list_peers(self, tag: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Connected workers this one may connect to: id, tags, NAT mapping."""
        if not self.wait_registered(timeout):
            raise PeerError("not registered with the rendezvous service")
        return self.peering.list_peers(tag=tag, timeout=timeout)

    def subscribe_peers(self, tag: str | None = None) -> None:
        """`peer_joined` / `peer_left` frames to `on_message` from now on (kept on reconnect)."""
        self.peering.subscribe(tag)

    def unsubscribe_peers(self) -> None:
        self.peering.unsubscribe()

    def _send_current(self, frame: str) -> bool:
        with self._lock:
            conn = self._conn if self._registered else None
        return conn is not None and self._send(conn, frame)

    def _send_binary_current(self, frame: bytes) -> bool:
        with self._lock:
            conn = self._conn if self._registered else None
        return conn is not None and self._send(conn, frame, binary=True)

    @property
    def credential(self) -> str | None:
        """The credential the service bound to this worker id (kept in memory, and in
        `credential_file` when given)."""
        with self._lock:
            return self._credential

    def _headers(self) -> dict[str, str]:
        # Headers, never the URL: URLs end up in access logs.
        headers = dict(self.header)
        with self._lock:
            credential, enrolled = self._credential, self._enrolled
        if credential and (enrolled or not self.enrolment_key):
            headers["Authorization"] = f"Bearer {credential}"
        elif self.enrolment_key:
            headers["Authorization"] = f"Bearer {self.enrolment_key}"
            if credential:
                headers[wire.CREDENTIAL_HEADER] = credential  # ours, to be bound
        if self.identity is not None:
            headers[wire.CERTIFICATE_HEADER] = self.identity.header_value()
        return headers

    def _connect_once(self, conn: _Connection) -> None:
        app = websocket.WebSocketApp(
            self.url,
            header=self._headers(),
            on_open=lambda _app: self._handle_open(conn),
            on_message=lambda _app, data: self._handle_message(conn, data),
            on_error=lambda _app, exc: self._handle_error(conn, exc),
            on_close=lambda _app, code, reason: self._handle_close(conn, code, reason),
        )
        conn.app = app
        with self._lock:
            self._conn = conn
            self._attempts += 1
            self._next_attempt_at = None
        self._set_state(AgentState.CONNECTING)
        self._log(logging.INFO, conn, "connecting to %s (attempt %d)", self.url, conn.number)
        watchdog = threading.Timer(self.connect_timeout, self._handshake_timed_out, args=(conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            if not self._stop.is_set():
                app.run_forever(
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    suppress_origin=self.suppress_origin,
                    sslopt=self.sslopt or None,
                )
        except Exception as exc:
            conn.error = conn.error or exc
        finally:
            watchdog.cancel()
            if conn.ws is not None:
                conn.ws.shutdown()  # after our own close frame, teardown leaves the socket open
            self._connection_ended(conn)

    def _fall_back_to_key(self, conn: _Connection, decision: Decision) -> Decision:
        """A refused credential, with an enrolment key at hand: enrol again, once.

        The operator may have made the service forget the credential (or an ephemeral worker
        was removed while offline); the key enrols the id again only if nobody holds it.
        """
        code = conn.effective_close()[0]
        with self._lock:
            can = (
                not decision.retry
                and code == wire.CloseCode.AUTHENTICATION_FAILED
                and self._credential is not None
                and self._enrolled
                and self.enrolment_key is not None
                and not self._key_fallback_used
            )
            if can:
                # A new credential: the operator may have forgotten the old one because it
                # leaked, so it must not be bound again.
                self._credential, self._enrolled = credentials.new_credential(), False
                self._key_fallback_used = True
                stored = self._stored()
        if not can:
            return decision
        if self.credential_file is not None:
            try:
                credentials.save(self.credential_file, stored)
            except OSError as exc:
                self._log(logging.ERROR, conn, "cannot write %s: %s", self.credential_file, exc)
        self._log(
            logging.WARNING,
            conn,
            "credential refused (%s); enrolling again with the enrolment key",
            conn.effective_close()[1],
        )
        return Decision(retry=True, delay=0.0, reason="credential refused; enrolling again")

    def _connection_ended(self, conn: _Connection) -> None:
        with self._lock:
            if conn.ended_at is None:
                conn.ended_at = time.monotonic()
            conn.ended.set()
            code, reason = conn.effective_close()
            self._registered = False
            if conn.opened_at is not None:
                self._last_close_code, self._last_close_reason = code, reason
            if conn.error is not None and code is None:
                self._last_error = _describe_error(conn.error)
            self._changed.notify_all()

    def _finish(self, conn: _Connection, decision: Decision) -> None:
        state = AgentState(decision.final_state or AgentState.STOPPED)
        with self._lock:
            self._final_reason = decision.reason
            if state == AgentState.REFUSED:
                self._last_error = decision.reason
        self._set_state(state)
        self._log(logging.ERROR, conn, "%s; not reconnecting (state %s)", decision.reason, state)

    def _close(self, conn: _Connection) -> None:
        """Send a 1000 close frame and let the reading thread take the server's answer.

        Never websocket-client's `WebSocketApp.close()` from another thread: it reads the answer
        itself and closes the socket under the reading thread's select, which then sleeps until
        its timeout (the ping timeout, 20 s by default).
        """
        ws = conn.ws
        if ws is None or conn.opened_at is None:
            return  # mid-handshake: on_open sends the close; stop() cuts after close_timeout
        try:
            ws.send_close(status=wire.CloseCode.NORMAL)
        except Exception as exc:
            self._log(logging.DEBUG, conn, "close frame not sent (%r); cutting the socket", exc)
            _abort(conn)

    def _handshake_timed_out(self, conn: _Connection) -> None:
        if conn.opened_at is None and not conn.ended.is_set():
            self._log(logging.WARNING, conn, "no handshake after %.0fs", self.connect_timeout)
            _abort(conn)

    # ---- websocket-client callbacks: record, then return ---------------------------------------

    def _handle_open(self, conn: _Connection) -> None:
        with self._lock:
            conn.opened_at = time.monotonic()
            conn.ws = conn.app.sock if conn.app is not None else None
            self._connects += 1
            self._connected_at = _now_iso()
        self._set_state(AgentState.CONNECTED)
        self._log(logging.INFO, conn, "connected, waiting for welcome")
        if self._stop.is_set():
            self._close(conn)

    def _handle_error(self, conn: _Connection, exc: BaseException) -> None:
        if isinstance(exc, websocket.WebSocketBadStatusException):
            conn.handshake_status = exc.status_code
        if isinstance(exc, websocket.WebSocketConnectionClosedException) and hasattr(
            exc, "status_code"
        ):
            return  # websocket-client's wrapper around an ordinary close frame
        if conn.error is None:
            conn.error = exc

    def _handle_close(self, conn: _Connection, code: int | None, reason: str | None) -> None:
        conn.close_code, conn.close_reason = code, reason
        conn.ended_at = conn.ended_at or time.monotonic()
        conn.ended.set()

    def _handle_message(self, conn: _Connection, data: str | bytes) -> None:
        if isinstance(data, bytes | bytearray):
            self.peering.relay_frame(bytes(data))  # datagrams through the service relay
            return
        try:
            message = wire.parse_server_message(data)
        except wire.ServerFrameError as exc:
            self._log(logging.WARNING, conn, "ignoring a server frame: %s", exc)
            return
        kind = message["type"]
        if kind == wire.ServerMessageType.WELCOME:
            self._handle_welcome(conn, message)
        elif kind == wire.ServerMessageType.HEARTBEAT_ACK:
            with self._lock:
                self._last_heartbeat_ack_at = _now_iso()
        elif kind == wire.ServerMessageType.PUBLIC_IP_REGISTERED:
            conn.public_ip_acked = True
            with self._lock:
                self._public_ip_registered = message.get("ip")
            self._log(logging.INFO, conn, "server recorded public ip %s", message.get("ip"))
        elif kind == wire.ServerMessageType.AGENT_INFO_RECORDED:
            self._log(logging.DEBUG, conn, "server recorded agent info")
        elif kind == wire.ServerMessageType.ERROR and self.peering.ended_here(
            message.get("introduction_id")
        ):
            # Relay frames that were on their way when the connection to the peer closed.
            self._log(logging.DEBUG, conn, "late frame of an ended introduction: %s", message)
        elif kind == wire.ServerMessageType.ERROR:
            with self._lock:
                self._last_server_error = {
                    "code": message.get("code"),
                    "message": message.get("message"),
                    "at": _now_iso(),
                }
            self._log(
                logging.WARNING,
                conn,
                "server error %s: %s",
                message.get("code"),
                message.get("message"),
            )
        elif self.peering.handle(message):
            pass
        elif kind == wire.ServerMessageType.CLOSING:
            conn.closing = message
            self._log(
                logging.INFO,
                conn,
                "server is closing the connection: %s %s",
                message.get("code"),
                message.get("reason"),
            )
        else:
            self._log(logging.DEBUG, conn, "server message of unknown type %r", kind)
        self._call(self.on_message, message)
        if kind == wire.ServerMessageType.WELCOME:
            self._call(self.on_registered, message)

    def _handle_welcome(self, conn: _Connection, welcome: dict[str, Any]) -> None:
        issued = welcome.pop("credential", None)
        if isinstance(issued, str) and issued:
            self._keep_credential(conn, issued)  # a service that makes credentials itself
        elif not self._enrolled and self._credential and self.enrolment_key:
            self._keep_credential(conn, self._credential)  # ours is bound now
        with self._lock:
            self._key_fallback_used = False
        with self._lock:
            first = conn.welcome is None
            conn.welcome = welcome
            conn.connection_id = welcome.get("connection_id")
            self._welcome = dict(welcome)
            self._registered = True
            self._registered_at = _now_iso()
            self._changed.notify_all()
        self._set_state(AgentState.REGISTERED)
        self.peering.session_started(welcome)
        self._log(
            logging.INFO,
            conn,
            "registered on instance %s, observed as %s:%s, heartbeat every %ss",
            welcome.get("instance_id"),
            welcome.get("observed_ip"),
            welcome.get("observed_port"),
            self._heartbeat_every(welcome),
        )
        if first:
            conn.session = threading.Thread(
                target=self._session,
                args=(conn, welcome, time.monotonic()),
                name=f"worker-agent-session-{self.worker_id[:12]}",
                daemon=True,
            )
            conn.session.start()

    def _keep_credential(self, conn: _Connection, credential: str) -> None:
        with self._lock:
            self._credential, self._enrolled = credential, True
        if self.credential_file is None:
            self._log(logging.INFO, conn, "enrolled: credential kept in memory only")
            return
        try:
            credentials.save(self.credential_file, self._stored())
        except OSError as exc:
            self._log(
                logging.ERROR,
                conn,
                "enrolled, but the credential could not be written to %s (%s): kept in memory; "
                "after a restart this worker id cannot reconnect",
                self.credential_file,
                exc,
            )
            return
        self._log(logging.INFO, conn, "enrolled: credential stored in %s", self.credential_file)

    # ---- after welcome: agent info, public address, heartbeats ---------------------------------

    def _session(self, conn: _Connection, welcome: dict[str, Any], welcomed_at: float) -> None:
        if not self._send(conn, wire.agent_info(self.agent_info)):
            return
        if self.report_nat and self.peering.stun_servers():
            threading.Thread(
                target=self._report_nat, name="worker-agent-netcheck", daemon=True
            ).start()
        try:
            ip = self._fetch_public_ip()
        except Exception:
            logger.exception("worker=%s: the public ip fetcher raised", self.worker_id)
            ip = None
        if conn.ended.is_set():
            return
        report: str | None = None
        if ip:
            try:
                report = wire.register_public_ip(ip)
            except ValueError:
                self._log(logging.WARNING, conn, "not reporting invalid public ip %r", ip)
            else:
                with self._lock:
                    self._public_ip = ip
                if self._send(conn, report):
                    self._log(logging.INFO, conn, "reported public ip %s", ip)
        interval = self._heartbeat_every(welcome)
        if interval is None:
            self._log(logging.WARNING, conn, "welcome gave no heartbeat interval; sending none")
            return
        next_at = welcomed_at + interval
        while not conn.ended.wait(max(0.0, next_at - time.monotonic())):
            if report is not None and not conn.public_ip_acked:
                # Not acknowledged (say the server answered UNAVAILABLE): report it again.
                self._send(conn, report)
            if not self._send(conn, wire.heartbeat()):
                return
            next_at = max(next_at + interval, time.monotonic())

    def _report_nat(self) -> None:
        try:
            self.peering.report_nat()
        except P2PUnavailable:
            logger.debug("worker=%s: no NAT check without the p2p extra", self.worker_id)
        except Exception as exc:  # the registration stands without it
            logger.warning("worker=%s: NAT check failed: %s", self.worker_id, exc)

    def _heartbeat_every(self, welcome: Mapping[str, Any]) -> float | None:
        if self.heartbeat_interval is not None:
            return float(self.heartbeat_interval)
        value = welcome.get("heartbeat_interval")
        return float(value) if _positive(value) else None

    def _send(self, conn: _Connection, frame: str | bytes, *, binary: bool = False) -> bool:
        app = conn.app
        if app is None or conn.ended.is_set():
            return False
        try:
            app.send(frame, websocket.ABNF.OPCODE_BINARY if binary else websocket.ABNF.OPCODE_TEXT)
        except (websocket.WebSocketException, OSError) as exc:
            self._log(logging.DEBUG, conn, "send failed, connection is closing: %r", exc)
            return False
        return True

    # ---- state, callbacks, logs ----------------------------------------------------------------

    def _set_state(self, new: AgentState) -> None:
        with self._lock:
            old = self._state
            if old == new or old in FINAL_STATES:
                return
            if old == AgentState.STOPPING and new not in FINAL_STATES:
                return
            if old == AgentState.IDLE and new == AgentState.STOPPING:
                new = AgentState.STOPPED
            self._state = new
            self._changed.notify_all()
        self._call(self.on_state_change, str(old), str(new))

    def _call(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(self, *args)
        except Exception:
            logger.exception("worker=%s: callback %r raised", self.worker_id, callback)

    def _log(self, level: int, conn: _Connection | None, message: str, *args: Any) -> None:
        conn_id = conn.connection_id if conn is not None else None
        logger.log(
            level,
            "worker=%s conn=%s " + message,
            self.worker_id,
            "-" if conn_id is None else conn_id,
            *args,
        )

    def _describe_end(self, conn: _Connection, decision: Decision) -> str:
        outcome = conn.outcome()
        code, reason = conn.effective_close()
        if not outcome.opened:
            error = _describe_error(conn.error) if conn.error else "no answer"
            return f"connection failed ({error})"
        text = f"connection ended after {outcome.uptime:.1f}s"
        if code is not None:
            text += f" with close code {code}"
            if reason:
                text += f" ({reason})"
        elif conn.error is not None:
            text += f" ({_describe_error(conn.error)})"
        return f"{text}: {decision.reason}"

    def __repr__(self) -> str:
        return f"<WorkerAgent {self.worker_id} {self._state}>"


def _identity(stored: credentials.Identity | None, worker_id: str) -> WorkerIdentity | None:
    """The stored key pair, or a new one; None without the p2p extra (no cryptography)."""
    try:
        from .p2p import identity
    except ImportError:
        return None
    if stored is not None and stored.private_key and stored.certificate:
        return identity.WorkerIdentity(
            private_key_pem=stored.private_key.encode(), certificate_pem=stored.certificate.encode()
        )
    return identity.create(worker_id)


def _abort(conn: _Connection) -> None:
    """Shut the raw socket down (without closing it) so the reading thread wakes up and ends."""
    app = conn.app
    ws = conn.ws or (app.sock if app is not None else None)
    raw = getattr(ws, "sock", None)
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)


def _ping_settings(interval: float, timeout: float | None) -> tuple[float, float | None]:
    """websocket-client raises unless interval > timeout: clamp the timeout to 0.8 x interval."""
    interval = float(interval or 0)
    if interval < 0 or not math.isfinite(interval):
        raise ValueError("ping_interval must be 0 (no pings) or a positive number of seconds")
    if timeout is None or timeout == 0:
        return interval, None
    timeout = float(timeout)
    if timeout < 0 or not math.isfinite(timeout):
        raise ValueError("ping_timeout must be a positive number of seconds")
    if interval and timeout >= interval:
        clamped = round(interval * PING_TIMEOUT_CLAMP, 3)
        logger.info(
            "ping_timeout %ss is not below ping_interval %ss; using %ss",
            timeout,
            interval,
            clamped,
        )
        timeout = clamped
    return interval, timeout


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return f"HTTP {exc.status_code} at the handshake"
    text = str(exc).split(" -+-+- ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
