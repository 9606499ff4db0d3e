"""The session with the service: one WebSocket, kept up in a thread until stopped.

It owns the connection's life and nothing more: frames come from `wire`, delays and the give-up
rules from `reconnect`, the credential from `enrolment`, what is said once registered from
`reporting`. websocket-client callbacks only record what happened on their attempt; decisions
are taken in the session's own loop. Frames it does not handle itself go to `handle_frame`, the
layer above (signalling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import websocket

from .. import wire
from .attempt import Attempt
from .enrolment import Enrolment
from .error_lines import ErrorLines
from .reconnect import Decision, ReconnectPolicy
from .reporting import Reporter
from .status import FINAL_STATES, AgentState, SessionStatus, now_iso

logger = logging.getLogger("worker_agent")

# websocket-client insists on ping_interval > ping_timeout; the PoC's 25/25 is clamped to this.
PING_TIMEOUT_CLAMP = 0.8
# Server errors of one code are logged at most once in this many seconds; the repeats between
# two lines are counted in the second.
SERVER_ERROR_QUIET = 5.0

FrameHandler = Callable[[dict[str, Any]], bool]
BinaryHandler = Callable[[bytes], None]


class ServiceSession:
    """Keeps one worker registered with the service until stopped; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        enrolment: Enrolment,
        reporter: Reporter,
        reconnect: ReconnectPolicy,
        ping_interval: float,
        ping_timeout: float | None,
        connect_timeout: float,
        close_timeout: float,
        header: Mapping[str, str],
        suppress_origin: bool,
        sslopt: Mapping[str, Any],
    ) -> None:
        self.url = url
        self.worker_id = enrolment.worker_id
        self.enrolment = enrolment
        self.reporter = reporter
        self.reconnect = reconnect
        self.ping_interval, self.ping_timeout = ping_settings(ping_interval, ping_timeout)
        self.connect_timeout = float(connect_timeout)
        self.close_timeout = float(close_timeout)
        self.header = dict(header)
        self.suppress_origin = suppress_origin
        self.sslopt = dict(sslopt)
        # The layers above, and the host program's callbacks (set by the agent).
        self.handle_frame: FrameHandler = lambda message: False
        self.handle_binary: BinaryHandler = lambda frame: None
        self.on_welcome: Callable[[dict[str, Any]], None] = lambda welcome: None
        self.on_message: Callable[[dict[str, Any]], None] = lambda message: None
        self.on_ended: Callable[[], None] = lambda: None
        self.status = SessionStatus()  # its `on_change` is the host program's state callback
        self._lock = self.status.lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempt: Attempt | None = None
        self._error_lines = ErrorLines(SERVER_ERROR_QUIET)

    # ---- what the agent calls ------------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self.status.state

    @property
    def registered(self) -> bool:
        return self.status.registered

    def start(self) -> None:
        """Connect in a daemon thread and keep connecting until stop() or a final state."""
        with self._lock:
            if self._thread is not None or self.status.state in FINAL_STATES:
                raise RuntimeError("a WorkerAgent can be started once")
            self.status.started_at = now_iso()
            self._thread = threading.Thread(
                target=self._run, name=f"worker-agent-{self.worker_id[:12]}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close with code 1000 and wait for the loop to end. False if it is still running.

        The server gets `close_timeout` seconds to answer the close; then the socket is cut.
        Called from one of the session's own callbacks it only asks, and returns False.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.status.set(AgentState.STOPPING)
        with self._lock:
            attempt, thread = self._attempt, self._thread
        if attempt is not None and not attempt.ended.is_set():
            self._close(attempt)
        if thread is None:
            self.status.set(AgentState.STOPPED)
            return True
        if thread is threading.current_thread():
            return False
        thread.join(min(self.close_timeout, timeout))
        if thread.is_alive() and attempt is not None:
            attempt.abort()
            thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def wait_registered(self, timeout: float | None = None) -> bool:
        """True once the current connection got the server's welcome; False on timeout or end."""
        return self.status.wait_registered(timeout)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """True once the session reached a final state (stopped, superseded or refused)."""
        return self.status.wait_finished(timeout)

    def send_current(self, frame: str | bytes, *, binary: bool = False) -> bool:
        """Send on the registered connection; False when there is none."""
        with self._lock:
            attempt = self._attempt if self.status.registered else None
        return attempt is not None and self._send(attempt, frame, binary=binary)

    def round_trip(self, timeout: float = 5.0) -> float | None:
        """Seconds from a `heartbeat` to the service's next `heartbeat_ack` (what the relay's
        first hop costs); None when not registered or no answer came in time."""
        with self.status.changed:
            acks = self.status.heartbeat_acks
        started = time.monotonic()
        if not self.send_current(wire.heartbeat()):
            return None
        with self.status.changed:
            answered = self.status.changed.wait_for(
                lambda: self.status.heartbeat_acks > acks, timeout
            )
        return time.monotonic() - started if answered else None

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                attempt = Attempt(number)
                try:
                    self._connect_once(attempt)
                    if self._stop.is_set():
                        break
                    decision = self._fall_back_to_key(
                        attempt, self.reconnect.after(attempt.outcome())
                    )
                except Exception as exc:  # a bug must not end the agent silently
                    logger.exception(
                        "worker=%s: unexpected error in the agent loop", self.worker_id
                    )
                    with self._lock:
                        self.status.last_error = f"internal error: {exc!r}"
                    decision = Decision(
                        retry=True,
                        delay=self.reconnect.backoff.next_delay(),
                        reason="internal error",
                    )
                if not decision.retry:
                    self._finish(attempt, decision)
                    return
                if self._wait_before_retry(attempt, decision):
                    break
        finally:
            self.on_ended()  # every peer path ends with the agent
            with self._lock:
                self.status.next_attempt_at = None
            self.status.set(AgentState.STOPPED)
            if self.status.state == AgentState.STOPPED:
                logger.info("worker=%s: stopped", self.worker_id)

    def _wait_before_retry(self, attempt: Attempt, decision: Decision) -> bool:
        """Back off before the next attempt; True if stop() was called meanwhile."""
        self._log(
            logging.INFO,
            attempt,
            "%s; reconnecting in %.1fs",
            attempt.describe_end(decision.reason),
            decision.delay,
        )
        with self._lock:
            self.status.next_attempt_at = datetime.fromtimestamp(
                time.time() + decision.delay, UTC
            ).isoformat(timespec="milliseconds")
        self.status.set(AgentState.BACKOFF)
        return self._stop.wait(decision.delay)

    def _connect_once(self, attempt: Attempt) -> None:
        app = websocket.WebSocketApp(
            self.url,
            header=self.enrolment.headers(self.header),
            on_open=lambda _app: self._handle_open(attempt),
            on_message=lambda _app, data: self._handle_message(attempt, data),
            on_error=lambda _app, exc: self._handle_error(attempt, exc),
            on_close=lambda _app, code, reason: self._handle_close(attempt, code, reason),
        )
        attempt.app = app
        with self._lock:
            self._attempt = attempt
            self.status.attempts += 1
            self.status.next_attempt_at = None
        self.status.set(AgentState.CONNECTING)
        self._log(logging.INFO, attempt, "connecting to %s (attempt %d)", self.url, attempt.number)
        watchdog = threading.Timer(self.connect_timeout, self._handshake_timed_out, args=(attempt,))
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
            attempt.error = attempt.error or exc
        finally:
            watchdog.cancel()
            if attempt.ws is not None:
                attempt.ws.shutdown()  # after our own close frame, teardown leaves it open
            self._connection_ended(attempt)

    def _fall_back_to_key(self, attempt: Attempt, decision: Decision) -> Decision:
        """A refused credential, with an enrolment key at hand: enrol again, once.

        The operator may have made the service forget the credential (or an ephemeral worker
        was removed while offline); the key enrols the id again only if nobody holds it.
        """
        code, reason = attempt.effective_close()
        if decision.retry or code != wire.CloseCode.AUTHENTICATION_FAILED:
            return decision
        falls_back, problem = self.enrolment.fall_back_to_key()
        if not falls_back:
            return decision
        if problem is not None:
            self._log(logging.ERROR, attempt, "%s", problem)
        self._log(
            logging.WARNING,
            attempt,
            "credential refused (%s); enrolling again with the enrolment key",
            reason,
        )
        return Decision(retry=True, delay=0.0, reason="credential refused; enrolling again")

    def _connection_ended(self, attempt: Attempt) -> None:
        if attempt.ended_at is None:
            attempt.ended_at = time.monotonic()
        attempt.ended.set()
        self.status.ended(
            opened=attempt.opened_at is not None,
            close=attempt.effective_close(),
            error=attempt.describe_error(),
        )

    def _finish(self, attempt: Attempt, decision: Decision) -> None:
        state = AgentState(decision.final_state or AgentState.STOPPED)
        with self._lock:
            self.status.final_reason = decision.reason
            if state == AgentState.REFUSED:
                self.status.last_error = decision.reason
        self.status.set(state)
        self._log(logging.ERROR, attempt, "%s; not reconnecting (state %s)", decision.reason, state)

    def _close(self, attempt: Attempt) -> None:
        """Send a 1000 close frame and let the reading thread take the server's answer.

        Never websocket-client's `WebSocketApp.close()` from another thread: it reads the answer
        itself and closes the socket under the reading thread's select, which then sleeps until
        its timeout (the ping timeout, 20 s by default).
        """
        ws = attempt.ws
        if ws is None or attempt.opened_at is None:
            return  # mid-handshake: on_open sends the close; stop() cuts after close_timeout
        try:
            ws.send_close(status=wire.CloseCode.NORMAL)
        except Exception as exc:
            self._log(logging.DEBUG, attempt, "close frame not sent (%r); cutting the socket", exc)
            attempt.abort()

    def _handshake_timed_out(self, attempt: Attempt) -> None:
        if attempt.opened_at is None and not attempt.ended.is_set():
            self._log(logging.WARNING, attempt, "no handshake after %.0fs", self.connect_timeout)
            attempt.abort()

    # ---- websocket-client callbacks: record, then return ---------------------------------------

    def _handle_open(self, attempt: Attempt) -> None:
        with self._lock:
            attempt.opened_at = time.monotonic()
            attempt.ws = attempt.app.sock if attempt.app is not None else None
            self.status.connects += 1
            self.status.connected_at = now_iso()
        self.status.set(AgentState.CONNECTED)
        self._log(logging.INFO, attempt, "connected, waiting for welcome")
        if self._stop.is_set():
            self._close(attempt)

    def _handle_error(self, attempt: Attempt, exc: BaseException) -> None:
        if isinstance(exc, websocket.WebSocketBadStatusException):
            attempt.handshake_status = exc.status_code
        if isinstance(exc, websocket.WebSocketConnectionClosedException) and hasattr(
            exc, "status_code"
        ):
            return  # websocket-client's wrapper around an ordinary close frame
        if attempt.error is None:
            attempt.error = exc

    def _handle_close(self, attempt: Attempt, code: int | None, reason: str | None) -> None:
        attempt.close_code, attempt.close_reason = code, reason
        attempt.ended_at = attempt.ended_at or time.monotonic()
        attempt.ended.set()

    def _handle_message(self, attempt: Attempt, data: str | bytes) -> None:
        if isinstance(data, bytes | bytearray):
            self.handle_binary(bytes(data))  # datagrams through the service relay
            return
        try:
            message = wire.parse_server_message(data)
        except wire.ServerFrameError as exc:
            self._log(logging.WARNING, attempt, "ignoring a server frame: %s", exc)
            return
        kind = message["type"]
        if kind == wire.ServerMessageType.WELCOME:
            self._handle_welcome(attempt, message)
        elif kind == wire.ServerMessageType.HEARTBEAT_ACK:
            with self._lock:
                self.status.last_heartbeat_ack_at = now_iso()
                self.status.heartbeat_acks += 1
                self.status.changed.notify_all()
        elif kind == wire.ServerMessageType.PUBLIC_IP_REGISTERED:
            self.reporter.acknowledged(attempt, message.get("ip"))
            self._log(logging.INFO, attempt, "server recorded public ip %s", message.get("ip"))
        elif kind == wire.ServerMessageType.AGENT_INFO_RECORDED:
            self._log(logging.DEBUG, attempt, "server recorded agent info")
        elif self.handle_frame(message):
            pass  # a peer frame, or an error about an introduction the layer above ended
        elif kind == wire.ServerMessageType.ERROR:
            self._server_error(attempt, message)
        elif kind == wire.ServerMessageType.CLOSING:
            attempt.closing = message
            self._log(
                logging.INFO,
                attempt,
                "server is closing the connection: %s %s",
                message.get("code"),
                message.get("reason"),
            )
        else:
            self._log(logging.DEBUG, attempt, "server message of unknown type %r", kind)
        self.on_message(message)

    def _server_error(self, attempt: Attempt, message: dict[str, Any]) -> None:
        """Kept as the last server error; logged unless its code was logged a moment ago (a
        flood of one error is not logged as a flood)."""
        code = message.get("code")
        with self._lock:
            self.status.last_server_error = {
                "code": code,
                "message": message.get("message"),
                "at": now_iso(),
            }
            repeats = self._error_lines.due(str(code))
        if repeats is None:
            return
        self._log(
            logging.WARNING,
            attempt,
            "server error %s: %s%s",
            code,
            message.get("message"),
            f" ({repeats} more of {code} since its last line)" if repeats else "",
        )

    def _handle_welcome(self, attempt: Attempt, welcome: dict[str, Any]) -> None:
        said = self.enrolment.welcomed(welcome.pop("credential", None))
        if said is not None:
            self._log(said[0], attempt, "%s", said[1])
        with self._lock:
            first = attempt.welcome is None
            attempt.welcome = welcome
            attempt.connection_id = welcome.get("connection_id")
            self.status.welcomed(welcome)
        self.status.set(AgentState.REGISTERED)
        self.on_welcome(welcome)
        self._log(
            logging.INFO,
            attempt,
            "registered on instance %s, observed as %s:%s, heartbeat every %ss",
            welcome.get("instance_id"),
            welcome.get("observed_ip"),
            welcome.get("observed_port"),
            self.reporter.heartbeat_every(welcome),
        )
        if first:
            attempt.reporter = threading.Thread(
                target=self.reporter.run,
                args=(attempt, welcome, time.monotonic(), self._send, self._log),
                name=f"worker-agent-session-{self.worker_id[:12]}",
                daemon=True,
            )
            attempt.reporter.start()

    def _send(self, attempt: Attempt, frame: str | bytes, *, binary: bool = False) -> bool:
        app = attempt.app
        if app is None or attempt.ended.is_set():
            return False
        try:
            app.send(frame, websocket.ABNF.OPCODE_BINARY if binary else websocket.ABNF.OPCODE_TEXT)
        except (websocket.WebSocketException, OSError) as exc:
            self._log(logging.DEBUG, attempt, "send failed, connection is closing: %r", exc)
            return False
        return True

    # ---- logs ------------------------------------------------------------------------

    def _log(self, level: int, attempt: Attempt | None, message: str, *args: Any) -> None:
        conn_id = attempt.connection_id if attempt is not None else None
        logger.log(
            level,
            "worker=%s conn=%s " + message,
            self.worker_id,
            "-" if conn_id is None else conn_id,
            *args,
        )


def ping_settings(interval: float, timeout: float | None) -> tuple[float, float | None]:
    """websocket-client raises unless interval > timeout: clamp the timeout to 0.8 x interval."""
    interval = float(interval or 0)
    if timeout is None or timeout == 0:
        return interval, None
    timeout = float(timeout)
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
