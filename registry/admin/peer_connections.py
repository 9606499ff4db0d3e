"""Peer connections in the admin: who asked whom, how it went, which path it took, what the
peer policy said. Records only, nothing to add or change."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import localize
from django.utils.html import format_html
from django.utils.safestring import SafeString

from registry.core import protocol
from registry.models import PeerConnection
from registry.peering import records


class OpenPeerConnectionFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "open"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("1", "open"), ("0", "ended")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[PeerConnection]
    ) -> QuerySet[PeerConnection]:
        if self.value() == "1":
            return queryset.open()
        if self.value() == "0":
            return queryset.exclude(pk__in=queryset.open().values("pk"))
        return queryset


class PeerWorkerFilter(admin.SimpleListFilter):
    """One worker's peer connections, as requester or target (the worker page links here)."""

    title = "worker"
    parameter_name = "worker"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        # The busiest of the last day (the whole table may hold millions of records).
        busiest = records.busiest_peer_workers(limit=20, since=timezone.now() - timedelta(days=1))
        chosen = self.value()
        if chosen and chosen not in busiest:
            busiest.insert(0, chosen)
        return [(worker_id, worker_id) for worker_id in busiest]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[PeerConnection]
    ) -> QuerySet[PeerConnection]:
        worker_id = self.value()
        return queryset.involving(worker_id) if worker_id else queryset


def _peer_worker_link(worker_id: str) -> SafeString:
    """To the worker's peer connections (its record may outlive the worker itself)."""
    url = reverse("admin:registry_peerconnection_changelist")
    return format_html(
        '<a href="{}?worker={}" style="white-space:nowrap">{}</a>', url, worker_id, worker_id
    )


@admin.register(PeerConnection)
class PeerConnectionAdmin(admin.ModelAdmin):
    """Introductions between workers: who asked whom, how it went, which path it took."""

    list_display = (
        "short_id",
        "requester",
        "target",
        "outcome_display",
        "path_kind",
        "setup",
        "relayed",
        "decided_by",
        "requested_at",
        "ended_at",
    )
    list_filter = (OpenPeerConnectionFilter, "outcome", "path_kind", PeerWorkerFilter)
    search_fields = ("id", "requester_id", "target_id")
    date_hierarchy = "requested_at"
    readonly_fields = [field.name for field in PeerConnection._meta.fields]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: PeerConnection | None = None
    ) -> bool:
        return False

    @admin.display(description="introduction", ordering="id")
    def short_id(self, record: PeerConnection) -> str:
        return record.id[:8]

    @admin.display(description="requester", ordering="requester_id")
    def requester(self, record: PeerConnection) -> SafeString:
        return _peer_worker_link(record.requester_id)

    @admin.display(description="target", ordering="target_id")
    def target(self, record: PeerConnection) -> SafeString:
        return _peer_worker_link(record.target_id)

    @admin.display(description="set-up", ordering="setup_ms")
    def setup(self, record: PeerConnection) -> str:
        return "-" if record.setup_ms is None else f"{record.setup_ms} ms"

    @admin.display(description="relayed", ordering="relayed_bytes")
    def relayed(self, record: PeerConnection) -> str:
        return filesizeformat(record.relayed_bytes) if record.relayed_bytes else "-"

    @admin.display(description="ended", ordering="closed_at")
    def ended_at(self, record: PeerConnection) -> str:
        return "-" if record.closed_at is None else localize(timezone.localtime(record.closed_at))

    @admin.display(description="outcome", ordering="outcome")
    def outcome_display(self, record: PeerConnection) -> str:
        """Who refused, or why it failed, with the outcome."""
        if record.failure_code == protocol.ConnectFailure.POLICY_DENIED:
            return "refused by the peer policy"
        if record.failure_code == protocol.ConnectFailure.PEER_REFUSED:
            return f"refused by {record.target_id}"
        if record.failure_code:
            return f"failed: {record.failure_code}"
        return record.get_outcome_display()
