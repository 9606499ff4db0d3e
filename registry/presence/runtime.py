"""This process as a server instance: its id, the sockets it holds, and its housekeeping thread.

Housekeeping runs every `HOUSEKEEPING_INTERVAL` seconds in a thread (so a busy event loop never
delays it): it heartbeats the instance row, sweeps instances that went silent, refreshes
`last_seen` of the workers held here in one statement, and reconciles rows with sockets.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from registry.core import protocol
from registry.core.peer_policy import Policy
from registry.ops import metrics
from registry.peering import records, rules
from registry.peering.events import EVENTS as PEER_EVENTS
from registry.peering.events import PeerHub
from registry.peering.relay import RelayOutbox
from registry.presence import instances, reports, sessions
from registry.presence.admission import Admission
from registry.presence.batching import Coalescer
from registry.security import enrolment, identities

log = logging.getLogger("registry.runtime")

Closer = Callable[[int], Coroutine[Any, Any, None]]
Deliverer = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
Relayer = Callable[[bytes], Coroutine[Any, Any, None]]
PolicyListener = Callable[[Policy], Coroutine[Any, Any, int]]

# Commands to a live connection, sent through the channel layer to the instance that holds it.
SUPERSEDE = "worker.superseded"
DISCONNECT = "worker.disconnect"
DISABLE = "worker.disabled"
# Hand a message to a live connection's consumer (introductions between workers).
DELIVER = "worker.deliver"
# A relay frame for a live connection's worker (peering/relay.py).
RELAY = "worker.relay"
COMMAND_CLOSE_CODES = {
    SUPERSEDE: protocol.CloseCode.SUPERSEDED,
    DISCONNECT: protocol.CloseCode.DISCONNECTED_BY_OPERATOR,
    DISABLE: protocol.CloseCode.WORKER_DISABLED,
}


@dataclass(slots=True)
class _LocalSocket:
    close: Closer
    loop: asyncio.AbstractEventLoop
    attached_at: datetime
    address: str | None
    deliver: Deliverer | None = None
    relay: Relayer | None = None
    policy_changed: PolicyListener | None = None


@dataclass(frozen=True, slots=True)
class HousekeepingReport:
    declared_dead: bool
    swept: int
    touched: int
    orphans_closed: int
    sockets_closed: int


class InstanceRuntime:
    def __init__(self, *, name: str) -> None:
        self.name = name
        self.instance_id = uuid.uuid4().hex
        # One channel per process, not per connection: a consumer subscribed to a channel of its
        # own costs a queue, a task and a layer receive for each of thousands of sockets.
        self.channel_name = f"rendezvous.instance.{uuid.uuid4().hex}"
        self._listener: asyncio.Task[None] | None = None
        self._admission: Admission | None = None  # built on first use, from settings
        self._background: set[asyncio.Task[None]] = set()
        self._registered = False
        self._lock = threading.Lock()
        self._sockets: dict[int, _LocalSocket] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peers = PeerHub(self.channel_name, self.spawn)
        # The peer rules kept current, and applied to the links of the connections held here.
        self.rules_watch = rules.RulesWatch(
            channel_name=self.channel_name,
            instance_id=lambda: self.instance_id,
            apply=self._apply_policy,
        )
        # Relay frames for consumers on other instances, in batches (registry/relay.py).
        self.relay_outbox = RelayOutbox(self._send_relay_batch, self.spawn)
        # Registry writes of every connection on this process, coalesced into batches.
        self.registrations: Coalescer[sessions.RegistrationRequest, sessions.Registration] = (
            Coalescer(self._write_registrations, name="registrations")
        )
        # Secured mode: the credential checks of many handshakes, in one query per batch.
        self.authentications: Coalescer[enrolment.Handshake, enrolment.Outcome] = Coalescer(
            enrolment.authenticate_many, name="authentications"
        )
        # Workers' certificates, recorded when a connection presents a new one.
        self.identities: Coalescer[identities.Announcement, bool] = Coalescer(
            lambda batch: identities.record(
                batch, secured=self.config["SECURITY_MODE"] == enrolment.SECURED
            ),
            name="identities",
        )
        self.closes: Coalescer[sessions.CloseRequest, bool] = Coalescer(
            sessions.close_connections, name="closes", max_batch=2000
        )
        # What connections report about their workers (address, agent info, NAT findings).
        self.reports: Coalescer[reports.Report, bool] = Coalescer(
            reports.record_reports, name="reports"
        )

    def _write_registrations(
        self, requests: list[sessions.RegistrationRequest]
    ) -> list[sessions.Registration]:
        instance_id = self.ensure_registered()
        return sessions.register_connections(requests, instance_id=instance_id)

    @property
    def config(self) -> dict[str, Any]:
        return settings.RENDEZVOUS

    def ensure_registered(self) -> str:
        """Record this boot in the registry once (closing what an earlier boot left open)."""
        with self._lock:
            if not self._registered:
                closed = instances.start_instance(
                    instance_id=self.instance_id,
                    name=self.name,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    is_dead=self._is_dead,
                )
                self._registered = True
                log.info(
                    "instance=%s name=%s started; %d sessions of an earlier boot closed",
                    self.instance_id,
                    self.name,
                    closed,
                )
            return self.instance_id

    def _is_dead(self, other: Any) -> bool:
        """Whether an earlier boot under our name is certainly gone: its process no longer
        exists on this host, or it has been silent for longer than the staleness bound."""
        if other.hostname == socket.gethostname() and not _process_exists(other.pid):
            return True
        silent_for = (timezone.now() - other.heartbeat_at).total_seconds()
        return silent_for > self.config["INSTANCE_DEAD_AFTER"]

    # ---- sockets held here (called on the event loop) ------------------------------------------

    @property
    def admission(self) -> Admission:
        if self._admission is None:  # built on first use, from settings
            config = self.config
            self._admission = Admission(
                max_total=config["MAX_CONNECTIONS"],
                max_per_address=config["MAX_CONNECTIONS_PER_ADDRESS"],
                handshake_rate=config["HANDSHAKE_RATE_PER_ADDRESS"],
                auth_failures_per_minute=config["AUTH_FAILURES_PER_MINUTE"],
            )
        return self._admission

    def admission_refusal(self, address: str | None) -> str | None:
        """Why a new connection from `address` is refused (a connection limit), or None."""
        return self.admission.refusal(address)

    def attach(
        self,
        connection_id: int,
        close: Closer,
        address: str | None = None,
        deliver: Deliverer | None = None,
        relay: Relayer | None = None,
        policy_changed: PolicyListener | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._sockets[connection_id] = _LocalSocket(
            close=close,
            loop=loop,
            attached_at=timezone.now(),
            address=address,
            deliver=deliver,
            relay=relay,
            policy_changed=policy_changed,
        )
        if self._admission is not None:
            self._admission.opened(address)
        metrics.socket_attached()
        if self._listener is None or self._listener.done() or self._listener.get_loop() is not loop:
            self._listener = loop.create_task(self._listen())

    async def _listen(self) -> None:
        """Carry out commands sent to this instance's channel on the sockets it holds."""
        layer = get_channel_layer()
        self.spawn(self.rules_watch.run(), what="peer policy watch")
        while True:
            try:
                message = await layer.receive(self.channel_name)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep listening: a lost command is redone by housekeeping
                log.exception("instance=%s command channel failed", self.instance_id)
                await asyncio.sleep(1)
                continue
            kind = message.get("type", "")
            if kind == rules.POLICY_CHANGED:
                rules.mark_stale()  # before the next message, which may ask for a decision
                self.spawn(self.reload_policy(), what="peer policy reload")
                continue
            if kind == PEER_EVENTS:
                # In the background: supersedes and bans must not queue behind a fan-out.
                self.spawn(self.peers.dispatch(message.get("events") or []), what="peer events")
                continue
            code = COMMAND_CLOSE_CODES.get(kind)
            local = self._sockets.get(message.get("connection_id"))  # type: ignore[arg-type]
            if local is None:
                await self._undeliverable(message)
                continue
            try:
                if code is not None:
                    await local.close(code)
                elif kind == RELAY and local.relay is not None:
                    # A batch; a single `frame` from an instance of an earlier version.
                    for frame in message.get("frames") or [message["frame"]]:
                        await local.relay(frame)
                elif kind == DELIVER and local.deliver is not None:
                    await local.deliver(message)
            except Exception:  # one socket's failure must not end the listener
                log.exception("instance=%s command %s failed", self.instance_id, kind)

    # ---- the peer policy -------------------------------------------------------------------

    async def reload_policy(self, *, only_if_changed: bool = False) -> Policy:
        """Read the peer rules again and end the links held here that they no longer allow."""
        return await self.rules_watch.reload(only_if_changed=only_if_changed)

    async def _apply_policy(self, policy: Policy) -> int:
        ended = 0
        for local in list(self._sockets.values()):
            if local.policy_changed is None:
                continue
            try:
                ended += await local.policy_changed(policy)
            except Exception:  # one connection's failure must not spare the others
                log.exception("instance=%s policy not applied to a connection", self.instance_id)
        return ended

    async def _undeliverable(self, message: dict[str, Any]) -> None:
        """A DELIVER for a connection no longer held here: send its `bounce`, if it has one, so
        the sender learns (an introduction for a worker that just left)."""
        bounce = message.get("bounce") if message.get("type") == DELIVER else None
        if not isinstance(bounce, dict):
            return
        try:
            await self.send_command(
                bounce["channel"], DELIVER, bounce["connection_id"], **bounce["message"]
            )
        except Exception:
            log.warning("instance=%s bounce not sent", self.instance_id, exc_info=True)

    async def relay_to(self, channel_name: str, connection_id: int, frame: bytes) -> bool:
        """Hand a relay frame to the consumer of `connection_id`: a direct call when this
        instance holds it, the channel layer otherwise. False when it is certainly gone."""
        local = self._sockets.get(connection_id)
        if local is not None and local.relay is not None:
            await local.relay(frame)
            return True
        if channel_name == self.channel_name:
            return False  # ours, and no longer held
        await self.relay_outbox.put(channel_name, connection_id, frame)
        return True

    async def _send_relay_batch(
        self, channel_name: str, connection_id: int, frames: list[bytes]
    ) -> None:
        await self.send_command(channel_name, RELAY, connection_id, frames=frames)

    def spawn(self, coroutine: Coroutine[Any, Any, None], *, what: str) -> None:
        """Run `coroutine` in the background on this loop; kept referenced, failures logged."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(lambda done: self._background_done(done, what))

    def _background_done(self, task: asyncio.Task[None], what: str) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("instance=%s %s failed: %s", self.instance_id, what, task.exception())

    @staticmethod
    async def send_command(
        channel_name: str, command: str, connection_id: int, **payload: Any
    ) -> None:
        """Ask the instance listening on `channel_name` to act on one of its connections."""
        await get_channel_layer().send(
            channel_name, {**payload, "type": command, "connection_id": connection_id}
        )

    def detach(self, connection_id: int) -> None:
        local = self._sockets.pop(connection_id, None)
        self.peers.unsubscribe(connection_id)
        if local is not None:
            if self._admission is not None:
                self._admission.closed(local.address)
            metrics.socket_detached()

    def held_count(self) -> int:
        return len(self._sockets)

    def _close_socket(self, connection_id: int, code: int) -> bool:
        local = self._sockets.get(connection_id)
        if local is None or local.loop.is_closed():
            return False
        if code not in protocol.CloseCode._value2member_map_:
            code = protocol.CloseCode.INSTANCE_RESET  # e.g. 1006, which no one may send
        future = asyncio.run_coroutine_threadsafe(local.close(code), local.loop)
        future.add_done_callback(_log_failure)
        return True

    # ---- housekeeping ---------------------------------------------------------------------------

    def housekeeping_round(self, now: datetime | None = None) -> HousekeepingReport:
        now = now or timezone.now()
        config = self.config
        interval = timedelta(seconds=config["HOUSEKEEPING_INTERVAL"])
        self.ensure_registered()
        if not instances.heartbeat_instance(instance_id=self.instance_id, now=now):
            return self._recover_from_being_declared_dead()
        departed: list[tuple[str, str]] = []
        swept = instances.sweep_silent_instances(
            dead_after=timedelta(seconds=config["INSTANCE_DEAD_AFTER"]),
            now=now,
            exclude=self.instance_id,
            departed=departed,
        )
        self._announce_departures(departed)
        swept += instances.close_connections_of_stopped_instances(now=now)
        touched = instances.touch_held_workers(
            instance_id=self.instance_id, now=now, resolution=max(interval, timedelta(seconds=10))
        )
        grace = 2 * interval
        held = list(self._sockets.items())  # before reading the rows: see reconcile_instance
        result = instances.reconcile_instance(
            instance_id=self.instance_id,
            local_ids={pk for pk, _ in held},
            settled_ids={pk for pk, s in held if s.attached_at < now - grace},
            grace=grace,
            now=now,
        )
        closed = sum(self._close_socket(pk, code) for pk, code in result.closed_elsewhere.items())
        records.close_orphaned_peer_connections(now=now)
        records.purge_peer_connections(
            older_than=timedelta(days=config["PEER_CONNECTION_RETENTION_DAYS"]), now=now
        )
        enrolment.purge_ephemeral_workers(
            offline_for=timedelta(seconds=config["EPHEMERAL_AFTER"]), now=now
        )
        return HousekeepingReport(
            declared_dead=False,
            swept=swept,
            touched=touched,
            orphans_closed=result.orphans_closed,
            sockets_closed=closed,
        )

    def _announce_departures(self, departed: list[tuple[str, str]]) -> None:
        """`peer_left` for the workers of an instance that died (it cannot say so itself).

        Sent from this instance's event loop; an instance that never held a socket has none, and
        then nobody hears it from here (another instance's sweep may).
        """
        loop = next((s.loop for s in list(self._sockets.values()) if not s.loop.is_closed()), None)
        if not departed or loop is None:
            return

        def announce() -> None:
            for worker_id, tags in departed:
                self.peers.left(worker_id, tags)

        loop.call_soon_threadsafe(announce)

    def _recover_from_being_declared_dead(self) -> HousekeepingReport:
        """Another instance swept us (we could not heartbeat in time): start over as a new boot.

        Our rows are closed already, so our sockets are closed too; their workers reconnect and
        register afresh, here or elsewhere.
        """
        log.error(
            "instance=%s was declared dead by another instance; re-registering", self.instance_id
        )
        held = list(self._sockets)
        with self._lock:
            self.instance_id = uuid.uuid4().hex
            self._registered = False
        self.ensure_registered()
        closed = sum(self._close_socket(pk, protocol.CloseCode.INSTANCE_RESET) for pk in held)
        return HousekeepingReport(
            declared_dead=True, swept=0, touched=0, orphans_closed=0, sockets_closed=closed
        )

    def start_housekeeping(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._housekeeping_loop, name="rendezvous-housekeeping", daemon=True
            )
            self._thread.start()
        atexit.register(self.shutdown)

    def _housekeeping_loop(self) -> None:
        interval = self.config["HOUSEKEEPING_INTERVAL"]
        while True:
            try:
                close_old_connections()
                self.housekeeping_round()
            except Exception:  # the database may be away; the next round tries again
                log.exception("instance=%s housekeeping round failed", self.instance_id)
            if self._stop.wait(interval):
                return

    async def drain(self, timeout: float) -> int:
        """Close every socket held here with 4002 (going away) and wait up to `timeout` for
        their consumers to record the close. Returns how many were still open at the end."""
        for local in list(self._sockets.values()):
            await local.close(protocol.CloseCode.GOING_AWAY)
        deadline = time.monotonic() + timeout
        while self._sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._sockets)

    def shutdown(self) -> None:
        """At process exit: the sessions held here end with the process (code 4002)."""
        self._stop.set()
        if self._thread is not None:
            # A daemon thread inside the database driver at interpreter exit can crash it.
            self._thread.join(timeout=10)
        if not self._registered:
            return
        try:
            close_old_connections()
            closed = instances.stop_instance(
                instance_id=self.instance_id,
                reason="server shut down",
                code=protocol.CloseCode.GOING_AWAY,
            )
            log.info("instance=%s stopped; %d sessions closed", self.instance_id, closed)
        except Exception:
            log.exception("instance=%s could not record its shutdown", self.instance_id)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("closing a socket from housekeeping failed: %s", future.exception())


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_runtime: InstanceRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> InstanceRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = InstanceRuntime(name=settings.RENDEZVOUS["INSTANCE_NAME"])
        return _runtime


def reset_runtime() -> InstanceRuntime:
    """A fresh runtime (a new boot id) for tests that flush the database between them; the
    flush took the peer rules with it, unannounced."""
    global _runtime
    rules.mark_stale()
    with _runtime_lock:
        _runtime = InstanceRuntime(name=settings.RENDEZVOUS["INSTANCE_NAME"])
        return _runtime


def install_graceful_shutdown(runtime: InstanceRuntime, *, drain_timeout: float = 5.0) -> bool:
    """On SIGTERM/SIGINT, close held sockets with 4002 (going away) and let their consumers
    finish before daphne stops the reactor. A second signal stops at once.

    daphne's own handler cancels consumers mid-await, so workers see a dropped TCP connection
    (1006) instead of a close frame, and the process can crash while collecting the cancelled
    coroutines at exit.
    """
    try:
        from twisted.internet import reactor
    except ImportError:
        return False
    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is None:
        return False
    stopping = False

    def begin_stop() -> None:
        nonlocal stopping
        if stopping:
            if reactor.running:
                reactor.stop()
            return
        stopping = True
        log.info("instance=%s draining %d sockets", runtime.instance_id, runtime.held_count())
        task = loop.create_task(runtime.drain(drain_timeout))
        task.add_done_callback(lambda _: reactor.running and reactor.stop())
        runtime._background.add(task)

    def on_signal(signum: int, frame: object) -> None:
        reactor.callFromThread(begin_stop)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    reactor.callWhenRunning(install)
    return True
