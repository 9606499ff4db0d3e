"""The peer policy in the admin: its rules, what each one names that the registry does not know,
and "may A reach B, and which rule says so?" (registry/core/peer_policy.py, docs/peer-policy.md)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.html import format_html_join
from django.utils.safestring import SafeString

from registry.core import peer_policy, protocol
from registry.models import PeerRule
from registry.peering import reach, rules
from registry.presence import selectors


def policy_mode() -> str:
    return str(settings.RENDEZVOUS["PEER_POLICY"])


class PairForm(forms.Form):
    source = forms.CharField(label="May worker", max_length=protocol.WORKER_ID_MAX_LENGTH)
    destination = forms.CharField(label="reach worker", max_length=protocol.WORKER_ID_MAX_LENGTH)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for field in ("source", "destination"):
            value = data.get(field)
            if value and not protocol.is_valid_worker_id(value):
                self.add_error(field, "not a worker id (1-128 of A-Z a-z 0-9 . _ -)")
        return data


@admin.register(PeerRule)
class PeerRuleAdmin(admin.ModelAdmin):
    list_display = (
        "number",
        "description",
        "sources",
        "destinations",
        "enabled",
        "warnings_display",
        "updated_at",
    )
    list_display_links = ("number", "description")
    list_editable = ("enabled",)
    list_filter = ("enabled",)
    search_fields = ("description", "sources", "destinations")
    fields = ("description", "sources", "destinations", "enabled", "warnings_display")
    readonly_fields = ("warnings_display",)
    actions = ("enable_selected", "disable_selected")
    change_list_template = "admin/registry/peerrule/change_list.html"

    def get_urls(self) -> list[URLPattern]:
        check = path(
            "check/",
            self.admin_site.admin_view(self.check_view),
            name="registry_peerrule_check",
        )
        return [check, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {"policy_mode": policy_mode(), **(extra_context or {})}
        return super().changelist_view(request, extra_context=context)

    def save_model(self, request: HttpRequest, obj: PeerRule, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        for warning in reach.rule_warnings(obj.sources, obj.destinations):
            self.message_user(request, f"Rule #{obj.pk}: {warning}.", messages.WARNING)
        if policy_mode() == peer_policy.ALLOW_ALL:
            self.message_user(
                request,
                "RENDEZVOUS_PEER_POLICY is allow-all: rules take effect once it is rules.",
                messages.WARNING,
            )

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        """The page of rules, with the warnings of all of them found in two queries."""
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)
        found = reach.rules_warnings([(rule.sources, rule.destinations) for rule in page])
        for rule, warnings in zip(page, found, strict=True):
            rule.listed_warnings = warnings
        return changelist

    @admin.display(description="#", ordering="id")
    def number(self, rule: PeerRule) -> str:
        return f"#{rule.pk}"

    @admin.display(description="warnings")
    def warnings_display(self, rule: PeerRule) -> SafeString | str:
        if rule.pk is None:
            return "-"
        warnings = getattr(rule, "listed_warnings", None)  # the list's page: worked out at once
        if warnings is None:
            warnings = reach.rule_warnings(rule.sources, rule.destinations)
        if not warnings:
            return "-"
        return format_html_join(
            "",
            '<div class="rv-warning" style="color:#8a5a00">&#9888; {}</div>',
            ((warning,) for warning in warnings),
        )

    @admin.action(description="Enable selected rules", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[PeerRule]) -> None:
        count = _set_enabled(queryset, True)
        self.message_user(request, f"{count} rule(s) enabled.", messages.SUCCESS)

    @admin.action(
        description="Disable selected rules (ends the connections only they allowed)",
        permissions=["change"],
    )
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[PeerRule]) -> None:
        count = _set_enabled(queryset, False)
        self.message_user(request, f"{count} rule(s) disabled.", messages.SUCCESS)

    def check_view(self, request: HttpRequest) -> TemplateResponse:
        """May A reach B, under the rules as they are now, and which rule says so?"""
        form = PairForm(request.GET or None)
        result = None
        if form.is_bound and form.is_valid():
            source, destination = form.cleaned_data["source"], form.cleaned_data["destination"]
            pair = reach.subject(source), reach.subject(destination)
            decision = rules.decide(rules.load(), *pair)
            # Under allow-all, what the rules would say once enforced: to try them out first.
            by_rules = (
                rules.decide(rules.load(peer_policy.RULES), *pair)
                if policy_mode() == peer_policy.ALLOW_ALL
                else None
            )
            unknown = [w for w in (source, destination) if not selectors.worker_exists(w)]
            result = {
                "source": source,
                "destination": destination,
                "decision": decision,
                "by_rules": by_rules,
                "unknown": unknown,
            }
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "May one worker reach another?",
            "form": form,
            "result": result,
            "policy_mode": policy_mode(),
        }
        return TemplateResponse(request, "admin/registry/peerrule/check.html", context)


def _set_enabled(queryset: QuerySet[PeerRule], enabled: bool) -> int:
    """One rule at a time, saved: each save announces the change to every instance."""
    count = 0
    for rule in queryset:
        if rule.enabled != enabled:
            rule.enabled = enabled
            rule.save(update_fields=["enabled", "updated_at"])
            count += 1
    return count
