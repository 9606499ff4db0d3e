"""JSON views. Thin: parse the query, call a selector, answer JSON (errors too)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.dateparse import parse_datetime
from django.views.decorators.csrf import csrf_exempt

from registry.core import protocol
from registry.models import PeerConnectionOutcome, WorkerStatus
from registry.ops import metrics
from registry.peering import records
from registry.presence import selectors
from registry.security.api_access import protected

log = logging.getLogger("registry.views")

READY_TIMEOUT = 2.0


def json_error(status: int, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, "status": status, **extra}, status=status)


def get_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """Like `require_GET`, with a JSON 405. Works for sync and async views alike."""

    def refuse(request: HttpRequest) -> JsonResponse | None:
        if request.method in ("GET", "HEAD"):
            return None
        response = json_error(405, f"method {request.method} not allowed")
        response["Allow"] = "GET, HEAD"
        return response

    # csrf_exempt: these views change nothing, and a POST must get the JSON 405, not the CSRF
    # middleware's 403 page.
    if asyncio.iscoroutinefunction(view):

        @wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return refuse(request) or await view(request, *args, **kwargs)

        return csrf_exempt(async_wrapper)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return refuse(request) or view(request, *args, **kwargs)

    return csrf_exempt(wrapper)


@get_only
def service_info(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "message": "Rendezvous is running. Workers connect at /ws/register/{worker_id}",
            "service": "rendezvous",
            "protocol_version": protocol.PROTOCOL_VERSION,
            "websocket": "/ws/register/{worker_id}",
            "endpoints": [
                "/debug/list_workers",
                "/api/workers/",
                "/api/workers/{worker_id}/",
                "/api/peer-connections/",
                "/healthz",
                "/readyz",
                "/metrics",
                "/admin/",
            ],
        }
    )


@get_only
@protected
def debug_list_workers(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.poc_worker_listing())


def _positive_int(request: HttpRequest, name: str, default: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # isdigit alone takes "²"
        raise ValueError(f"'{name}' must be a positive integer")
    return int(raw)


@get_only
@protected
def worker_list(request: HttpRequest) -> JsonResponse:
    config = settings.RENDEZVOUS
    status_param = request.GET.get("status") or None
    if status_param is not None and status_param not in WorkerStatus.values:
        return json_error(400, f"'status' must be one of {', '.join(WorkerStatus.values)}")
    try:
        page = _positive_int(request, "page", 1)
        page_size = _positive_int(request, "page_size", config["API_PAGE_SIZE"])
    except ValueError as exc:
        return json_error(400, str(exc))
    page_size = min(page_size, config["API_MAX_PAGE_SIZE"])
    tag = request.GET.get("tag") or None
    if tag is not None and not protocol.is_valid_tag(tag):
        return json_error(400, f"'tag' must be {protocol.TAG_RULE}")
    tag = tag.lower() if tag else None
    status = WorkerStatus(status_param) if status_param else None
    result = selectors.list_workers(status=status, page=page, page_size=page_size, tag=tag)
    return _page(request, result, page)


@get_only
@protected
def peer_connection_list(request: HttpRequest) -> JsonResponse:
    """Recorded peer connections, newest first: `worker`, `outcome`, `path_kind`, `since`."""
    config = settings.RENDEZVOUS
    try:
        page = _positive_int(request, "page", 1)
        page_size = min(
            _positive_int(request, "page_size", config["API_PAGE_SIZE"]),
            config["API_MAX_PAGE_SIZE"],
        )
    except ValueError as exc:
        return json_error(400, str(exc))
    worker = request.GET.get("worker") or None
    if worker is not None and not protocol.is_valid_worker_id(worker):
        return json_error(400, "'worker' must be a worker id")
    outcome = request.GET.get("outcome") or None
    if outcome is not None and outcome not in PeerConnectionOutcome.values:
        outcomes = ", ".join(PeerConnectionOutcome.values)
        return json_error(400, f"'outcome' must be one of {outcomes}")
    path_kind = request.GET.get("path_kind") or None
    if path_kind is not None and path_kind not in set(protocol.PathKind):
        kinds = ", ".join(str(kind) for kind in protocol.PathKind)
        return json_error(400, f"'path_kind' must be one of {kinds}")
    since = None
    if request.GET.get("since"):
        since = parse_datetime(request.GET["since"])
        if since is None or since.tzinfo is None:
            return json_error(400, "'since' must be an ISO 8601 time with its offset")
    result = records.list_peer_connections(
        page=page,
        page_size=page_size,
        worker=worker,
        outcome=outcome,
        path_kind=path_kind,
        since=since,
    )
    return _page(request, result, page)


def _page(request: HttpRequest, result: selectors.Page, page: int) -> JsonResponse:
    if page > result.num_pages:
        return json_error(404, f"page {page} is past the last page ({result.num_pages})")

    def link(number: int) -> str:
        query = request.GET.copy()
        query["page"] = str(number)
        return request.build_absolute_uri(f"{request.path}?{query.urlencode()}")

    return JsonResponse(
        {
            "count": result.count,
            "page": result.page,
            "page_size": result.page_size,
            "num_pages": result.num_pages,
            "next": link(page + 1) if page < result.num_pages else None,
            "previous": link(page - 1) if page > 1 else None,
            "results": result.results,
        }
    )


@get_only
@protected
def worker_detail(request: HttpRequest, worker_id: str) -> JsonResponse:
    detail = selectors.worker_detail(worker_id)
    if detail is None:
        return json_error(404, f"no worker {worker_id!r}")
    return JsonResponse(detail)


@get_only
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@get_only
@protected
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE)


def _database_ready() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _channel_layer_ready() -> None:
    layer = get_channel_layer()
    # The default "specific." prefix: channels-redis then reads it with the same receive loop
    # as the consumers' channels instead of queueing behind that loop's 5 s BRPOP.
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.ping"})
    await layer.receive(channel)


@get_only
async def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", database_sync_to_async(_database_ready)),
        ("channel_layer", _channel_layer_ready),
    ):
        try:
            await asyncio.wait_for(check(), READY_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which and why
            log.warning("readyz: %s not ready: %s", name, exc)
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error(400, "bad request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error(403, "forbidden")


def csrf_failure(request: HttpRequest, reason: str = "") -> JsonResponse:
    return json_error(403, f"CSRF check failed: {reason}")


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error(404, f"no such path: {request.path}")


def handler500(request: HttpRequest) -> JsonResponse:
    return json_error(500, "internal server error")
