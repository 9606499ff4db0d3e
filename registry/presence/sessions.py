"""A worker's sessions as the registry records them: a connection registered (superseding the
worker's older one, refused for a disabled worker) and closed. Plain functions with keyword
arguments, callable without a socket; each is one transaction, so a failure half-way leaves no
half-written row. Batches of them come from the coalescers (presence/batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import DatabaseError, transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from registry.core import protocol
from registry.models import Connection, ServerInstance, Worker, WorkerStatus
from registry.presence import bulk

# A connection row the service closes without a socket to close (its instance died) gets this
# code: 1006 is the WebSocket code for "closed without a close frame".
CODE_CONNECTION_LOST = 1006


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    worker_id: str
    channel_name: str
    observed_ip: str | None
    observed_port: int | None


@dataclass(frozen=True, slots=True)
class Registration:
    connection_id: int | None  # None: refused, the worker is disabled
    superseded_connection_id: int | None
    superseded_channel: str | None
    tags: str = ""  # the worker's tags, as stored (models.encode_tags)
    fingerprint: str = ""  # the worker's recorded certificate (security/identities.py)

    @property
    def refused(self) -> bool:
        return self.connection_id is None


REFUSED = Registration(None, None, None)


@dataclass(frozen=True, slots=True)
class CloseRequest:
    connection_id: int
    code: int
    reason: str


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
    request = RegistrationRequest(worker_id, channel_name, observed_ip, observed_port)
    return register_connections([request], instance_id=instance_id, now=now)[0]


def register_connections(
    requests: Sequence[RegistrationRequest], *, instance_id: str, now: datetime | None = None
) -> list[Registration]:
    """Register a batch of connections: a few statements per batch, not per connection.

    An id that appears twice in one batch is registered in order (the later supersedes the
    earlier), each round in its own transaction.
    """
    now = now or timezone.now()
    results: list[Registration | None] = [None] * len(requests)
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        occurrence = seen.get(request.worker_id, 0)
        seen[request.worker_id] = occurrence + 1
        if occurrence == len(rounds):
            rounds.append([])
        rounds[occurrence].append(index)
    # One transaction for all rounds (each round a savepoint): a batch is written whole or not
    # at all, so writing its items again one by one after a failure duplicates nothing.
    with transaction.atomic():
        for indices in rounds:
            batch = [requests[i] for i in indices]
            with transaction.atomic():
                for i, registration in zip(
                    indices, _register_round(batch, instance_id, now), strict=True
                ):
                    results[i] = registration
    return results  # type: ignore[return-value]


class InstanceStopped(DatabaseError):
    """The instance was declared dead (swept) before it could record these connections."""


@dataclass(slots=True)
class _HeldRows:
    """What the locked worker rows of one registration round say."""

    previous: dict[str, tuple[int, str]]  # worker id -> (its open connection, its channel)
    disabled: set[str]
    tags: dict[str, str]
    fingerprints: dict[str, str]


def _register_round(
    requests: list[RegistrationRequest], instance_id: str, now: datetime
) -> list[Registration]:
    _lock_running_instance(instance_id)
    # Worker rows are always locked in id order, here and in end_connections, so concurrent
    # batches on several instances cannot deadlock on PostgreSQL.
    ids = sorted(r.worker_id for r in requests)
    bulk.insert_rows(
        Worker,
        {"first_seen": now, "last_seen": now},
        ("id",),
        [(worker_id,) for worker_id in ids],
        ignore_conflicts=True,
    )
    held = _lock_workers(ids)
    admitted = [r for r in requests if r.worker_id not in held.disabled]
    ids = [worker_id for worker_id in ids if worker_id not in held.disabled]
    if held.previous:
        Connection.objects.filter(
            id__in=[connection_id for connection_id, _ in held.previous.values()],
            closed_at__isnull=True,
        ).update(closed_at=now, close_code=protocol.CloseCode.SUPERSEDED, close_reason="superseded")
    opened = _open_connections(admitted, ids, instance_id, now)
    _make_current(ids, opened, now)
    return [_registration(r, held, opened) for r in requests]


def _lock_running_instance(instance_id: str) -> None:
    """Lock the instance row: a sweep that stops this instance waits for the registration, or
    the registration sees the instance stopped. A connection never lands on a dead instance."""
    running = ServerInstance.objects.select_for_update().filter(id=instance_id, stopped_at=None)
    if not list(running.values_list("id", flat=True)):
        raise InstanceStopped(f"instance {instance_id} is stopped")


def _lock_workers(ids: list[str]) -> _HeldRows:
    rows = (
        Worker.objects.select_for_update(of=("self",))
        .filter(id__in=ids)
        .order_by("id")
        .values_list(
            "id",
            "current_connection_id",
            "current_connection__channel_name",
            "current_connection__closed_at",
            "disabled_at",
            "tags",
            "certificate_fingerprint",
        )
    )
    held = _HeldRows(previous={}, disabled=set(), tags={}, fingerprints={})
    for worker_id, connection_id, channel, closed_at, disabled_at, tags, fingerprint in rows:
        held.tags[worker_id] = tags
        held.fingerprints[worker_id] = fingerprint
        if disabled_at is not None:
            held.disabled.add(worker_id)  # a ban holds in every mode, checked under the row lock
        elif connection_id is not None and closed_at is None:
            held.previous[worker_id] = (connection_id, channel)
    return held


def _open_connections(
    admitted: list[RegistrationRequest], ids: list[str], instance_id: str, now: datetime
) -> dict[str, int]:
    """Insert the round's connection rows; their ids by worker id."""
    bulk.insert_rows(
        Connection,
        {"instance_id": instance_id, "opened_at": now},
        ("worker", "channel_name", "observed_ip", "observed_port"),
        [(r.worker_id, r.channel_name, r.observed_ip, r.observed_port) for r in admitted],
    )
    # The rows just written: this round has each worker once, and any older open row of these
    # workers was closed before.
    return dict(
        Connection.objects.filter(
            worker_id__in=ids, instance_id=instance_id, opened_at=now, closed_at__isnull=True
        ).values_list("worker_id", "id")
    )


