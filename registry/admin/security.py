"""Enrolment keys and API tokens in the admin: created with a secret shown once, then only
revoked."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import SafeString

from registry.admin.display import ago, badge
from registry.core import protocol
from registry.models import ApiToken, EnrolmentKey, encode_tags
from registry.security import api_access, enrolment

EXPIRY_CHOICES = [
    ("3600", "1 hour"),
    ("86400", "1 day"),
    ("604800", "7 days"),
    ("2592000", "30 days"),
    ("7776000", "90 days"),
    ("31536000", "1 year"),
]


class EnrolmentKeyForm(forms.ModelForm):
    expires_in = forms.TypedChoiceField(
        choices=EXPIRY_CHOICES, coerce=int, initial="86400", help_text="From now."
    )
    tag_text = forms.CharField(
        label="tags",
        required=False,
        help_text=f"Comma-separated; each {protocol.TAG_RULE}. Copied onto enrolled workers.",
    )

    class Meta:
        model = EnrolmentKey
        fields = ("name", "reusable", "ephemeral")

    def clean_tag_text(self) -> list[str]:
        tags = [t.strip() for t in self.cleaned_data["tag_text"].split(",") if t.strip()]
        bad = [t for t in tags if not protocol.is_valid_tag(t)]
        if bad:
            raise ValidationError(f"not valid tags: {', '.join(bad)} ({protocol.TAG_RULE})")
        encode_tags(tags)  # the total length too
        return tags


class SecretIssuingAdmin(admin.ModelAdmin):
    """Objects created with a secret that is shown once and never stored, then only revoked:
    their terms are what the holders of the secret were given, so nothing is editable."""

    add_fields: tuple[str, ...] = ("name",)
    usage = ""  # one sentence on the page that shows the secret: what to do with it
    actions = ("revoke_selected",)

    def issue(self, request: HttpRequest, form: Any) -> tuple[Any, str]:
        """Create the object (through its service) and return it with its secret."""
        raise NotImplementedError

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.add_fields if obj is None else self.readonly_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.readonly_fields if obj is not None else ()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and obj is None

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        created, secret = self.issue(request, form)
        obj.pk = created.pk
        # On the request, not on the ModelAdmin: one instance serves every admin user at once.
        request.rendezvous_secret = secret  # type: ignore[attr-defined]

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: Any = None
    ) -> HttpResponse:
        """The only place a secret is ever shown: rendered once, never stored (no message
        cookie)."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"{self.model._meta.verbose_name.capitalize()} created",
            "object": obj,
            "secret": request.rendezvous_secret,  # type: ignore[attr-defined]
            "usage": self.usage,
        }
        response = TemplateResponse(request, "admin/registry/secret_created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, obj: Any) -> SafeString | str:
        return ago(obj.last_used_at)


@admin.register(EnrolmentKey)
class EnrolmentKeyAdmin(SecretIssuingAdmin):
    list_display = (
        "name",
        "prefix",
        "state_badge",
        "reusable",
        "ephemeral",
        "tags_display",
        "use_count",
        "expires_at",
        "last_used",
    )
    list_filter = ("reusable", "ephemeral", "revoked_at")
    search_fields = ("name", "prefix", "tags")
    readonly_fields = (
        "name",
        "prefix",
        "state_badge",
        "reusable",
        "ephemeral",
        "tags_display",
        "expires_at",
        "use_count",
        "last_used",
        "created_at",
        "created_by",
        "revoked_at",
    )
    add_fields = ("name", "reusable", "ephemeral", "tag_text", "expires_in")
    usage = (
        "Give it to the workers to enrol: RENDEZVOUS_ENROLMENT_KEY=<key> "
        "python -m worker_agent, or WorkerAgent(url, enrolment_key=...)."
    )

    def get_form(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = EnrolmentKeyForm
        return super().get_form(request, obj, **kwargs)

    def issue(self, request: HttpRequest, form: Any) -> tuple[EnrolmentKey, str]:
        return enrolment.create_enrolment_key(
            name=form.cleaned_data["name"],
            reusable=form.cleaned_data["reusable"],
            ephemeral=form.cleaned_data["ephemeral"],
            tags=form.cleaned_data["tag_text"],
            expires_in=timedelta(seconds=form.cleaned_data["expires_in"]),
            created_by_id=request.user.pk,
        )

    @admin.display(description="state")
    def state_badge(self, key: EnrolmentKey) -> SafeString:
        return badge(key.state(timezone.now()))

    @admin.display(description="tags")
    def tags_display(self, key: EnrolmentKey) -> str:
        return ", ".join(key.tag_list) or "-"

    @admin.action(
        description="Revoke selected keys (enrolled workers keep their credentials)",
        permissions=["change"],
    )
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[EnrolmentKey]) -> None:
        count = enrolment.revoke_enrolment_keys(queryset.values_list("pk", flat=True))
        self.message_user(request, f"{count} key(s) revoked.", messages.SUCCESS)


class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ("name",)


@admin.register(ApiToken)
class ApiTokenAdmin(SecretIssuingAdmin):
    list_display = ("name", "prefix", "state_badge", "created_at", "created_by", "last_used")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    form = ApiTokenForm
    readonly_fields = (
        "name",
        "prefix",
        "state_badge",
        "created_at",
        "created_by",
        "last_used",
        "revoked_at",
    )
    usage = (
        "Send it as 'Authorization: Bearer <token>' to /api/workers/, "
        "/debug/list_workers and /metrics."
    )

    def issue(self, request: HttpRequest, form: Any) -> tuple[ApiToken, str]:
        return api_access.create_api_token(
            name=form.cleaned_data["name"], created_by_id=request.user.pk
        )

    @admin.display(description="state")
    def state_badge(self, token: ApiToken) -> SafeString:
        return badge("revoked" if token.revoked_at else "active")

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = api_access.revoke_api_tokens(queryset.values_list("pk", flat=True))
        self.message_user(request, f"{count} token(s) revoked.", messages.SUCCESS)
