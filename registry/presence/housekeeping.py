"""What keeps an instance's rows true while it runs, and how it ends.

Housekeeping runs every `HOUSEKEEPING_INTERVAL` seconds in a thread (so a busy event loop never
delays it): it heartbeats the instance row, sweeps instances that went silent, refreshes
`last_seen` of the workers held here in one statement, reconciles rows with sockets, and purges
what has outlived its retention. At the end, the sockets are drained with 4002 (going away) and
the instance row is closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.conf import settings
from django.db import close_old_connections

from registry.core import protocol
from registry.peering import records
from registry.peering.events import PeerHub
from registry.presence import instances
from registry.presence.sockets import HeldSockets
from registry.security import enrolment

# The logger's name is the one operators' log pipelines know (docs/operations.md).
log = logging.getLogger("registry.runtime")


@dataclass(frozen=True, slots=True)
class HousekeepingReport:
    declared_dead: bool
    swept: int
    touched: int
    orphans_closed: int
    sockets_closed: int


def housekeeping_round(
    *, instance_id: str, sockets: HeldSockets, peers: PeerHub, now: datetime
) -> HousekeepingReport | None:
    """One round for the instance `instance_id`; None if another instance has declared it dead
    (its heartbeat found its row stopped): the caller starts over as a new boot."""
    config = settings.RENDEZVOUS
    interval = timedelta(seconds=config["HOUSEKEEPING_INTERVAL"])
    if not instances.heartbeat_instance(instance_id=instance_id, now=now):
        return None
    departed: list[tuple[str, str]] = []
    swept = instances.sweep_silent_instances(
        dead_after=timedelta(seconds=config["INSTANCE_DEAD_AFTER"]),
        now=now,
        exclude=instance_id,
        departed=departed,
    )
    _announce_departures(sockets, peers, departed)
    swept += instances.close_connections_of_stopped_instances(now=now)
    touched = instances.touch_held_workers(
        instance_id=instance_id, now=now, resolution=max(interval, timedelta(seconds=10))
    )
    grace = 2 * interval
    held = sockets.attached_since()  # before reading the rows: see reconcile_instance
    result = instances.reconcile_instance(
        instance_id=instance_id,
        local_ids={pk for pk, _ in held},
        settled_ids={pk for pk, attached_at in held if attached_at < now - grace},
        grace=grace,
        now=now,
    )
    closed = sum(
        sockets.close_from_thread(pk, code) for pk, code in result.closed_elsewhere.items()
    )
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


def _announce_departures(
    sockets: HeldSockets, peers: PeerHub, departed: list[tuple[str, str]]
) -> None:
    """`peer_left` for the workers of an instance that died (it cannot say so itself).

    Sent from this instance's event loop; an instance that never held a socket has none, and
    then nobody hears it from here (another instance's sweep may).
    """
    loop = sockets.a_loop()
    if not departed or loop is None:
        return

    def announce() -> None:
        for worker_id, tags in departed:
            peers.left(worker_id, tags)

    loop.call_soon_threadsafe(announce)


class Housekeeper:
    """The thread that runs `one_round` every HOUSEKEEPING_INTERVAL seconds until stopped."""

    def __init__(self, one_round: Callable[[], object], *, describe: Callable[[], str]) -> None:
        self._round = one_round
        self._describe = describe  # `instance=<id>`, asked at each failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Start the thread; False if it runs already."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(
                target=self._loop, name="rendezvous-housekeeping", daemon=True
            )
            self._thread.start()
            return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A daemon thread inside the database driver at interpreter exit can crash it.
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        interval = settings.RENDEZVOUS["HOUSEKEEPING_INTERVAL"]
        while True:
            try:
                close_old_connections()
                self._round()
            except Exception:  # the database may be away; the next round tries again
                log.exception("%s housekeeping round failed", self._describe())
            if self._stop.wait(interval):
                return


# ---- the end ----------------------------------------------------------------------------------


async def drain(sockets: HeldSockets, timeout: float) -> int:
    """Close every socket held here with 4002 (going away) and wait up to `timeout` for their
    consumers to record the close. Returns how many were still open at the end."""
    for held in sockets.all():
        await held.close(protocol.CloseCode.GOING_AWAY)
    deadline = time.monotonic() + timeout
    while len(sockets) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return len(sockets)


def record_shutdown(instance_id: str) -> None:
    """At process exit: the sessions held here end with the process (code 4002)."""
    try:
        close_old_connections()
        closed = instances.stop_instance(
            instance_id=instance_id,
            reason="server shut down",
            code=protocol.CloseCode.GOING_AWAY,
        )
        log.info("instance=%s stopped; %d sessions closed", instance_id, closed)
    except Exception:
        log.exception("instance=%s could not record its shutdown", instance_id)


class Draining(Protocol):
    """What a graceful shutdown needs of the instance runtime."""

    instance_id: str

    def held_count(self) -> int: ...

    async def drain(self, timeout: float) -> int: ...

    def spawn(self, coroutine: Coroutine[Any, Any, None], *, what: str) -> None: ...


def install_graceful_shutdown(runtime: Draining, *, drain_timeout: float = 5.0) -> bool:
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
    if getattr(reactor, "_asyncioEventloop", None) is None:
        return False  # not the asyncio reactor daphne runs on
    stopping = False

    def begin_stop() -> None:
        nonlocal stopping
        if stopping:
            if reactor.running:
                reactor.stop()
            return
        stopping = True
        log.info("instance=%s draining %d sockets", runtime.instance_id, runtime.held_count())
        # On the reactor's thread, which runs the asyncio loop: spawn finds it running.
        runtime.spawn(_drain_then_stop(runtime, drain_timeout, reactor), what="draining")

    def on_signal(signum: int, frame: object) -> None:
        reactor.callFromThread(begin_stop)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    reactor.callWhenRunning(install)
    return True


async def _drain_then_stop(runtime: Draining, timeout: float, reactor: Any) -> None:
    try:
        await runtime.drain(timeout)
    finally:
        if reactor.running:
            reactor.stop()
