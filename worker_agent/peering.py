"""The agent's side of peer discovery and hole punching (docs/nat-traversal.md).

`WorkerAgent` owns one `Peering` and forwards it the peer frames; the host program calls
`agent.connect(peer_id)`, `agent.list_peers()` and `agent.subscribe_peers()`. Each connection
gets a UDP socket of its own: STUN on it (two servers classify the NAT's mapping), candidates
to the service, an introduction back, then `punch.punch` on that same socket. The side that is
asked runs the same steps in a thread of its own and hands the path to `on_peer`.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from . import punch, stun, wire
from .punch import PeerPath

logger = logging.getLogger("worker_agent")

DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_PUNCH_TIMEOUT = 5.0
STUN_TIMEOUT = 2.0
ANSWER_TIMEOUT = 30.0  # how long the asked side waits for its introduction
MAX_LOCAL_CANDIDATES = 3
# Introductions answered at once; more are refused: each costs a thread, a socket and probes.
MAX_ANSWERING = 4
# The longest the punch waits for the service's start time. Longer means our clock is behind the
# service's; the punch then starts now rather than blocking past every timeout.
MAX_START_WAIT = 3.0

Send = Callable[[str], bool]
PeerCallback = Callable[[PeerPath], None]


class PeerError(Exception):
    """A connection to a peer that did not come about; the message says why."""


class PeerUnavailable(PeerError):
    pass


class PeerRefused(PeerError):
    pass


class PunchImpossible(PeerError):
    """Both NATs map endpoint-dependently: no direct path can be punched (no relay yet)."""


class PunchFailed(PeerError):
    """Probes were sent but no path came about within the punch timeout."""


class StunFailed(PeerError):
    pass


_FAILURES: dict[str, type[PeerError]] = {
    wire.ConnectFailure.PEER_UNAVAILABLE: PeerUnavailable,
    wire.ConnectFailure.PEER_REFUSED: PeerRefused,
    wire.ConnectFailure.PUNCH_IMPOSSIBLE: PunchImpossible,
    wire.ConnectFailure.NOT_YOURSELF: PeerError,
    wire.ConnectFailure.RATE_LIMITED: PeerError,
}


class Peering:
    def __init__(
        self,
        worker_id: str,
        send: Send,
        *,
        stun_servers: Sequence[str] | None = None,
        udp_host: str = "0.0.0.0",
        on_peer: PeerCallback | None = None,
        punch_timeout: float = DEFAULT_PUNCH_TIMEOUT,
    ) -> None:
        self.worker_id = worker_id
        self._send = send
        self._configured_stun = list(stun_servers) if stun_servers else None
        self._advertised_stun: list[str] = []
        self.udp_host = udp_host
        self.on_peer = on_peer
        self.punch_timeout = punch_timeout
        self._lock = threading.Lock()
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._answering: set[str] = set()
        self._subscription: tuple[bool, str | None] = (False, None)
        self.last_nat_report: stun.NatReport | None = None

    # ---- the session --------------------------------------------------------------------------

    def session_started(self, welcome: dict[str, Any]) -> None:
        """A new registration: take the service's STUN servers, renew the subscription."""
        advertised = welcome.get("stun_servers")
        if isinstance(advertised, list):
            self._advertised_stun = [s for s in advertised if isinstance(s, str)]
        subscribed, tag = self._subscription
        if subscribed:
            self._send(wire.subscribe_peers(tag))

    def stun_servers(self) -> list[stun.Endpoint]:
        servers = []
        for text in self._configured_stun or self._advertised_stun:
            try:
                servers.append(stun.parse_endpoint(text))
            except ValueError:
                logger.warning("worker=%s: ignoring STUN server %r", self.worker_id, text)
        return servers

    def report_nat(self) -> stun.NatReport | None:
        """Classify the NAT from a fresh socket and tell the service (admin, API, peer list)."""
        servers = self.stun_servers()
        if not servers:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((self.udp_host, 0))
            report = stun.classify_nat(sock, servers, timeout=STUN_TIMEOUT)
        self.last_nat_report = report
        self._send(wire.nat_report(report.mapping.value, report.mapped))
        logger.info(
            "worker=%s: NAT mapping %s, UDP endpoint %s",
            self.worker_id,
            report.mapping.value,
            _format(report.mapped),
        )
        return report

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

    def connect(self, peer_id: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> PeerPath:
        """A direct UDP path to `peer_id`, or a PeerError that says why there is none."""
        deadline = time.monotonic() + timeout
        sock = self._udp_socket()
        try:
            report, candidates = self._gather(sock)
            request_id = _request_id()
            reply = self._ask(
                wire.connect_request(
                    peer_id=peer_id,
                    request_id=request_id,
                    endpoints=candidates,
                    nat_mapping=report.mapping.value,
                ),
                request_id,
                max(0.1, deadline - time.monotonic()),
                until=(wire.ServerMessageType.INTRODUCTION, wire.ServerMessageType.CONNECT_FAILED),
            )
            if reply["type"] == wire.ServerMessageType.CONNECT_FAILED:
                failure = _FAILURES.get(reply.get("code", ""), PeerError)
                raise failure(f"cannot reach {peer_id}: {reply.get('reason')}")
            return self._punch(sock, reply, report)
        except BaseException:
            sock.close()
            raise

    # ---- frames from the service (called on the agent's socket thread: never block) ------------

    def handle(self, message: dict[str, Any]) -> bool:
        """Take a peer frame; False if it is not one of ours."""
        kind = message.get("type")
        if kind == wire.ServerMessageType.INTRODUCTION_REQUEST:
            introduction_id = str(message.get("introduction_id"))
            with self._lock:
                duplicate = introduction_id in self._answering
                busy = len(self._answering) >= MAX_ANSWERING
                if not duplicate and not busy:
                    self._answering.add(introduction_id)
            if duplicate:
                return True  # the same request twice (a retried send): one answer is enough
            if busy:
                self._send(
                    wire.introduction_reject(
                        introduction_id=introduction_id,
                        reason=f"busy: {MAX_ANSWERING} introductions in progress",
                    )
                )
                return True
            threading.Thread(
                target=self._answer,
                args=(message,),
                name=f"worker-agent-answer-{self.worker_id[:12]}",
                daemon=True,
            ).start()
            return True
        if kind in (
            wire.ServerMessageType.PEERS,
            wire.ServerMessageType.CONNECT_PENDING,
            wire.ServerMessageType.CONNECT_FAILED,
            wire.ServerMessageType.INTRODUCTION,
        ):
            # The asking side waits under its request id, the asked side under the introduction's.
            with self._lock:
                for key in (message.get("request_id"), message.get("introduction_id")):
                    waiter = self._waiters.get(key) if isinstance(key, str) else None
                    if waiter is not None:
                        waiter.put(message)
                        break
            return True
        return False

    # ---- the steps -----------------------------------------------------------------------------

    def _udp_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.udp_host, 0))
        return sock

    def _gather(self, sock: socket.socket) -> tuple[stun.NatReport, list[stun.Endpoint]]:
        """This socket's public endpoint and NAT mapping, and its candidates (public first)."""
        servers = self.stun_servers()
        if not servers:
            raise StunFailed(
                "no STUN servers: pass stun_servers, or set RENDEZVOUS_STUN_SERVERS on the service"
            )
        report = stun.classify_nat(sock, servers, timeout=STUN_TIMEOUT)
        if report.mapped is None:
            errors = "; ".join(f"{_format(r.server)}: {r.error}" for r in report.results)
            raise StunFailed(f"no STUN server answered ({errors})")
        candidates = [report.mapped]
        port = sock.getsockname()[1]
        for ip in _local_addresses(self.udp_host, servers):
            if (ip, port) not in candidates:
                candidates.append((ip, port))
        return report, candidates[: 1 + MAX_LOCAL_CANDIDATES]

    def _punch(
        self, sock: socket.socket, introduction: dict[str, Any], report: stun.NatReport
    ) -> PeerPath:
        intro = punch.Introduction(
            introduction_id=introduction["introduction_id"],
            my_id=self.worker_id,
            peer_id=introduction["peer_id"],
            peer_endpoints=tuple(
                (e["ip"], int(e["port"])) for e in introduction.get("peer_endpoints", [])
            ),
            key=bytes.fromhex(introduction["key"]),
            start_at=self._start_at(float(introduction["start_at"])),
        )
        peer_mapping = introduction.get("peer_nat_mapping")
        try:
            path = punch.punch(sock, intro, timeout=self.punch_timeout)
        except punch.PunchTimeout as exc:
            reason = _explain(str(exc), mine=report.mapping.value, theirs=peer_mapping)
            self._send(
                wire.punch_result(introduction_id=intro.introduction_id, ok=False, detail=reason)
            )
            raise PunchFailed(reason) from exc
        self._send(wire.punch_result(introduction_id=intro.introduction_id, ok=True))
        logger.info(
            "worker=%s: direct path to %s at %s",
            self.worker_id,
            intro.peer_id,
            _format(path.peer_address),
        )
        return path

    def _start_at(self, start_at: float) -> float:
        latest = time.time() + MAX_START_WAIT
        if start_at > latest:
            logger.warning(
                "worker=%s: the punch was to start in %.1fs; this clock is probably behind the "
                "service's. Starting in %.1fs instead",
                self.worker_id,
                start_at - time.time(),
                MAX_START_WAIT,
            )
            return latest
        return start_at

    def _answer(self, request: dict[str, Any]) -> None:
        try:
            self._answer_one(request)
        finally:
            with self._lock:
                self._answering.discard(str(request.get("introduction_id")))

    def _answer_one(self, request: dict[str, Any]) -> None:
        """The asked side: accept (gather and punch) or refuse, then hand the path over."""
        introduction_id = str(request.get("introduction_id"))
        peer_id = request.get("peer_id")
        if self.on_peer is None:
            self._send(
                wire.introduction_reject(
                    introduction_id=introduction_id,
                    reason="this worker does not accept peer connections",
                )
            )
            return
        sock = self._udp_socket()
        try:
            try:
                report, candidates = self._gather(sock)
            except (PeerError, OSError) as exc:
                self._send(
                    wire.introduction_reject(introduction_id=introduction_id, reason=str(exc))
                )
                raise
            introduction = self._ask(
                wire.introduction_accept(
                    introduction_id=introduction_id,
                    endpoints=candidates,
                    nat_mapping=report.mapping.value,
                ),
                introduction_id,
                ANSWER_TIMEOUT,
                until=(wire.ServerMessageType.INTRODUCTION, wire.ServerMessageType.CONNECT_FAILED),
            )
            if introduction["type"] == wire.ServerMessageType.CONNECT_FAILED:
                raise PeerError(str(introduction.get("reason")))
            path = self._punch(sock, introduction, report)
        except Exception as exc:
            sock.close()
            logger.warning("worker=%s: connection from %s failed: %s", self.worker_id, peer_id, exc)
            return
        try:
            self.on_peer(path)
        except Exception:
            logger.exception("worker=%s: the on_peer callback raised", self.worker_id)

    def _ask(
        self,
        frame: str,
        key: str,
        timeout: float,
        *,
        until: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Send `frame` and wait for the reply filed under `key` (one of `until`, if given)."""
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
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
                if until is None or reply.get("type") in until:
                    return reply
        finally:
            with self._lock:
                self._waiters.pop(key, None)


def _request_id() -> str:
    return uuid.uuid4().hex[:16]


def _format(endpoint: tuple[str, int] | None) -> str:
    if endpoint is None:
        return "-"
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _local_addresses(bind_host: str, servers: Sequence[stun.Endpoint]) -> list[str]:
    """The address this host would send from towards the STUN servers (its LAN address)."""
    if bind_host not in ("0.0.0.0", ""):
        return [bind_host]
    found: list[str] = []
    for host, port in servers:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, port))  # no packet is sent: this only picks a route
                address = probe.getsockname()[0]
        except OSError:
            continue
        if address not in found:
            found.append(address)
    return found


def _explain(detail: str, *, mine: str, theirs: Any) -> str:
    dependent = stun.NatMapping.ENDPOINT_DEPENDENT.value
    sides = [name for name, m in (("our", mine), ("the peer's", theirs)) if m == dependent]
    if not sides:
        return f"hole punching failed: {detail}"
    return (
        f"hole punching failed: {' and '.join(sides)} NAT maps endpoint-dependently "
        "(symmetric), so a probe only gets through if the other NAT accepts packets from any "
        f"port (full cone), and it did not; no direct path, and no relay yet. {detail}"
    )
