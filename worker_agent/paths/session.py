"""One introduction's routes, from the agent's side: which to try, when, and what to tell.

The service relay carries data from the moment of the introduction. The side that asked for it
(the initiator, controlling ICE) then drives the attempts at something better:

- an `all` attempt (LAN and direct) at once; after a failure, again after 3, 6, 12, 24, then
  every 30 s, for as long as the path has no LAN or direct route (a NAT rule may change, a
  firewall may open: the path moves up when it does);
- with TURN credentials, a `relay` (TURN) attempt one second later unless a direct route is up
  by then, retried less often; it is closed again once a direct route is up, to free the
  allocation.

The other side answers each attempt it hears of. Routes that die (consent to send expires, the
TURN allocation ends) leave the path, which falls back to the next best.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import NoPath
from .ice import DEFAULT_TIMEOUT, IceAttempt, TurnServer
from .loop import LoopThread
from .path import PeerPath, RelayRoute
from .portmap.manager import PortMapper
from .probing import HardNatProbe, ProbedRoute
from .relay import RelayLink

logger = logging.getLogger("worker_agent.p2p")

DIRECT_RETRY_DELAYS = (3.0, 6.0, 12.0, 24.0, 30.0)
TURN_RETRY_DELAYS = (10.0, 20.0, 40.0, 60.0)
TURN_HEAD_START = 1.0  # how long a direct attempt has before TURN is tried too
# The answering side follows the initiator: a newer attempt replaces an older one still checking,
# and its own timeout is a backstop only. aioice nominates aggressively: the initiator's side
# completes as soon as one of its checks is answered, the answering side only once one of its
# own (retransmitted, up to 31.5 s later) gets through, so it must not give up first.
ANSWERING_TIMEOUT = 45.0
# An introduction whose service link went (either side's WebSocket renewed, a service restart)
# may be resumed under a new one for this long; then, with no route left, it ends (QUIC's own
# idle timeout is the same).
RESUME_WITHIN = 30.0

Signal = Callable[[str], bool]


class PathSession:
    """The path of one introduction and the ICE attempts that feed it, on the peer loop."""

    def __init__(
        self,
        *,
        introduction: dict[str, Any],
        loop: LoopThread,
        relay: RelayLink,
        signal: Signal,
        stun_server: tuple[str, int] | None,
        use_udp: bool = True,
        started: float | None = None,
        attempt_timeout: float = DEFAULT_TIMEOUT,
        port_mapper: PortMapper | None = None,
    ) -> None:
        self.introduction_id: str = introduction["introduction_id"]
        self.peer_id: str = introduction["peer_id"]
        self.controlling = introduction.get("role") == "initiator"
        self.failure: NoPath | None = None  # why no route was possible at all
        # The layer above: told first when the session ends (while the path still has its
        # routes, so its own goodbye can still go out on them), and once it has ended.
        self.on_closing: Callable[[str], None] | None = None
        self.on_end: Callable[[str], None] | None = None
        self._loop = loop
        self._signal = signal
        self._stun_server = stun_server
        self._port_mapper = port_mapper
        self._use_udp = use_udp
        self._started = time.monotonic() if started is None else started
        self._attempt_timeout = attempt_timeout
        self.turn = _turn_server(introduction.get("turn"))
        self._hard_nat: str | None = introduction.get("hard_nat")  # "easy" or "hard": probe
        self._probe: HardNatProbe | None = None
        self._attempts: dict[tuple[str, int], IceAttempt] = {}
        self._next_attempt = {wire.IcePolicy.ALL: 0, wire.IcePolicy.RELAY: 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._direct_up: asyncio.Event | None = None
        self._reported: tuple[str | None, Any] = (None, None)
        self._setup_reported = False
        self.ended = False
        self.path = PeerPath(
            peer_id=self.peer_id,
            introduction_id=self.introduction_id,
            loop=loop,
            on_close=self.close,
        )
        self._relay = relay
        self._resume_timer: asyncio.TimerHandle | None = None
        self._lost_because = ""
        self.relay_route: RelayRoute | None = None
        if introduction.get("relay"):
            self.relay_route = RelayRoute(relay, wire.relay_header(self.introduction_id))
        self.path.on_change(self._path_changed)
        self.path.on_route_failed = self._route_failed

    def __repr__(self) -> str:
        return f"<PathSession {self.introduction_id[:8]} with {self.peer_id} {self.path.kind}>"

    # ---- on the peer loop ----------------------------------------------------------------------

    def start(self) -> bool:
        """The relay route at once, the attempts at better ones in the background. False (and
        `failure`, and the session closed) when no route is possible at all."""
        self._direct_up = asyncio.Event()
        self.path.watch.start()
        if self.relay_route is not None:
            self.path.add_route(self.relay_route)
        elif not self._use_udp:
            self.fail(
                NoPath(
                    "no route is possible: the service does not relay (RENDEZVOUS_RELAY is off) "
                    "and UDP is off here (peer_udp=False)"
                )
            )
            return False
        if self._hard_nat in ("easy", "hard") and self._use_udp and self._stun_server:
            self._probe = HardNatProbe(
                role=self._hard_nat,
                introduction_id=self.introduction_id,
                signal=self._signal,
                stun_server=self._stun_server,
                deliver=lambda data: self.path.deliver(data, wire.PathKind.DIRECT),
            )
            if self._hard_nat == "easy":
                self._spawn(self._run_probe())
        if self.controlling and self._use_udp:
            self._spawn(self._drive_direct())
            if self.turn is not None:
                self._spawn(self._drive_turn())
        return True

    def fail(self, failure: NoPath) -> None:
        """Nothing can be carried on this introduction: say why, and close it."""
        self.failure = failure
        logger.warning("introduction=%s: %s", self.introduction_id, failure)
        self.close(str(failure))

    def relayed(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            self.path.deliver(datagram, wire.PathKind.RELAY)

    def remote_candidates(self, message: dict[str, Any]) -> None:
        """The peer's `ice_candidates` for one attempt: feed ours, or answer a new one."""
        if self.ended:
            return
        policy = wire.IcePolicy(message["policy"])
        if policy == wire.IcePolicy.PROBE:
            self._probe_message(message)
            return
        key = (policy.value, int(message["attempt"]))
        attempt = self._attempts.get(key)
        if attempt is None:
            if self.controlling or not self._use_udp:
                return  # we start our attempts ourselves; or UDP is off here
            if key[1] < self._next_attempt[policy]:
                logger.info("introduction=%s ignored ICE attempt %s", self.introduction_id, key)
                return
            self._next_attempt[policy] = key[1] + 1
            for (other_policy, _), older in list(self._attempts.items()):
                if other_policy == policy.value and older.kind is None:
                    self._spawn_detached(older.close())  # the initiator has given up on it
            attempt = self._new_attempt(policy, key[1])
            self._spawn(self._run(attempt, ANSWERING_TIMEOUT))
        self._spawn(attempt.remote_candidates(message))

    def close(self, reason: str = "closed") -> None:
        """Closed here (the caller): tell the peer through the service, then end."""
        if self.ended:
            return
        self._signal(wire.peer_close(introduction_id=self.introduction_id, reason=reason))
        self.end(reason)

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if self.on_closing is not None:
            self.on_closing(reason)
        for task in list(self._tasks):
            task.cancel()
        for attempt in list(self._attempts.values()):
            self._spawn_detached(attempt.close())
        self._attempts.clear()
        if self._probe is not None:
            if self._probe.route is not None:
                self._probe.route.close()
            self._probe.close()
        self.path.ended(reason)
        if self.on_end is not None:
            self.on_end(reason)

    def _route_failed(self, route: Any) -> None:
        """The path gave a route up (it stopped reaching the peer): close its ICE attempt; the
        initiator's drivers then try again at once, with fresh sockets."""
        if isinstance(route, IceAttempt):
            self._spawn_detached(route.close())
        elif isinstance(route, ProbedRoute):
            route.close()

    def relay_lost(self, reason: str, resumable: bool = True) -> None:
        """The service link of this introduction is gone: this side's WebSocket was renewed, or
        the peer's. UDP routes carry on; the introduction may be resumed (`resume`) within
        RESUME_WITHIN seconds, and ends if it is not while no route carries it (at once where
        the service cannot resume introductions)."""
        if self.relay_route is not None:
            self.path.remove_route(self.relay_route)
            self.relay_route = None
        if not resumable:
            if not self.path.routes():
                self.end(reason)
            return
        if self._resume_timer is None and not self.ended:
            self._lost_because = reason
            self._resume_timer = self._loop.loop.call_later(RESUME_WITHIN, self._not_resumed)

    def resume(self, introduction: dict[str, Any]) -> None:
        """Carry on under a new introduction to the same peer: its relay link, its signalling,
        its TURN credentials; the routes that are up stay up."""
        old = self.introduction_id
        self.introduction_id = self.path.introduction_id = introduction["introduction_id"]
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        self.turn = _turn_server(introduction.get("turn")) or self.turn
        if self.relay_route is not None:
            self.path.remove_route(self.relay_route)
            self.relay_route = None
        if introduction.get("relay"):
            self.relay_route = RelayRoute(self._relay, wire.relay_header(self.introduction_id))
            self.path.add_route(self.relay_route)
        self._reported = (None, None)  # the new introduction's record learns the path afresh
        self._path_changed(self.path, None, self.path.kind)
        logger.info("introduction=%s resumed as %s", old, self.introduction_id)

    def _not_resumed(self) -> None:
        self._resume_timer = None
        if not self.path.routes():
            self.end(f"{self._lost_because}; not resumed within {RESUME_WITHIN:g}s")

    # ---- hard-NAT probing (paths/probing.py) ------------------------------------------------

    def _probe_message(self, message: dict[str, Any]) -> None:
        """The peer's half of the probing the service asked for; ignored when it did not."""
        probe = self._probe
        if probe is not None and probe.remote(message) and probe.role == "hard":
            self._spawn(self._run_probe())  # the easy side's endpoint: the hard side's turn

    async def _run_probe(self) -> None:
        assert self._probe is not None
        route = await self._probe.run()
        if route is None or self.ended:
            return
        self.path.add_route(route)
        self._direct_up_changed()

    # ---- attempts --------------------------------------------------------------------------------

    def _new_attempt(self, policy: wire.IcePolicy, number: int) -> IceAttempt:
        attempt = IceAttempt(
            introduction_id=self.introduction_id,
            attempt=number,
            policy=policy,
            controlling=self.controlling,
            signal=self._signal,
            datagram=self._ice_datagram,
            stun_server=self._stun_server,
            turn=self.turn,
            port_mapper=self._port_mapper,
        )
        self._attempts[(policy.value, number)] = attempt
        return attempt

    def _ice_datagram(self, attempt: IceAttempt, data: bytes) -> None:
        if attempt.kind is None and not self.ended and attempt.settle():
            # The peer already sends on a pair nominated here, before our check list is done:
            # a route now, so answers (a QUIC handshake's, say) go back on it at once.
            self.path.add_route(attempt)
        self.path.deliver(data, attempt.kind or wire.PathKind.DIRECT)

    async def _run(self, attempt: IceAttempt, timeout: float | None = None) -> bool:
        """Run an attempt; while it is up it is a route of the path."""
        key = (attempt.policy.value, attempt.attempt)
        try:
            if not await attempt.run(timeout or self._attempt_timeout):
                return False
            previous = self.path.routes().get(str(attempt.kind))
            self.path.add_route(attempt)
            if isinstance(previous, IceAttempt) and previous is not attempt:
                await previous.close()
            if attempt.kind in (wire.PathKind.LAN, wire.PathKind.DIRECT):
                self._direct_up_changed()
            logger.info(
                "introduction=%s %s path to %s up after %.0f ms (%s -> %s)",
                self.introduction_id,
                attempt.kind,
                self.peer_id,
                1000 * (attempt.connected_after or 0),
                attempt.local,
                attempt.remote,
            )
            await attempt.closed.wait()
            return True
        finally:
            self.path.remove_route(attempt)
            if self._attempts.get(key) is attempt:
                del self._attempts[key]
            self._direct_up_changed()

    def _direct_up_changed(self) -> None:
        if self._direct_up is None:
            return
        if self._has_direct():
            self._direct_up.set()
        else:
            self._direct_up.clear()

    def _has_direct(self) -> bool:
        return any(k in self.path.routes() for k in (wire.PathKind.LAN, wire.PathKind.DIRECT))

    async def _drive_direct(self) -> None:
        failures = 0
        while not self.ended:
            attempt = self._new_attempt(wire.IcePolicy.ALL, self._next_number(wire.IcePolicy.ALL))
            if await self._run(attempt):
                failures = 0  # it was up, and has gone: try again at once
                continue
            delay = DIRECT_RETRY_DELAYS[min(failures, len(DIRECT_RETRY_DELAYS) - 1)]
            failures += 1
            await asyncio.sleep(delay)

    async def _drive_turn(self) -> None:
        assert self._direct_up is not None
        await asyncio.sleep(TURN_HEAD_START)
        failures = 0
        while not self.ended:
            while self._has_direct():
                await self._wait_direct_down()
            if self.turn is not None and self.turn.expires_at <= time.time():
                logger.warning(
                    "introduction=%s TURN credentials expired at %s; not trying TURN",
                    self.introduction_id,
                    self.turn.expires_at,
                )
                return
            attempt = self._new_attempt(
                wire.IcePolicy.RELAY, self._next_number(wire.IcePolicy.RELAY)
            )
            runner = asyncio.get_running_loop().create_task(self._run(attempt))
            self._tasks.add(runner)
            runner.add_done_callback(self._tasks.discard)
            # Up, down or failed; or a direct route came up meanwhile: TURN is not needed then.
            direct = asyncio.get_running_loop().create_task(self._direct_up.wait())
            await asyncio.wait({runner, direct}, return_when=asyncio.FIRST_COMPLETED)
            direct.cancel()
            if not runner.done():
                await attempt.close()
                await asyncio.gather(runner, return_exceptions=True)
                continue
            if runner.exception() is None and runner.result():
                failures = 0
                continue
            delay = TURN_RETRY_DELAYS[min(failures, len(TURN_RETRY_DELAYS) - 1)]
            failures += 1
            await asyncio.sleep(delay)

    async def _wait_direct_down(self) -> None:
        while self._has_direct() and not self.ended:
            await asyncio.sleep(1.0)

    def _next_number(self, policy: wire.IcePolicy) -> int:
        number = self._next_attempt[policy]
        self._next_attempt[policy] = number + 1
        return number

    # ---- reporting ---------------------------------------------------------------------------

    def _path_changed(self, path: PeerPath, old: str | None, new: str | None) -> None:
        if new is None or not self.controlling:
            return  # the initiator speaks for the pair
        report = (new, path.remote_address)
        if report == self._reported:
            return
        setup_ms = None
        if not self._setup_reported:  # the time to the first path, once (not for a resumed one)
            setup_ms, self._setup_reported = round(1000 * (time.monotonic() - self._started)), True
        self._reported = report
        self._signal(
            wire.path_report(
                introduction_id=self.introduction_id,
                kind=new,
                remote=path.remote_address,
                setup_ms=setup_ms,
            )
        )

    # ---- tasks ---------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _spawn_detached(self, coroutine: Any) -> None:
        asyncio.get_running_loop().create_task(coroutine)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "introduction=%s: %r failed",
                self.introduction_id,
                task.exception(),
                exc_info=task.exception(),
            )


def _turn_server(offer: Any) -> TurnServer | None:
    if not isinstance(offer, dict):
        return None
    servers = offer.get("servers") or []
    if not servers:
        return None
    host, _, port = str(servers[0]).rpartition(":")
    try:
        return TurnServer(
            host=host.strip("[]"),
            port=int(port),
            username=str(offer["username"]),
            password=str(offer["password"]),
            expires_at=int(offer.get("expires_at") or 0),
        )
    except (KeyError, ValueError):
        logger.warning("ignoring unusable TURN credentials from the service")
        return None
