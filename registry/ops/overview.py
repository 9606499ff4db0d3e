"""The operator's first questions, answered above the admin's worker list in a few queries: who
is here, who was, where, and on which paths their peer connections run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Q

from registry.models import Worker, WorkerStatus
from registry.peering.records import peer_connections_by_path

RECENTLY_SEEN = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class InstanceShare:
    instance_id: str | None
    name: str
    connected: int


@dataclass(frozen=True, slots=True)
class RegistryOverview:
    total: int
    connected: int
    seen_recently: int
    by_instance: list[InstanceShare]
    by_nat_mapping: list[tuple[str, int]]
    peer_paths: list[tuple[str, int]]


def registry_overview(*, now: datetime) -> RegistryOverview:
    """Who is here, who was, where, and on which paths."""
    counts = Worker.objects.aggregate(
        total=Count("id"),
        connected=Count("id", filter=Q(status=WorkerStatus.CONNECTED)),
        seen_recently=Count("id", filter=Q(last_seen__gte=now - RECENTLY_SEEN)),
    )
    rows = (
        Worker.objects.connected()
        .values("current_connection__instance_id", "current_connection__instance__name")
        .annotate(connected=Count("id"))
        .order_by("-connected", "current_connection__instance__name")
    )
    by_instance = [
        InstanceShare(
            instance_id=row["current_connection__instance_id"],
            name=row["current_connection__instance__name"] or "(no instance)",
            connected=row["connected"],
        )
        for row in rows
    ]
    by_nat_mapping = [
        (mapping or "", count)
        for mapping, count in Worker.objects.connected()
        .values_list("nat_mapping")
        .annotate(n=Count("id"))
        .order_by("-n", "nat_mapping")
    ]
    peer_paths = sorted(peer_connections_by_path().items(), key=lambda item: -item[1])
    return RegistryOverview(
        by_instance=by_instance, by_nat_mapping=by_nat_mapping, peer_paths=peer_paths, **counts
    )
