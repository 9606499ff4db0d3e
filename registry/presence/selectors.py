"""Every read of the registry that views, the admin and commands share. Values, not models:
lists of thousands of workers are built from tuples, never from model instances."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q

from registry.core import peer_policy as policy
from registry.core.peer_policy import Policy, Subject
from registry.models import (
    Connection,
    PeerConnection,
    PeerConnectionOutcome,
    PeerRule,
    ServerInstance,
    Worker,
    WorkerStatus,
    decode_tags,
)
from registry.ops import metrics

log = logging.getLogger("registry.selectors")

RECENT_CONNECTIONS = 20

_WORKER_FIELDS = (
    "id",
    "status",
    "first_seen",
    "last_seen",
    "observed_ip",
    "observed_port",
    "public_ip",
    "public_ip_reported_at",
    "agent_info",
    "current_connection_id",
    "current_connection__opened_at",
    "current_connection__instance_id",
    "tags",
    "ephemeral",
    "disabled_at",
    "credential_issued_at",
    "nat_mapping",
    "udp_ip",
    "udp_port",
    "nat_reported_at",
    "certificate_fingerprint",
    "certificate_bound_at",
)

_CONNECTION_FIELDS = (
    "id",
    "instance_id",
    "opened_at",
    "closed_at",
    "close_code",
    "close_reason",
    "observed_ip",
    "observed_port",
    "public_ip",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def poc_worker_listing() -> dict[str, Any]:
    """The proof of concept's `/debug/list_workers`, field for field: connected workers only."""
    rows = (
        Worker.objects.connected()
        .order_by("id")
        .values_list(
            "id",
            "current_connection__public_ip",
            "current_connection__observed_ip",
            "current_connection__observed_port",
        )
    )
    workers = {
        worker_id: {
            # The PoC overwrote the observed address with the self-reported one.
            "public_ip": reported or observed,
            "public_port": port,
            "connected": True,
            "raw_state": 1,
        }
        for worker_id, reported, observed, port in rows.iterator(chunk_size=2000)
    }
    return {"connected_workers_count": len(workers), "workers": workers}


def _worker_dict(row: dict[str, Any]) -> dict[str, Any]:
    connection = None
    if row["current_connection_id"] is not None:
        connection = {
            "id": row["current_connection_id"],
            "opened_at": _iso(row["current_connection__opened_at"]),
            "instance_id": row["current_connection__instance_id"],
        }
    return {
        "id": row["id"],
        "status": row["status"],
        "first_seen": _iso(row["first_seen"]),
        "last_seen": _iso(row["last_seen"]),
        "observed_ip": row["observed_ip"],
        "observed_port": row["observed_port"],
        "public_ip": row["public_ip"],
        "public_ip_reported_at": _iso(row["public_ip_reported_at"]),
        "agent_info": row["agent_info"],
        "current_connection": connection,
        "tags": decode_tags(row["tags"]),
        "ephemeral": row["ephemeral"],
        "enrolled_at": _iso(row["credential_issued_at"]),
        "disabled_at": _iso(row["disabled_at"]),
        "nat": {
            "mapping": row["nat_mapping"] or None,
            "udp_endpoint": {"ip": row["udp_ip"], "port": row["udp_port"]}
            if row["udp_ip"]
            else None,
            "reported_at": _iso(row["nat_reported_at"]),
        },
        "identity": {
            "fingerprint": row["certificate_fingerprint"] or None,
            "bound_at": _iso(row["certificate_bound_at"]),
        },
    }


def _connection_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "opened_at": _iso(row["opened_at"]), "closed_at": _iso(row["closed_at"])}


