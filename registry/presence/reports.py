"""What a connection reports about its worker (its public address, its agent info, its NAT
findings), stored in batches while the connection is still the worker's current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from registry.core import protocol
from registry.models import Connection, Worker
from registry.presence import bulk


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
            mapped = report.nat.port_mapping
            fields.update(
                nat_mapping=report.nat.mapping,
                udp_ip=endpoint.ip if endpoint else None,
                udp_port=endpoint.port if endpoint else None,
                nat_reported_at=now,
                port_mapping_protocol=mapped.protocol.value if mapped else "",
                port_mapping_ip=mapped.external.ip if mapped else None,
                port_mapping_port=mapped.external.port if mapped else None,
            )
    with transaction.atomic():
        # Worker rows locked in id order, as registrations and closes take them (no deadlock).
        owners: dict[int, str] = {}
        for chunk in bulk.chunks(list(merged)):
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
