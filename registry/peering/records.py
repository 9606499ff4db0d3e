"""Peer connections as the registry records them: one row per introduction, written by the
instances of both workers (who asked whom, what the policy said, which path it took, how it
ended), and the reads the views, the admin and /metrics share.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Case, Count, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from registry.core import protocol
from registry.models import PeerConnection, PeerConnectionOutcome
from registry.presence.selectors import Page, iso


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


# ---- reads ---------------------------------------------------------------------------------------

PATH_PENDING = "pending"  # introduced, no path reported yet


def peer_connections_by_path() -> dict[str, int]:
    """Open peer connections by the route their data takes now (one query)."""
    rows = PeerConnection.objects.open().values_list("path_kind").annotate(n=Count("id")).order_by()
    return {kind or PATH_PENDING: count for kind, count in rows}


def peer_connection_counts(worker_id: str) -> dict[str, int]:
    """A worker's recorded peer connections (as requester or target), by outcome."""
    rows = (
        PeerConnection.objects.involving(worker_id)
        .values_list("outcome")
        .annotate(n=Count("id"))
        .order_by()
    )
    found = dict(rows)
    return {outcome: found.get(outcome, 0) for outcome in PeerConnectionOutcome.values}


def busiest_peer_workers(*, limit: int, since: datetime) -> list[str]:
    """The workers in the most peer connections requested since `since` (as requester or
    target), most first: the recent records only, so that the query stays small."""
    recent = PeerConnection.objects.filter(requested_at__gte=since)
    counts: Counter[str] = Counter()
    for side in ("requester_id", "target_id"):
        rows = recent.values_list(side).annotate(n=Count("id")).order_by("-n")[:limit]
        counts.update(dict(rows))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [worker_id for worker_id, _ in ranked[:limit]]


_PEER_CONNECTION_FIELDS = (
    "id",
    "requester_id",
    "target_id",
    "requested_at",
    "outcome",
    "failure_code",
    "detail",
    "decided_by",
    "path_kind",
    "path_changes",
    "path_changed_at",
    "setup_ms",
    "relayed_bytes",
    "closed_at",
    "close_reason",
)


def list_peer_connections(
    *,
    page: int,
    page_size: int,
    worker: str | None = None,
    outcome: str | None = None,
    path_kind: str | None = None,
    since: datetime | None = None,
) -> Page:
    """One page of recorded peer connections, newest first, optionally filtered."""
    records = PeerConnection.objects.all()
    if worker is not None:
        records = records.involving(worker)
    if outcome is not None:
        records = records.filter(outcome=outcome)
    if path_kind is not None:
        records = records.filter(path_kind=path_kind)
    if since is not None:
        records = records.filter(requested_at__gte=since)
    count = records.count()
    start = (page - 1) * page_size
    rows = records.order_by("-requested_at", "id").values(*_PEER_CONNECTION_FIELDS)[
        start : start + page_size
    ]
    return Page(
        count=count,
        page=page,
        page_size=page_size,
        results=[_peer_connection_dict(row) for row in rows],
    )


def _peer_connection_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "path_kind": row["path_kind"] or None,
        "requested_at": iso(row["requested_at"]),
        "path_changed_at": iso(row["path_changed_at"]),
        "closed_at": iso(row["closed_at"]),
    }
