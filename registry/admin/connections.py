"""Connections and the server instances that hold them, in the admin: history only, nothing to
add or change (a worker's page links to its connections)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from registry.admin.display import badge
from registry.models import Connection, ServerInstance

CONNECTION_FIELDS = (
    "worker",
    "state_badge",
    "instance",
    "opened_at",
    "closed_at",
    "close_code",
    "close_reason",
    "observed_ip",
    "observed_port",
    "public_ip",
    "channel_name",
)


class OpenConnectionFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("open", "open"), ("closed", "closed")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[Connection]
    ) -> QuerySet[Connection]:
        if self.value() == "open":
            return queryset.open()
        if self.value() == "closed":
            return queryset.filter(closed_at__isnull=False)
        return queryset


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "worker_link",
        "state_badge",
        "opened_at",
        "closed_at",
        "close_code",
        "close_reason",
        "observed_ip",
        "instance",
    )
    list_filter = (OpenConnectionFilter, "close_code")
    list_select_related = ("instance",)
    search_fields = ("worker__id", "observed_ip", "public_ip")
    date_hierarchy = "opened_at"
    readonly_fields = CONNECTION_FIELDS
    fields = CONNECTION_FIELDS
    ordering = ("-opened_at", "-id")
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Connection | None = None) -> bool:
        return False

    @admin.display(description="worker", ordering="worker_id")
    def worker_link(self, connection: Connection) -> SafeString:
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:registry_worker_change", args=[connection.worker_id]),
            connection.worker_id,
        )

    @admin.display(description="state")
    def state_badge(self, connection: Connection) -> SafeString:
        return badge("open" if connection.is_open else "closed")


@admin.register(ServerInstance)
class ServerInstanceAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "hostname", "pid", "started_at", "heartbeat_at", "stopped_at")
    list_filter = ("stopped_at",)
    readonly_fields = (
        "id",
        "name",
        "hostname",
        "pid",
        "started_at",
        "heartbeat_at",
        "stopped_at",
        "stop_reason",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: ServerInstance | None = None
    ) -> bool:
        return False