@dataclass(frozen=True, slots=True)
class WorkerPage:
    count: int
    page: int
    page_size: int
    results: list[dict[str, Any]]

    @property
    def num_pages(self) -> int:
        return max(1, -(-self.count // self.page_size))


def list_workers(
    *, status: WorkerStatus | None, page: int, page_size: int, tag: str | None = None
) -> WorkerPage:
    """One page of workers in a stable order (by id), optionally of one status and tag."""
    workers = Worker.objects.all()
    if status is not None:
        workers = workers.filter(status=status)
    if tag is not None:
        workers = workers.tagged(tag)
    count = workers.count()
    start = (page - 1) * page_size
    rows = workers.order_by("id").values(*_WORKER_FIELDS)[start : start + page_size]
    return WorkerPage(
        count=count, page=page, page_size=page_size, results=[_worker_dict(r) for r in rows]
    )


def worker_detail(worker_id: str, *, recent: int = RECENT_CONNECTIONS) -> dict[str, Any] | None:
    row = Worker.objects.filter(id=worker_id).values(*_WORKER_FIELDS).first()
    if row is None:
        return None
    connections = (
        Connection.objects.filter(worker_id=worker_id)
        .order_by("-opened_at", "-id")
        .values(*_CONNECTION_FIELDS)[:recent]
    )
    return {**_worker_dict(row), "recent_connections": [_connection_dict(c) for c in connections]}


@dataclass(frozen=True, slots=True)
class PeerTarget:
    connection_id: int
    channel_name: str
    nat_mapping: str


def peer_target(worker_id: str) -> PeerTarget | None:
    """Where to reach a connected, enabled worker for an introduction, and its NAT mapping."""
    row = (
        Worker.objects.connected()
        .filter(id=worker_id, disabled_at__isnull=True)
        .values_list("current_connection_id", "current_connection__channel_name", "nat_mapping")
        .first()
    )
    return PeerTarget(*row) if row else None


def list_peers(
    *,
    exclude: str,
    tag: str | None = None,
    limit: int = 1000,
    reach: policy.Reach | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Connected workers another worker may ask to reach (those `reach` takes in: the peer
    policy as a query): ids, tags and NAT mapping only (their addresses are given out in
    introductions, to the two parties alone). And whether the list was cut at `limit`."""
    workers = Worker.objects.connected().filter(disabled_at__isnull=True).exclude(id=exclude)
    if tag is not None:
        workers = workers.tagged(tag)
    if reach is not None:
        workers = workers.within(reach)
    rows = list(workers.order_by("id").values_list("id", "tags", "nat_mapping")[: limit + 1])
    peers = [
        {"worker_id": worker_id, "tags": decode_tags(tags), "nat_mapping": mapping or None}
        for worker_id, tags, mapping in rows[:limit]
    ]
    return peers, len(rows) > limit


# ---- the peer policy (registry/policy.py) -------------------------------------------------------


def peer_policy(mode: str | None = None) -> Policy:
    """The policy as the database holds it now: the enabled rules, by id. A stored rule that
    cannot be read (written around the admin's form) allows nothing; it is logged and counted."""
    mode = mode or settings.RENDEZVOUS["PEER_POLICY"]
    if mode == policy.ALLOW_ALL:
        return policy.Policy(mode)
    rules = []
    for rule_id, description, sources, destinations in (
        PeerRule.objects.filter(enabled=True)
        .order_by("id")
        .values_list("id", "description", "sources", "destinations")
    ):
        try:
            sides = policy.parse_side(sources), policy.parse_side(destinations)
            rules.append(policy.Rule(rule_id, description, *sides))
        except policy.InvalidRule as exc:
            log.error("peer rule #%s cannot be read and allows nothing: %s", rule_id, exc)
            metrics.policy_error()
    return policy.Policy(mode, tuple(rules))


def subject(worker_id: str) -> Subject:
    """A worker as the policy sees it; an unknown id has no tags."""
    tags = Worker.objects.filter(id=worker_id).values_list("tags", flat=True).first()
    return Subject.of(worker_id, decode_tags(tags or ""))


def worker_reach(
    worker_id: str, tags: Iterable[str], *, outward: bool, limit: int
) -> tuple[list[str], int]:
    """The workers of the registry `worker_id` may reach (`outward`), or that may reach it,
    under the rules as they are now: the first `limit` ids, and how many in all. One query
    each way, whatever the size of the registry."""
    me = Subject.of(worker_id, tags)
    rules = peer_policy()
    reach = rules.reach_from(me) if outward else rules.reach_to(me)
    workers = Worker.objects.within(reach).exclude(id=worker_id)
    return list(workers.order_by("id").values_list("id", flat=True)[:limit]), workers.count()


def known_tags() -> set[str]:
    rows = Worker.objects.exclude(tags="").values_list("tags", flat=True).distinct()
    return {tag for tags in rows for tag in decode_tags(tags)}


def worker_exists(worker_id: str) -> bool:
    return Worker.objects.filter(id=worker_id).exists()


def rule_warnings(sources: str, destinations: str) -> list[str]:
    """What an operator should know about a rule: tags no worker carries, ids no worker has."""
    return rules_warnings([(sources, destinations)])[0]


def rules_warnings(rules: list[tuple[str, str]]) -> list[list[str]]:
    """`rule_warnings` for each of `rules` (sources, destinations), in two queries for all."""
    parsed: list[tuple[policy.Selector, ...] | str] = []
    for sources, destinations in rules:
        try:
            parsed.append(policy.parse_side(sources) + policy.parse_side(destinations))
        except policy.InvalidRule as exc:
            parsed.append(str(exc))
    selectors_ = [s for side in parsed if not isinstance(side, str) for s in side]
    named = {s.value for s in selectors_ if s.kind == "worker"}
    existing = (
        set(Worker.objects.filter(id__in=named).values_list("id", flat=True)) if named else set()
    )
    tags = known_tags() if any(s.kind == "tag" for s in selectors_) else set()
    found = []
    for side in parsed:
        if isinstance(side, str):
            found.append([side])
            continue
        warnings = [
            f"no worker carries tag:{s.value}"
            if s.kind == "tag"
            else f"no worker {s.value} in the registry"
            for s in side
            if (s.kind == "tag" and s.value not in tags)
            or (s.kind == "worker" and s.value not in existing)
        ]
        found.append(list(dict.fromkeys(warnings)))
    return found


def current_channel(worker_id: str) -> tuple[int, str] | None:
    """The open connection that holds `worker_id` and the channel that reaches its consumer."""
    row = (
        Worker.objects.connected()
        .filter(id=worker_id)
        .values_list("current_connection_id", "current_connection__channel_name")
        .first()
    )
    return (row[0], row[1]) if row else None


def worker_counts_by_status() -> dict[str, int]:
    counts = dict(Worker.objects.values_list("status").annotate(n=Count("id")).order_by())
    return {status: counts.get(status, 0) for status in WorkerStatus.values}


def running_instances() -> list[tuple[str, str, datetime]]:
    """(id, name, last heartbeat) of every instance not known to have stopped."""
    return list(ServerInstance.objects.running().values_list("id", "name", "heartbeat_at"))


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
    """The operator's first questions, in two queries: who is here, who was, and where."""
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
) -> WorkerPage:
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
    return WorkerPage(
        count=count,
        page=page,
        page_size=page_size,
        results=[_peer_connection_dict(row) for row in rows],
    )


def _peer_connection_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "path_kind": row["path_kind"] or None,
        "requested_at": _iso(row["requested_at"]),
        "path_changed_at": _iso(row["path_changed_at"]),
        "closed_at": _iso(row["closed_at"]),
    }
