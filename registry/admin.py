"""The registry in the Django admin. Observed fields are read-only: editing them would lie."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from registry import control
from registry.models import Connection, ServerInstance, Worker

OBSERVED_WORKER_FIELDS = (
    "id",
    "status",
    "first_seen",
    "last_seen",
    "observed_ip",
    "observed_port",
    "public_ip",
    "public_ip_reported_at",
    "agent_info",
    "current_connection",
)

CONNECTION_FIELDS = (
    "worker",
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


class ConnectionInline(admin.TabularInline):
    model = Connection
    fields = (
        "opened_at",
        "closed_at",
        "close_code",
        "close_reason",
        "observed_ip",
        "observed_port",
        "public_ip",
        "instance",
    )
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    ordering = ("-opened_at", "-id")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Connection]:
        return super().get_queryset(request).select_related("instance")


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "status",
        "observed_ip",
        "observed_port",
        "public_ip",
        "last_seen",
        "first_seen",
    )
    list_filter = ("status",)
    search_fields = ("id", "observed_ip", "public_ip")
    ordering = ("id",)
    readonly_fields = OBSERVED_WORKER_FIELDS
    inlines = (ConnectionInline,)
    actions = ("disconnect_selected",)
    list_per_page = 100
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # workers exist because they connected

    @admin.action(description="Disconnect selected workers now (close code 4001)")
    def disconnect_selected(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        requested = [w.id for w in queryset.only("id") if control.disconnect_worker(w.id)]
        skipped = queryset.count() - len(requested)
        if requested:
            self.message_user(
                request, f"Disconnect sent to {len(requested)} worker(s).", messages.SUCCESS
            )
        if skipped:
            self.message_user(request, f"{skipped} worker(s) were not connected.", messages.WARNING)


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "worker",
        "opened_at",
        "closed_at",
        "close_code",
        "close_reason",
        "observed_ip",
        "instance",
    )
    list_filter = ("close_code",)
    list_select_related = ("worker", "instance")
    search_fields = ("worker__id", "observed_ip", "public_ip")
    date_hierarchy = "opened_at"
    readonly_fields = CONNECTION_FIELDS
    ordering = ("-opened_at", "-id")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Connection | None = None) -> bool:
        return False


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
