"""The benchmark's floor: a bare Channels consumer on daphne, the registry in memory. What the
mandated stack costs before the service does anything of its own (no database, no channel layer,
no Django views). Not part of the service.

    python -m daphne -e tcp:port=8002:interface=127.0.0.1:backlog=2048 floor_channels:application
    (run from bench/, or with bench/ on PYTHONPATH)
"""

from __future__ import annotations

import json
from typing import Any

import django
from django.conf import settings

settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], INSTALLED_APPS=["channels"], CHANNEL_LAYERS={})
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402
from memory_registry import MemoryRegistry  # noqa: E402

registry = MemoryRegistry()


class BareConsumer(AsyncWebsocketConsumer):
    channel_layer_alias = None  # no channel layer: nothing but the socket
    worker_id = ""

    async def connect(self) -> None:
        self.worker_id = self.scope["url_route"]["kwargs"]["worker_id"]
        await self.accept()
        await self.send(registry.connect(self.worker_id, self.scope.get("client")))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send(registry.receive(self.worker_id, text_data or ""))

    async def disconnect(self, code: int) -> None:
        registry.disconnect(self.worker_id)


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The three JSON reads the benchmark makes, as a bare ASGI callable."""
    query = dict(
        part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
    )
    if scope["path"] == "/debug/list_workers":
        body: Any = registry.debug_listing()
    elif scope["path"] == "/api/workers/":
        body = registry.api_listing(int(query.get("page", 1)), int(query.get("page_size", 100)))
    else:
        body = {"status": "ok"}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter([path("ws/register/<str:worker_id>", BareConsumer.as_asgi())]),
    }
)
