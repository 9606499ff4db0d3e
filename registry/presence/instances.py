"""Server instances as the registry records them: a boot started (closing what a crashed
earlier boot left open), its heartbeat, the staleness sweep of instances that went silent, the
workers an instance holds kept fresh, and its rows reconciled with its sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from registry.core import protocol
from registry.models import Connection, ServerInstance, Worker
from registry.presence import bulk
from registry.presence.sessions import (
    CODE_CONNECTION_LOST,
    CloseRequest,
    close_connections,
    end_connections,
)

# The logger's name is the one operators' log pipelines know (docs/operations.md).
log = logging.getLogger("registry.services")


def start_instance(
    *,
    instance_id: str,
    name: str,
    hostname: str,
    pid: int,
    is_dead: Callable[[ServerInstance], bool],
    now: datetime | None = None,
) -> int:
    """Record a new boot. Earlier boots under the same name that `is_dead` confirms (a crash
    before this restart) have their sessions closed now, not after the staleness bound.

    A same-name boot that may be alive (another process given the same name by mistake) is
    left to the staleness rule, so two live instances never close each other's sessions.
    Returns how many connections were closed.
    """
    now = now or timezone.now()
    ServerInstance.objects.create(
        id=instance_id, name=name, hostname=hostname, pid=pid, started_at=now, heartbeat_at=now
    )
    closed = 0
    earlier = ServerInstance.objects.running().filter(name=name).exclude(id=instance_id)
    for old in earlier:
        if is_dead(old):
            closed += stop_instance(
                instance_id=old.id, reason=protocol.REASON_INSTANCE_RESTARTED, now=now
            )
        else:
            log.error(
                "instance=%s shares the name %r with running instance %s (pid %s on %s); "
                "give each instance its own RENDEZVOUS_INSTANCE_NAME",
                instance_id,
                name,
                old.id,
                old.pid,
                old.hostname,
            )
    return closed


def heartbeat_instance(*, instance_id: str, now: datetime | None = None) -> bool:
    """Say this instance is alive. False means another instance already declared it dead."""
    now = now or timezone.now()
    return bool(ServerInstance.objects.running().filter(id=instance_id).update(heartbeat_at=now))


def stop_instance(
    *,
    instance_id: str,
    reason: str,
    code: int = CODE_CONNECTION_LOST,
    now: datetime | None = None,
    departed: list[tuple[str, str]] | None = None,
) -> int:
    """Mark an instance stopped and close every connection it still held. Returns how many.

    Safe to race: only the caller that flips `stopped_at` closes the sessions. The workers this
    took offline are added to `departed` as (id, tags), for peer events.
    """
    now = now or timezone.now()
    with transaction.atomic():
        flipped = (
            ServerInstance.objects.running()
            .filter(id=instance_id)
            .update(stopped_at=now, stop_reason=reason[:200])
        )
        if not flipped:
            return 0
        last_alive = ServerInstance.objects.values_list("heartbeat_at", flat=True).get(
            id=instance_id
        )
        # Ids first, then updates by id: an UPDATE ... WHERE id IN (subquery) that waits for a
        # row lock re-checks only that row on PostgreSQL, not the subquery, and would take a
        # worker offline whose newer connection (elsewhere) committed meanwhile.
        ids = list(Connection.objects.held_by(instance_id).values_list("id", flat=True))
        if departed is not None:
            for chunk in bulk.chunks(ids):
                departed += Worker.objects.filter(current_connection_id__in=chunk).values_list(
                    "id", "tags"
                )
        end_connections({(code, reason[:200]): ids}, now=now, last_seen=min(last_alive, now))
        return len(ids)


def sweep_silent_instances(
    *,
    dead_after: timedelta,
    now: datetime | None = None,
    exclude: str | None = None,
    departed: list[tuple[str, str]] | None = None,
) -> int:
    """The staleness rule: an instance without a heartbeat for `dead_after` is dead.

    Its sessions are closed. A live instance heartbeats every few seconds, so it is never swept
    unless it cannot reach the database for the whole of `dead_after`; then it finds out at its
    next heartbeat and closes its sockets so that its workers register afresh.
    """
    now = now or timezone.now()
    silent = ServerInstance.objects.silent_since(now - dead_after)
    if exclude:
        silent = silent.exclude(id=exclude)
    closed = 0
    for instance_id in silent.values_list("id", flat=True):
        count = stop_instance(
            instance_id=instance_id,
            reason=protocol.REASON_INSTANCE_LOST,
            now=now,
            departed=departed,
        )
        log.warning("instance=%s declared dead, %d sessions closed", instance_id, count)
        closed += count
    return closed


@dataclass(frozen=True, slots=True)
class Reconciliation:
    orphans_closed: int
    closed_elsewhere: dict[int, int]  # connection id -> close code, for sockets still open here


def close_connections_of_stopped_instances(*, now: datetime | None = None) -> int:
    """Backstop for the staleness rule: no row stays open on an instance that is stopped."""
    now = now or timezone.now()
    with transaction.atomic():
        ids = list(
            Connection.objects.open()
            .filter(Q(instance__stopped_at__isnull=False) | Q(instance__isnull=True))
            .values_list("id", flat=True)
        )
        if ids:
            end_connections({(CODE_CONNECTION_LOST, protocol.REASON_INSTANCE_LOST): ids}, now=now)
    return len(ids)


def reconcile_instance(
    *,
    instance_id: str,
    local_ids: set[int],
    settled_ids: set[int],
    grace: timedelta,
    now: datetime | None = None,
) -> Reconciliation:
    """Bring the rows this instance holds and the sockets it has back into agreement.

    - A row open in the database, older than `grace`, with no socket here (`local_ids`: every
      socket held now) is closed: its disconnect could not be written (the database was away).
    - A socket here held for longer than `grace` (`settled_ids`) whose row is closed (superseded
      or swept while a command was lost) is reported with the row's close code, for the caller
      to close the socket with.
    The two ages are measured separately: a row is written a little before its socket is held.
    """
    now = now or timezone.now()
    settled = now - grace
    open_rows = dict(
        Connection.objects.held_by(instance_id).values_list("id", "opened_at").iterator()
    )
    orphans = [pk for pk, opened in open_rows.items() if pk not in local_ids and opened < settled]
    if orphans:
        close_connections(
            [CloseRequest(pk, CODE_CONNECTION_LOST, "closed while unrecorded") for pk in orphans],
            now=now,
        )
    missing = {pk for pk in settled_ids if pk not in open_rows}
    closed_elsewhere: dict[int, int] = {}
    if missing:
        # A row that is gone entirely was deleted with its worker by an operator.
        closed_elsewhere = dict.fromkeys(missing, int(protocol.CloseCode.DISCONNECTED_BY_OPERATOR))
        rows = Connection.objects.filter(id__in=missing).values_list("id", "close_code")
        closed_elsewhere.update({pk: code or CODE_CONNECTION_LOST for pk, code in rows})
    return Reconciliation(orphans_closed=len(orphans), closed_elsewhere=closed_elsewhere)


def touch_held_workers(*, instance_id: str, now: datetime, resolution: timedelta) -> int:
    """Refresh `last_seen` of the workers this instance holds, each at most once per `resolution`.

    One statement per round however many workers are connected: heartbeats cost no write each.
    """
    touched = 0
    with transaction.atomic():
        # Rows another transaction holds (a registration moving the worker) are skipped, not
        # waited for: that registration gives them a fresh last_seen anyway.
        stale = (
            Worker.objects.held_by(instance_id)
            .filter(last_seen__lt=now - resolution)
            .select_for_update(skip_locked=True, of=("self",))
            .order_by("id")
            .values_list("id", flat=True)
        )
        for chunk in bulk.chunks(list(stale)):
            touched += Worker.objects.filter(id__in=chunk).update(last_seen=now)
    return touched