def _make_current(ids: list[str], opened: dict[str, int], now: datetime) -> None:
    """One UPDATE for the whole round, each worker reading its values from its new connection
    row (bulk_update's per-row CASE expressions cost more CPU than the rest of the
    registration)."""
    newest = Connection.objects.filter(worker_id=OuterRef("pk"), id__in=list(opened.values()))
    Worker.objects.filter(id__in=ids).update(
        status=WorkerStatus.CONNECTED,
        last_seen=now,
        current_connection_id=Subquery(newest.values("id")[:1]),
        observed_ip=Subquery(newest.values("observed_ip")[:1]),
        observed_port=Subquery(newest.values("observed_port")[:1]),
        # A NAT report describes one connection's network: the new one reports its own.
        nat_mapping="",
        udp_ip=None,
        udp_port=None,
        nat_reported_at=None,
        port_mapping_protocol="",
        port_mapping_ip=None,
        port_mapping_port=None,
    )


def _registration(
    request: RegistrationRequest, held: _HeldRows, opened: dict[str, int]
) -> Registration:
    if request.worker_id in held.disabled:
        return REFUSED
    superseded = held.previous.get(request.worker_id)
    return Registration(
        connection_id=opened[request.worker_id],
        superseded_connection_id=superseded[0] if superseded else None,
        superseded_channel=superseded[1] if superseded else None,
        tags=held.tags.get(request.worker_id, ""),
        fingerprint=held.fingerprints.get(request.worker_id, ""),
    )


def close_connection(
    *, connection_id: int, code: int, reason: str, now: datetime | None = None
) -> bool:
    """Record the end of a connection; the worker goes offline only if this was its current one.

    Returns whether it ended the worker's registration.
    """
    return close_connections([CloseRequest(connection_id, code, reason)], now=now)[0]


def close_connections(
    requests: Sequence[CloseRequest], *, now: datetime | None = None
) -> list[bool]:
    """Record the ends of a batch of connections in one transaction (see `close_connection`)."""
    now = now or timezone.now()
    groups: dict[tuple[int, str], list[int]] = {}
    for r in requests:
        groups.setdefault((r.code, r.reason[:200]), []).append(r.connection_id)
    with transaction.atomic():
        ended = end_connections(groups, now=now)
    return [r.connection_id in ended for r in requests]


def end_connections(
    groups: dict[tuple[int, str], list[int]], *, now: datetime, last_seen: datetime | None = None
) -> set[int]:
    """Close connection rows and take their workers offline where they were current.

    Call inside a transaction. Locks go worker rows first, then connection rows, the order
    registration takes them in too, so a close racing a registration cannot deadlock. Only an
    open row is closed: the first recorded ending (superseded, swept) stands. Returns the ids
    that were their worker's current connection.
    """
    ids = [i for members in groups.values() for i in members]
    holders: list[str] = []
    for chunk in bulk.chunks(ids):
        holders += Worker.objects.filter(current_connection_id__in=chunk).values_list(
            "id", flat=True
        )
    ended: set[int] = set()
    for chunk in bulk.chunks(sorted(holders)):  # id order across chunks too: see _register_round
        locked = (
            Worker.objects.select_for_update()
            .filter(id__in=chunk, current_connection_id__in=ids)
            .order_by("id")
        )
        current = set(locked.values_list("current_connection_id", flat=True))
        if current:
            Worker.objects.filter(current_connection_id__in=current).update(
                status=WorkerStatus.DISCONNECTED,
                current_connection=None,
                last_seen=last_seen or now,
            )
        ended |= current
    for (code, reason), members in groups.items():
        for chunk in bulk.chunks(members):
            Connection.objects.filter(id__in=chunk, closed_at__isnull=True).update(
                closed_at=now, close_code=code, close_reason=reason
            )
    return ended
