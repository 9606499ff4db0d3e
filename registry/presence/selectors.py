"""Reads of workers and their sessions that the views, the admin, the commands and the consumer
share. Values, not models: lists of thousands of workers are built from tuples, never from model
instances. Peer-connection reads are peering/records.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count

from registry.core.peer_policy import Reach
from registry.models import Connection, ServerInstance, Worker, WorkerStatus, decode_tags

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
    "port_mapping_protocol",
    "port_mapping_ip",
    "port_mapping_port",
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


def iso(value: datetime | None) -> str | None:
    """A time as the JSON views write it."""
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
            "opened_at": iso(row["current_connection__opened_at"]),
            "instance_id": row["current_connection__instance_id"],
        }
    return {
        "id": row["id"],
        "status": row["status"],
        "first_seen": iso(row["first_seen"]),
        "last_seen": iso(row["last_seen"]),
        "observed_ip": row["observed_ip"],
        "observed_port": row["observed_port"],
        "public_ip": row["public_ip"],
        "public_ip_reported_at": iso(row["public_ip_reported_at"]),
        "agent_info": row["agent_info"],
        "current_connection": connection,
        "tags": decode_tags(row["tags"]),
        "ephemeral": row["ephemeral"],
        "enrolled_at": iso(row["credential_issued_at"]),
        "disabled_at": iso(row["disabled_at"]),
        "nat": {
            "mapping": row["nat_mapping"] or None,
            "udp_endpoint": {"ip": row["udp_ip"], "port": row["udp_port"]}
            if row["udp_ip"]
            else None,
            "reported_at": iso(row["nat_reported_at"]),
            "port_mapping": {
                "protocol": row["port_mapping_protocol"],
                "external": {"ip": row["port_mapping_ip"], "port": row["port_mapping_port"]},
            }
            if row["port_mapping_protocol"]
            else None,
        },
        "identity": {
            "fingerprint": row["certificate_fingerprint"] or None,
            "bound_at": iso(row["certificate_bound_at"]),
        },
    }


def _connection_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "opened_at": iso(row["opened_at"]), "closed_at": iso(row["closed_at"])}


@dataclass(frozen=True, slots=True)
class Page:
    count: int
    page: int
    page_size: int
    results: list[dict[str, Any]]

    @property
    def num_pages(self) -> int:
        return max(1, -(-self.count // self.page_size))


def list_workers(
    *, status: WorkerStatus | None, page: int, page_size: int, tag: str | None = None
) -> Page:
    """One page of workers in a stable order (by id), optionally of one status and tag."""
    workers = Worker.objects.all()
    if status is not None:
        workers = workers.filter(status=status)
    if tag is not None:
        workers = workers.tagged(tag)
    count = workers.count()
    start = (page - 1) * page_size
    rows = workers.order_by("id").values(*_WORKER_FIELDS)[start : start + page_size]
    return Page(
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


def nat_mappings(worker_ids: tuple[str, ...]) -> dict[str, str]:
    """The NAT mapping each worker's current connection reported ("" before its report)."""
    return dict(Worker.objects.filter(id__in=worker_ids).values_list("id", "nat_mapping"))


def list_peers(
    *,
    exclude: str,
    tag: str | None = None,
    limit: int = 1000,
    reach: Reach | None = None,
    offline: bool = False,
) -> tuple[list[dict[str, Any]], bool]:
    """Connected workers another worker may ask to reach (those `reach` takes in: the peer
    policy as a query): ids, tags and NAT mapping only (their addresses are given out in
    introductions, to the two parties alone). With `offline`, the registry's other workers
    too, each with `online` and `last_seen`. And whether the list was cut at `limit`."""
    workers = Worker.objects.all() if offline else Worker.objects.connected()
    workers = workers.filter(disabled_at__isnull=True).exclude(id=exclude)
    if tag is not None:
        workers = workers.tagged(tag)
    if reach is not None:
        workers = workers.within(reach)
    fields = ("id", "tags", "nat_mapping", "status", "last_seen")
    rows = list(workers.order_by("id").values_list(*fields)[: limit + 1])
    peers = []
    for worker_id, tags, mapping, status, last_seen in rows[:limit]:
        peer = {"worker_id": worker_id, "tags": decode_tags(tags), "nat_mapping": mapping or None}
        if offline:
            peer["online"] = status == WorkerStatus.CONNECTED
            peer["last_seen"] = last_seen.isoformat() if last_seen else None
        peers.append(peer)
    return peers, len(rows) > limit


def worker_exists(worker_id: str) -> bool:
    return Worker.objects.filter(id=worker_id).exists()


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
