"""Workers in the admin: the list with its overview, a worker's page (its connections, its peer
policy reach, its peer connections) and the operator's actions on workers. Observed fields are
read-only: editing them would lie.

Every list column reads only the row and its `list_select_related` joins, so a page costs a
fixed number of queries however many workers it shows (tests/test_admin.py counts them).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from registry.admin.display import ago, badge
from registry.core import certificates
from registry.core.peer_policy import ALLOW_ALL
from registry.models import Connection, ServerInstance, Worker
from registry.ops import control
from registry.ops.overview import registry_overview
from registry.peering import reach, records
from registry.presence.selectors import RECENT_CONNECTIONS
from registry.security import bans, enrolment, identities

OBSERVED_WORKER_FIELDS = (
    "id",
    "status_badge",
    "first_seen",
    "last_seen_ago",
    "observed_ip",
    "observed_port",
    "public_ip",
    "public_ip_reported_at",
    "agent_info_display",
    "current_connection",
    "all_connections",
    "tags_display",
    "ephemeral",
    "enrolment",
    "disabled_state",
    "nat_mapping",
    "udp_endpoint",
    "port_mapping",
    "nat_reported_at",
    "identity",
    "certificate_bound_at",
    "may_reach",
    "reachable_from",
    "peer_connections",
)


def connections_url(worker_id: str) -> str:
    query = urlencode({"worker__id__exact": worker_id})
    return f"{reverse('admin:registry_connection_changelist')}?{query}"


class LastSeenFilter(admin.SimpleListFilter):
    title = "last seen"
    parameter_name = "seen"
    windows = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [
            ("1h", "in the last hour"),
            ("24h", "in the last 24 hours"),
            ("7d", "in the last 7 days"),
            ("older", "more than 7 days ago"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Worker]) -> QuerySet[Worker]:
        now = timezone.now()
        if self.value() in self.windows:
            return queryset.filter(last_seen__gte=now - self.windows[self.value()])
        if self.value() == "older":
            return queryset.filter(last_seen__lt=now - self.windows["7d"])
        return queryset


class HeldByInstanceFilter(admin.SimpleListFilter):
    """Running instances only: the stopped ones hold nobody, and restarts pile up."""

    title = "server instance"
    parameter_name = "instance"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(i.id, str(i)) for i in ServerInstance.objects.running().order_by("name")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Worker]) -> QuerySet[Worker]:
        if self.value():
            return queryset.filter(current_connection__instance_id=self.value())
        return queryset


class DisabledFilter(admin.SimpleListFilter):
    title = "access"
    parameter_name = "access"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("disabled", "disabled"), ("enrolled", "enrolled"), ("unenrolled", "not enrolled")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Worker]) -> QuerySet[Worker]:
        if self.value() == "disabled":
            return queryset.filter(disabled_at__isnull=False)
        if self.value() == "enrolled":
            return queryset.exclude(credential_digest="")
        if self.value() == "unenrolled":
            return queryset.filter(credential_digest="")
        return queryset


class RecentConnectionsFormSet(BaseInlineFormSet):
    """A worker's most recent connections only: a flapping worker has thousands."""

    def get_queryset(self) -> QuerySet[Connection]:
        if not hasattr(self, "_recent"):
            self._recent = super().get_queryset()[:RECENT_CONNECTIONS]
        return self._recent


