"""This process as a server instance: its id, its command channel and the sockets it holds.

Every other instance reaches a connection held here through this instance's one channel
(`send_command`): closes, messages between consumers (introductions), relay frames, peer events
and announcements that the peer rules changed. Housekeeping and the end of the process are
housekeeping.py; the sockets and their limits, sockets.py.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import uuid
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from registry.core import protocol
from registry.core.peer_policy import Policy
from registry.peering import rules
from registry.peering.events import EVENTS as PEER_EVENTS
from registry.peering.events import PeerHub
from registry.peering.relay import RelayOutbox
from registry.presence import housekeeping, instances, reports, sessions
from registry.presence.admission import Admission
from registry.presence.batching import Coalescer
from registry.presence.housekeeping import HousekeepingReport
from registry.presence.sockets import (
    Closer,
    Deliverer,
    HeldSocket,
    HeldSockets,
    PolicyListener,
    Relayer,
)
from registry.security import enrolment, identities, modes

log = logging.getLogger("registry.runtime")

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


class InstanceRuntime:
    def __init__(self, *, name: str) -> None:
        self.name = name
        self.instance_id = uuid.uuid4().hex
        # One channel per process, not per connection: a consumer subscribed to a channel of its
        # own costs a queue, a task and a layer receive for each of thousands of sockets.
        self.channel_name = f"rendezvous.instance.{uuid.uuid4().hex}"
        self._listener: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._registered = False
        self._lock = threading.Lock()
        self.sockets = HeldSockets()
        self._housekeeper = housekeeping.Housekeeper(
            self.housekeeping_round, describe=lambda: f"instance={self.instance_id}"
        )
        self.peers = PeerHub(self.channel_name, self.spawn)
        # The peer rules kept current, and applied to the links of the connections held here.
        self.rules_watch = rules.RulesWatch(
            channel_name=self.channel_name,
            instance_id=lambda: self.instance_id,
            apply=self._apply_policy,
        )
        # Relay frames for consumers on other instances, in batches (peering/relay.py).
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
                batch, secured=self.config["SECURITY_MODE"] == modes.SECURED
            ),
            name="identities",
        )
        self.closes: Coalescer[sessions.CloseRequest, bool] = Coalescer(
            sessions.close_connections, name="closes", max_batch=2000
        )
        # What connections report about their workers (address, agent info, NAT findings).
        self.reports: Coalescer[reports.Report, bool] = Coalescer(
            reports.record_reports, name="reports", yields_to=self.registrations
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
        return self.sockets.admission

    def admission_refusal(self, address: str | None) -> str | None:
        """Why a new connection from `address` is refused (a connection limit), or None."""
        return self.sockets.admission.refusal(address)

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
        self.sockets.attach(
            connection_id,
            HeldSocket(
                close=close,
                loop=loop,
                attached_at=timezone.now(),
                address=address,
                deliver=deliver,
                relay=relay,
                policy_changed=policy_changed,
            ),
        )
        if self._listener is None or self._listener.done() or self._listener.get_loop() is not loop:
            self._listener = loop.create_task(self._listen())

    def detach(self, connection_id: int) -> None:
        self.sockets.detach(connection_id)
        self.peers.unsubscribe(connection_id)

    def held_count(self) -> int:
        return len(self.sockets)

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
            held = self.sockets.get(message.get("connection_id"))
            if held is None:
                await self._undeliverable(message)
                continue
            try:
                if code is not None:
                    await held.close(code)
                elif kind == RELAY and held.relay is not None:
                    # A batch of frames; an instance of an older version sends a single `frame`.
                    for frame in message.get("frames") or [message["frame"]]:
                        await held.relay(frame)
                elif kind == DELIVER and held.deliver is not None:
                    await held.deliver(message)
            except Exception:  # one socket's failure must not end the listener
                log.exception("instance=%s command %s failed", self.instance_id, kind)

    # ---- the peer policy -------------------------------------------------------------------

    async def reload_policy(self, *, only_if_changed: bool = False) -> Policy:
        """Read the peer rules again and end the links held here that they no longer allow."""
        return await self.rules_watch.reload(only_if_changed=only_if_changed)

    async def _apply_policy(self, policy: Policy) -> int:
        ended = 0
        for held in self.sockets.all():
            if held.policy_changed is None:
                continue
            try:
                ended += await held.policy_changed(policy)
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
        held = self.sockets.get(connection_id)
        if held is not None and held.relay is not None:
            await held.relay(frame)
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

    # ---- housekeeping and the end (housekeeping.py) ---------------------------------------------

    def housekeeping_round(self, now: datetime | None = None) -> HousekeepingReport:
        self.ensure_registered()
        report = housekeeping.housekeeping_round(
            instance_id=self.instance_id,
            sockets=self.sockets,
            peers=self.peers,
            now=now or timezone.now(),
        )
        return report if report is not None else self._recover_from_being_declared_dead()

    def _recover_from_being_declared_dead(self) -> HousekeepingReport:
        """Another instance swept us (we could not heartbeat in time): start over as a new boot.

        Our rows are closed already, so our sockets are closed too; their workers reconnect and
        register afresh, here or elsewhere.
        """
        log.error(
            "instance=%s was declared dead by another instance; re-registering", self.instance_id
        )
        held = self.sockets.ids()
        with self._lock:
            self.instance_id = uuid.uuid4().hex
            self._registered = False
        self.ensure_registered()
        closed = sum(
            self.sockets.close_from_thread(pk, protocol.CloseCode.INSTANCE_RESET) for pk in held
        )
        return HousekeepingReport(
            declared_dead=True, swept=0, touched=0, orphans_closed=0, sockets_closed=closed
        )

    def start_housekeeping(self) -> None:
        if self._housekeeper.start():
            atexit.register(self.shutdown)

    async def drain(self, timeout: float) -> int:
        """Close every socket held here with 4002 (going away) and wait up to `timeout` for
        their consumers to record the close. Returns how many were still open at the end."""
        return await housekeeping.drain(self.sockets, timeout)

    def shutdown(self) -> None:
        """At process exit: the sessions held here end with the process (code 4002)."""
        self._housekeeper.stop()
        if self._registered:
            housekeeping.record_shutdown(self.instance_id)


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
