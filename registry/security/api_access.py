"""Who may read the registry over HTTP: in secured mode, a staff session or an API token.

API tokens are admin-managed bearer tokens for scripts and Prometheus
(`Authorization: Bearer rvt_...`); like every secret here only their digest is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from registry.core import tokens
from registry.models import ApiToken
from registry.ops import metrics
from registry.security import modes

log = logging.getLogger("registry.api_access")

# `last_used_at` is refreshed at most this often: a scrape every 15 s must not write each time.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def create_api_token(
    *, name: str, created_by_id: int | None = None, now: datetime | None = None
) -> tuple[ApiToken, str]:
    """A new token and its secret, which is not stored and cannot be shown again."""
    issued = tokens.issue(tokens.Kind.API_TOKEN)
    token = ApiToken.objects.create(
        name=name,
        digest=issued.digest,
        prefix=issued.display_prefix,
        created_at=now or timezone.now(),
        created_by_id=created_by_id,
    )
    log.info("API token %s (%s) created", token.prefix, name)
    return token, issued.secret


def revoke_api_tokens(token_ids: Iterable[int], *, now: datetime | None = None) -> int:
    return ApiToken.objects.filter(pk__in=list(token_ids), revoked_at__isnull=True).update(
        revoked_at=now or timezone.now()
    )


def authenticate_api_token(secret: str, *, now: datetime | None = None) -> ApiToken | None:
    if tokens.kind_of(secret) is not tokens.Kind.API_TOKEN:
        return None
    now = now or timezone.now()
    token = ApiToken.objects.active().filter(digest=tokens.digest(secret)).first()
    if token is not None and (
        token.last_used_at is None or token.last_used_at < now - LAST_USED_RESOLUTION
    ):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def may_read_registry(request: HttpRequest) -> bool:
    if settings.RENDEZVOUS["SECURITY_MODE"] != modes.SECURED:
        return True
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    bearer = tokens.parse_bearer(request.headers.get("Authorization", ""))
    return bearer is not None and authenticate_api_token(bearer) is not None


def protected(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Secured mode: answer 401 (JSON, with a Bearer challenge) unless the caller may read."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if may_read_registry(request):
            return view(request, *args, **kwargs)
        metrics.api_refused()
        log.warning(
            "%s %s refused: no staff session or valid API token", request.method, request.path
        )
        response = JsonResponse(
            {
                "error": "authentication required: a staff session or an API token "
                "(Authorization: Bearer rvt_...)",
                "status": 401,
            },
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="rendezvous"'
        return response

    return wrapper