class ConnectionInline(admin.TabularInline):
    model = Connection
    formset = RecentConnectionsFormSet
    verbose_name_plural = f"recent connections (latest {RECENT_CONNECTIONS})"
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
        "status_badge",
        "last_seen_ago",
        "observed_address",
        "public_ip",
        "nat_mapping",
        "held_by",
        "connections_link",
    )
    list_filter = (
        "status",
        LastSeenFilter,
        HeldByInstanceFilter,
        DisabledFilter,
        "ephemeral",
        "nat_mapping",
    )
    list_select_related = ("current_connection__instance",)
    search_fields = ("id", "observed_ip", "public_ip", "tags")
    # Connected first, then the most recently seen: the rows an operator is asking about.
    ordering = ("status", "-last_seen", "id")
    readonly_fields = OBSERVED_WORKER_FIELDS
    fields = OBSERVED_WORKER_FIELDS
    inlines = (ConnectionInline,)
    actions = (
        "disconnect_selected",
        "disable_selected",
        "enable_selected",
        "forget_credentials",
        "reset_identities",
    )
    list_per_page = 100
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # workers exist because they connected

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {
            "overview": registry_overview(now=timezone.now()),
            "policy_mode": settings.RENDEZVOUS["PEER_POLICY"],
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Every field is observed, so there is nothing to save: no Save buttons that lie, and
        # a title that does not offer to change it.
        context = {
            "show_save": False,
            "show_save_and_continue": False,
            "title": "View worker",
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra_context=context)

    def get_urls(self) -> list[URLPattern]:
        disconnect = path(
            "<path:object_id>/disconnect/",
            self.admin_site.admin_view(require_POST(self.disconnect_view)),
            name="registry_worker_disconnect",
        )
        return [disconnect, *super().get_urls()]

    def disconnect_view(self, request: HttpRequest, object_id: str) -> HttpResponseRedirect:
        """The worker page's "Disconnect now" button: the action, for one worker."""
        worker = self.get_object(request, unquote(object_id))
        if worker is None:
            raise Http404(f"no worker {object_id!r}")
        if not self.has_change_permission(request, worker):
            raise PermissionDenied
        if control.disconnect_worker(worker.id):
            self.message_user(request, f"Disconnect sent to worker {worker.id}.", messages.SUCCESS)
        else:
            self.message_user(request, f"Worker {worker.id} was not connected.", messages.WARNING)
        return redirect("admin:registry_worker_change", quote(worker.pk))

    @admin.display(description="status", ordering="status")
    def status_badge(self, worker: Worker) -> SafeString:
        if worker.is_disabled:
            return format_html("{} {}", badge(worker.status), badge("disabled"))
        return badge(worker.status)

    @admin.display(description="tags")
    def tags_display(self, worker: Worker) -> str:
        return ", ".join(worker.tag_list) or "-"

    @admin.display(description="enrolment")
    def enrolment(self, worker: Worker) -> SafeString | str:
        if not worker.has_credential:
            return "not enrolled (no credential bound)"
        key = worker.enrolled_with
        return format_html(
            "credential {}… issued {}{}",
            worker.credential_prefix,
            ago(worker.credential_issued_at),
            format_html(
                ' with key <a href="{}">{}</a>',
                reverse("admin:registry_enrolmentkey_change", args=[key.pk]),
                key,
            )
            if key
            else "",
        )

    @admin.display(description="disabled")
    def disabled_state(self, worker: Worker) -> SafeString | str:
        if not worker.is_disabled:
            return "no"
        return format_html(
            "{} {}",
            ago(worker.disabled_at),
            f"({worker.disabled_reason})" if worker.disabled_reason else "",
        )

    @admin.display(description="last seen", ordering="last_seen")
    def last_seen_ago(self, worker: Worker) -> SafeString | str:
        return ago(worker.last_seen)

    @admin.display(description="observed address", ordering="observed_ip")
    def observed_address(self, worker: Worker) -> str:
        if worker.observed_ip is None:
            return "-"
        host = f"[{worker.observed_ip}]" if ":" in worker.observed_ip else worker.observed_ip
        return f"{host}:{worker.observed_port}" if worker.observed_port else host

    @admin.display(description="UDP endpoint (STUN)")
    def udp_endpoint(self, worker: Worker) -> str:
        if worker.udp_ip is None:
            return "-"
        host = f"[{worker.udp_ip}]" if ":" in worker.udp_ip else worker.udp_ip
        return f"{host}:{worker.udp_port}"

    @admin.display(description="port mapping (router)")
    def port_mapping(self, worker: Worker) -> str:
        if not worker.port_mapping_protocol:
            return "-"
        host = worker.port_mapping_ip or "?"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{worker.port_mapping_port} ({worker.port_mapping_protocol})"

    @admin.display(description="held by")
    def held_by(self, worker: Worker) -> SafeString | str:
        connection = worker.current_connection
        if not worker.is_connected or connection is None or connection.instance is None:
            return "-"
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:registry_serverinstance_change", args=[connection.instance_id]),
            connection.instance.name,
        )

    @admin.display(description="connections")
    def connections_link(self, worker: Worker) -> SafeString:
        return format_html('<a href="{}">history</a>', connections_url(worker.id))

    @admin.display(description="connection history")
    def all_connections(self, worker: Worker) -> SafeString:
        count = Connection.objects.filter(worker_id=worker.id).count()
        return format_html(
            '<a href="{}">all {} connection(s) of {}</a> (below: the latest {})',
            connections_url(worker.id),
            count,
            worker.id,
            RECENT_CONNECTIONS,
        )

    @admin.action(
        description="Disconnect selected workers now (close code 4001)", permissions=["change"]
    )
    def disconnect_selected(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        selected = list(queryset.values_list("id", flat=True))
        requested = [worker_id for worker_id in selected if control.disconnect_worker(worker_id)]
        skipped = len(selected) - len(requested)
        if requested:
            self.message_user(
                request, f"Disconnect sent to {len(requested)} worker(s).", messages.SUCCESS
            )
        if skipped:
            self.message_user(request, f"{skipped} worker(s) were not connected.", messages.WARNING)

    @admin.action(
        description="Disable selected workers: close now (4011) and refuse from now on",
        permissions=["change"],
    )
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        disabled = control.disable_and_disconnect(
            list(queryset.values_list("id", flat=True)), reason=f"by {request.user}"
        )
        self.message_user(request, f"{len(disabled)} worker(s) disabled.", messages.SUCCESS)

    @admin.action(description="Enable selected workers again", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        count = bans.mark_enabled(queryset.values_list("id", flat=True))
        self.message_user(request, f"{count} worker(s) enabled.", messages.SUCCESS)

    @admin.action(
        description="Forget credentials of selected workers (they may enrol again with a key)",
        permissions=["change"],
    )
    def forget_credentials(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        count = enrolment.forget_credentials(queryset.values_list("id", flat=True))
        self.message_user(request, f"{count} credential(s) forgotten.", messages.SUCCESS)

    @admin.action(
        description="Reset identities of selected workers (each binds its next certificate)",
        permissions=["change"],
    )
    def reset_identities(self, request: HttpRequest, queryset: QuerySet[Worker]) -> None:
        count = identities.reset(list(queryset.values_list("id", flat=True)))
        self.message_user(
            request,
            f"{count} identity(ies) reset; peers will pin the certificate each presents next.",
            messages.SUCCESS,
        )

    @admin.display(description="identity (SHA-256)")
    def identity(self, worker: Worker) -> str:
        return certificates.display(worker.certificate_fingerprint) or "none (no certificate yet)"

    @admin.display(description="agent info")
    def agent_info_display(self, worker: Worker) -> SafeString | str:
        if not worker.agent_info:
            return "-"
        text = json.dumps(worker.agent_info, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre class="rv-agent-info" style="margin:0">{}</pre>', text)

    @admin.display(description="may reach (peer policy)")
    def may_reach(self, worker: Worker) -> SafeString | str:
        return _worker_links(worker, "reach", outward=True)

    @admin.display(description="may be reached by (peer policy)")
    def reachable_from(self, worker: Worker) -> SafeString | str:
        return _worker_links(worker, "be reached by", outward=False)

    @admin.display(description="peer connections")
    def peer_connections(self, worker: Worker) -> SafeString:
        counts = records.peer_connection_counts(worker.pk)
        url = reverse("admin:registry_peerconnection_changelist")
        link = f"{url}?{urlencode({'worker': worker.pk})}"
        summary = ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count)
        return format_html(
            '<a href="{}">{} as requester or target</a>{}',
            link,
            sum(counts.values()),
            f" ({summary})" if summary else "",
        )


REACH_SHOWN = 50


def _worker_links(worker: Worker, verb: str, *, outward: bool) -> SafeString | str:
    """The workers of the registry `worker` may reach (outward) or be reached by, linked."""
    if settings.RENDEZVOUS["PEER_POLICY"] == ALLOW_ALL:
        return f"every worker (RENDEZVOUS_PEER_POLICY is allow-all): may {verb} any other"
    ids, count = reach.worker_reach(worker.pk, worker.tag_list, outward=outward, limit=REACH_SHOWN)
    if not count:
        return "no worker (no enabled rule allows it)"
    shown = format_html_join(
        ", ",
        '<a href="{}">{}</a>',
        ((reverse("admin:registry_worker_change", args=[quote(i)]), i) for i in ids),
    )
    more = count - len(ids)
    return format_html("{}{}", shown, f" and {more} more" if more > 0 else "")
