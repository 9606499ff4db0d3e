"""Every write to the registry. Plain functions with keyword arguments, callable without a socket.

Each function is one transaction, so a failure half-way leaves no half-written row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, transaction
from django.db.models import Case, F, OuterRef, Q, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from registry.core import protocol
from registry.models import (
    Connection,
    PeerConnection,
    PeerConnectionOutcome,
    ServerInstance,
    Worker,
    WorkerStatus,
)
from registry.presence import bulk

log = logging.getLogger("registry.services")

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
    fingerprint: str = ""  # the worker's recorded certificate (registry/identities.py)

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


def _register_round(
    requests: list[RegistrationRequest], instance_id: str, now: datetime
) -> list[Registration]:
    # Lock the instance row: a sweep that stops this instance waits for the registration, or
    # the registration sees the instance stopped. A connection never lands on a dead instance.
    running = ServerInstance.objects.select_for_update().filter(id=instance_id, stopped_at=None)
    if not list(running.values_list("id", flat=True)):
        raise InstanceStopped(f"instance {instance_id} is stopped")
    # Worker rows are always locked in id order, here and in _end_connections, so concurrent
    # batches on several instances cannot deadlock on PostgreSQL.
    ids = sorted(r.worker_id for r in requests)
    bulk.insert_rows(
        Worker,
        {"first_seen": now, "last_seen": now},
        ("id",),
        [(worker_id,) for worker_id in ids],
        ignore_conflicts=True,
    )
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
    previous: dict[str, tuple[int, str]] = {}
    disabled: set[str] = set()
    tags: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    for worker_id, connection_id, channel, closed_at, disabled_at, worker_tags, print_ in rows:
        tags[worker_id] = worker_tags
        fingerprints[worker_id] = print_
        if disabled_at is not None:
            disabled.add(worker_id)  # a ban holds in every mode, checked under the row lock
        elif connection_id is not None and closed_at is None:
            previous[worker_id] = (connection_id, channel)
    admitted = [r for r in requests if r.worker_id not in disabled]
    ids = [worker_id for worker_id in ids if worker_id not in disabled]
    if previous:
        Connection.objects.filter(
            id__in=[connection_id for connection_id, _ in previous.values()], closed_at__isnull=True
        ).update(closed_at=now, close_code=protocol.CloseCode.SUPERSEDED, close_reason="superseded")
    bulk.insert_rows(
        Connection,
        {"instance_id": instance_id, "opened_at": now},
        ("worker", "channel_name", "observed_ip", "observed_port"),
        [(r.worker_id, r.channel_name, r.observed_ip, r.observed_port) for r in admitted],
    )
    # The rows just written: this round has each worker once, and any older open row of these
    # workers was closed above.
    opened = dict(
        Connection.objects.filter(
            worker_id__in=ids, instance_id=instance_id, opened_at=now, closed_at__isnull=True
        ).values_list("worker_id", "id")
    )
    # One UPDATE for the whole batch, each worker reading its values from its new connection row
    # (bulk_update's per-row CASE expressions cost more CPU than the rest of the registration).
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
    )
    registrations = []
    for r in requests:
        if r.worker_id in disabled:
            registrations.append(REFUSED)
            continue
        superseded = previous.get(r.worker_id)
        registrations.append(
            Registration(
                connection_id=opened[r.worker_id],
                superseded_connection_id=superseded[0] if superseded else None,
                superseded_channel=superseded[1] if superseded else None,
                tags=tags.get(r.worker_id, ""),
                fingerprint=fingerprints.get(r.worker_id, ""),
            )
        )
    return registrations


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
        ended = _end_connections(groups, now=now)
    return [r.connection_id in ended for r in requests]


CHUNK = 5000  # ids per IN (...) list: well inside SQLite's limit on bound parameters


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def _end_connections(
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
    for chunk in _chunks(ids):
        holders += Worker.objects.filter(current_connection_id__in=chunk).values_list(
            "id", flat=True
        )
    ended: set[int] = set()
    for chunk in _chunks(sorted(holders)):  # id order across chunks too: see _register_round
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
        for chunk in _chunks(members):
            Connection.objects.filter(id__in=chunk, closed_at__isnull=True).update(
                closed_at=now, close_code=code, close_reason=reason
            )
    return ended


@dataclass(frozen=True, slots=True)
class Report:
    """What a connection tells about its worker in one frame: its public address (already
    normalised: protocol.normalize_ip), its agent info, or its NAT findings."""

    connection_id: int
    public_ip: str | None = None
    agent_info: dict[str, object] | None = None
    nat: protocol.NatReport | None = None

    @property
    def kind(self) -> str:
        """What it reports, for metrics and logs: `public_ip`, `agent_info` or `nat_report`."""
        kinds = ["public_ip"] * (self.public_ip is not None)
        kinds += ["agent_info"] * (self.agent_info is not None)
        kinds += ["nat_report"] * (self.nat is not None)
        return "+".join(kinds) or "nothing"


def record_reports(reports: Sequence[Report], *, now: datetime | None = None) -> list[bool]:
    """Store a batch of reports in one transaction; each returns whether it was stored.

    A report counts only while its connection still owns the worker id (a superseded
    connection's is ignored). Reports of one connection apply in order: the last address wins.
    One UPDATE statement per kind of change, executed for every worker in the batch (executemany:
    no per-row CASE, no statement built per report).
    """
    now = now or timezone.now()
    merged: dict[int, dict[str, object]] = {}
    for report in reports:
        fields = merged.setdefault(report.connection_id, {})
        if report.public_ip is not None:
            fields.update(public_ip=report.public_ip, public_ip_reported_at=now, last_seen=now)
        if report.agent_info is not None:
            fields["agent_info"] = report.agent_info
        if report.nat is not None:
            endpoint = report.nat.udp_endpoint
            fields.update(
                nat_mapping=report.nat.mapping,
                udp_ip=endpoint.ip if endpoint else None,
                udp_port=endpoint.port if endpoint else None,
                nat_reported_at=now,
            )
    with transaction.atomic():
        # Worker rows locked in id order, as registrations and closes take them (no deadlock).
        owners: dict[int, str] = {}
        for chunk in _chunks(list(merged)):
            rows = (
                Worker.objects.select_for_update(of=("self",))
                .filter(current_connection_id__in=chunk)
                .order_by("id")
                .values_list("current_connection_id", "id")
            )
            owners.update(rows)
        by_fields: dict[tuple[str, ...], list[tuple[str, dict[str, object]]]] = {}
        for connection_id in sorted(owners, key=owners.__getitem__):
            fields = merged[connection_id]
            by_fields.setdefault(tuple(fields), []).append((owners[connection_id], fields))
        for names, changes in by_fields.items():
            bulk.update_rows(Worker, names, [(worker_id, f) for worker_id, f in changes])
        addresses = [
            (connection_id, {"public_ip": merged[connection_id]["public_ip"]})
            for connection_id in sorted(owners)
            if "public_ip" in merged[connection_id]
        ]
        bulk.update_rows(Connection, ("public_ip",), addresses)
    return [report.connection_id in owners for report in reports]


def report_public_ip(*, connection_id: int, ip: str, now: datetime | None = None) -> bool:
    """Store the worker's self-reported address, if `connection_id` still owns the worker id."""
    report = Report(connection_id, public_ip=protocol.normalize_ip(ip))
    return record_reports([report], now=now)[0]


def record_nat_report(
    *, connection_id: int, report: protocol.NatReport, now: datetime | None = None
) -> bool:
    """Store the agent's STUN findings, if `connection_id` still owns the worker id."""
    return record_reports([Report(connection_id, nat=report)], now=now)[0]


def record_agent_info(*, connection_id: int, info: dict[str, object]) -> bool:
    return record_reports([Report(connection_id, agent_info=info)])[0]


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
        for chunk in _chunks(list(stale)):
            touched += Worker.objects.filter(id__in=chunk).update(last_seen=now)
    return touched


# ---- server instances ---------------------------------------------------------------------------


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
            for chunk in _chunks(ids):
                departed += Worker.objects.filter(current_connection_id__in=chunk).values_list(
                    "id", "tags"
                )
        _end_connections({(code, reason[:200]): ids}, now=now, last_seen=min(last_alive, now))
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
            _end_connections({(CODE_CONNECTION_LOST, protocol.REASON_INSTANCE_LOST): ids}, now=now)
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


# ---- peer connections (registry/introductions.py) ---------------------------------------------


def record_introduction(
    *,
    introduction_id: str,
    requester_id: str,
    target_id: str,
    requester_connection_id: int | None,
    target_connection_id: int | None,
    decided_by: str = "",
    now: datetime | None = None,
) -> None:
    """An accepted introduction: the pair is linked, no path reported yet."""
    fields = {
        "requester_id": requester_id,
        "target_id": target_id,
        "requester_connection_id": requester_connection_id,
        "target_connection_id": target_connection_id,
        "decided_by": decided_by[:200],
    }
    PeerConnection.objects.update_or_create(
        id=introduction_id,
        defaults=fields,
        create_defaults={**fields, "requested_at": now or timezone.now()},
    )


def record_failed_introduction(
    *,
    introduction_id: str,
    requester_id: str,
    target_id: str,
    code: str,
    reason: str,
    decided_by: str = "",
    now: datetime | None = None,
) -> None:
    """An introduction the target or the peer policy refused, or that failed once asked for."""
    now = now or timezone.now()
    refused = code in (protocol.ConnectFailure.PEER_REFUSED, protocol.ConnectFailure.POLICY_DENIED)
    outcome = PeerConnectionOutcome.REFUSED if refused else PeerConnectionOutcome.FAILED
    fields: dict[str, Any] = {
        "outcome": outcome,
        "failure_code": code,
        "detail": reason[:200],
        "closed_at": now,
    }
    if decided_by:
        fields["decided_by"] = decided_by[:200]
    PeerConnection.objects.update_or_create(
        id=introduction_id,
        defaults=fields,
        create_defaults={
            **fields,
            "requester_id": requester_id,
            "target_id": target_id,
            "requested_at": now,
        },
    )


def purge_peer_connections(*, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete the records of peer connections that ended more than `older_than` ago."""
    cutoff = (now or timezone.now()) - older_than
    deleted, _ = PeerConnection.objects.filter(closed_at__lt=cutoff).delete()
    return deleted


def record_path(
    *,
    introduction_id: str,
    requester_id: str,
    target_id: str,
    kind: str,
    remote: str,
    setup_ms: int | None,
    now: datetime | None = None,
) -> None:
    """The path a pair's data takes now; a change of kind is counted. The report may arrive
    before the introduction's own record (written on the other worker's instance): it then
    makes the record, which the introduction completes."""
    now = now or timezone.now()
    PeerConnection.objects.bulk_create(
        [
            PeerConnection(
                id=introduction_id, requester_id=requester_id, target_id=target_id, requested_at=now
            )
        ],
        ignore_conflicts=True,
    )
    PeerConnection.objects.filter(id=introduction_id).update(
        outcome=PeerConnectionOutcome.CONNECTED,
        path_changes=Case(
            When(path_kind=kind, then=F("path_changes")),
            default=F("path_changes") + 1,
        ),
        path_kind=kind,
        path_remote=remote[:64],
        path_changed_at=now,
        setup_ms=Coalesce(F("setup_ms"), Value(setup_ms)),
    )


def close_peer_connection(
    *, introduction_id: str, reason: str, relayed_bytes: int = 0, now: datetime | None = None
) -> bool:
    """One side ended the pair's link; the first reason stands, relayed bytes add up."""
    now = now or timezone.now()
    updated = PeerConnection.objects.filter(id=introduction_id).update(
        closed_at=Coalesce(F("closed_at"), Value(now)),
        close_reason=Case(
            When(close_reason="", then=Value(reason[:200])), default=F("close_reason")
        ),
        relayed_bytes=F("relayed_bytes") + relayed_bytes,
    )
    return bool(updated)


def close_orphaned_peer_connections(*, now: datetime | None = None) -> int:
    """Backstop: a pair whose worker's connection is closed (its instance died, say) is over."""
    now = now or timezone.now()
    gone = Q(requester_connection__closed_at__isnull=False) | Q(
        target_connection__closed_at__isnull=False
    )
    gone |= Q(requester_connection__isnull=True) | Q(target_connection__isnull=True)
    return (
        PeerConnection.objects.open()
        .filter(gone)
        .update(closed_at=now, close_reason="a worker's connection ended")
    )
