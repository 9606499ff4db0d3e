"""Every write to the registry. Plain functions with keyword arguments, callable without a socket.

Each function is one transaction, so a failure half-way leaves no half-written row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from registry import protocol
from registry.models import Connection, ServerInstance, Worker, WorkerStatus

log = logging.getLogger("registry.services")

# A connection row the service closes without a socket to close (its instance died) gets this
# code: 1006 is the WebSocket code for "closed without a close frame".
CODE_CONNECTION_LOST = 1006


@dataclass(frozen=True, slots=True)
class Registration:
    connection_id: int
    superseded_connection_id: int | None
    superseded_channel: str | None


def register_connection(
    *,
    worker_id: str,
    channel_name: str,
    instance_id: str,
    observed_ip: str | None,
    observed_port: int | None,
    now: datetime | None = None,
) -> Registration:
    """Open a connection for `worker_id`; an older open one is closed as superseded."""
    now = now or timezone.now()
    with transaction.atomic():
        worker, created = Worker.objects.select_for_update().get_or_create(
            id=worker_id, defaults={"first_seen": now, "last_seen": now}
        )
        previous: Connection | None = None
        if not created and worker.current_connection_id is not None:
            previous = Connection.objects.open().filter(pk=worker.current_connection_id).first()
        if previous is not None:
            _close_connection_row(
                previous.pk, code=protocol.CloseCode.SUPERSEDED, reason="superseded", now=now
            )
        connection = Connection.objects.create(
            worker=worker,
            instance_id=instance_id,
            channel_name=channel_name,
            opened_at=now,
            observed_ip=observed_ip,
            observed_port=observed_port,
        )
        worker.status = WorkerStatus.CONNECTED
        worker.current_connection = connection
        worker.last_seen = now
        worker.observed_ip = observed_ip
        worker.observed_port = observed_port
        worker.save(
            update_fields=[
                "status",
                "current_connection",
                "last_seen",
                "observed_ip",
                "observed_port",
            ]
        )
    return Registration(
        connection_id=connection.pk,
        superseded_connection_id=previous.pk if previous else None,
        superseded_channel=previous.channel_name if previous else None,
    )


def close_connection(
    *, connection_id: int, code: int, reason: str, now: datetime | None = None
) -> bool:
    """Record the end of a connection; the worker goes offline only if this was its current one.

    Returns whether it ended the worker's registration.
    """
    now = now or timezone.now()
    with transaction.atomic():
        _close_connection_row(connection_id, code=code, reason=reason, now=now)
        ended = Worker.objects.filter(current_connection_id=connection_id).update(
            status=WorkerStatus.DISCONNECTED, current_connection=None, last_seen=now
        )
    return bool(ended)


def _close_connection_row(connection_id: int, *, code: int, reason: str, now: datetime) -> None:
    # Only an open row is closed: the first recorded ending (superseded, swept) is the true one.
    Connection.objects.filter(pk=connection_id, closed_at__isnull=True).update(
        closed_at=now, close_code=code, close_reason=reason[:200]
    )


def report_public_ip(*, connection_id: int, ip: str, now: datetime | None = None) -> bool:
    """Store the worker's self-reported address, if `connection_id` still owns the worker id."""
    now = now or timezone.now()
    ip = protocol.normalize_ip(ip)
    with transaction.atomic():
        updated = Worker.objects.filter(current_connection_id=connection_id).update(
            public_ip=ip, public_ip_reported_at=now, last_seen=now
        )
        if updated:
            Connection.objects.filter(pk=connection_id).update(public_ip=ip)
    return bool(updated)


def record_agent_info(*, connection_id: int, info: dict[str, object]) -> bool:
    updated = Worker.objects.filter(current_connection_id=connection_id).update(agent_info=info)
    return bool(updated)


def touch_held_workers(*, instance_id: str, now: datetime, resolution: timedelta) -> int:
    """Refresh `last_seen` of the workers this instance holds, each at most once per `resolution`.

    One statement per round however many workers are connected: heartbeats cost no write each.
    """
    return (
        Worker.objects.held_by(instance_id)
        .filter(last_seen__lt=now - resolution)
        .update(last_seen=now)
    )


# ---- server instances ---------------------------------------------------------------------------


def start_instance(
    *, instance_id: str, name: str, hostname: str, pid: int, now: datetime | None = None
) -> int:
    """Record a new boot; earlier boots under the same name are dead, so their sessions end.

    Returns how many connections that closed.
    """
    now = now or timezone.now()
    ServerInstance.objects.create(
        id=instance_id, name=name, hostname=hostname, pid=pid, started_at=now, heartbeat_at=now
    )
    closed = 0
    earlier = ServerInstance.objects.running().filter(name=name).exclude(id=instance_id)
    for old_id in earlier.values_list("id", flat=True):
        closed += stop_instance(
            instance_id=old_id, reason=protocol.REASON_INSTANCE_RESTARTED, now=now
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
) -> int:
    """Mark an instance stopped and close every connection it still held. Returns how many.

    Safe to race: only the caller that flips `stopped_at` closes the sessions.
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
        Worker.objects.held_by(instance_id).update(
            status=WorkerStatus.DISCONNECTED,
            current_connection=None,
            last_seen=min(last_alive, now),
        )
        return Connection.objects.held_by(instance_id).update(
            closed_at=now, close_code=code, close_reason=reason[:200]
        )


def sweep_silent_instances(
    *, dead_after: timedelta, now: datetime | None = None, exclude: str | None = None
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
            instance_id=instance_id, reason=protocol.REASON_INSTANCE_LOST, now=now
        )
        log.warning("instance=%s declared dead, %d sessions closed", instance_id, count)
        closed += count
    return closed


@dataclass(frozen=True, slots=True)
class Reconciliation:
    orphans_closed: int
    closed_elsewhere: dict[int, int]  # connection id -> close code, for sockets still open here


def reconcile_instance(
    *, instance_id: str, local_ids: set[int], grace: timedelta, now: datetime | None = None
) -> Reconciliation:
    """Bring the rows this instance holds and the sockets it has back into agreement.

    - A row open in the database with no socket here is closed: its disconnect could not be
      written (the database was away).
    - A socket here whose row is closed (superseded or swept while a message was lost) is
      reported with the row's close code, for the caller to close the socket with.
    Rows younger than `grace` are left alone, their consumer may still be attaching; the caller
    passes in `local_ids` only sockets attached for longer than `grace`.
    """
    now = now or timezone.now()
    settled = now - grace
    open_rows = dict(
        Connection.objects.held_by(instance_id).values_list("id", "opened_at").iterator()
    )
    orphans = [pk for pk, opened in open_rows.items() if pk not in local_ids and opened < settled]
    for pk in orphans:
        close_connection(
            connection_id=pk, code=CODE_CONNECTION_LOST, reason="closed while unrecorded", now=now
        )
    missing = {pk for pk in local_ids if pk not in open_rows}
    closed_elsewhere: dict[int, int] = {}
    if missing:
        # A row that is gone entirely was deleted with its worker by an operator.
        closed_elsewhere = dict.fromkeys(missing, int(protocol.CloseCode.DISCONNECTED_BY_OPERATOR))
        rows = Connection.objects.filter(id__in=missing).values_list("id", "close_code")
        closed_elsewhere.update({pk: code or CODE_CONNECTION_LOST for pk, code in rows})
    return Reconciliation(orphans_closed=len(orphans), closed_elsewhere=closed_elsewhere)
