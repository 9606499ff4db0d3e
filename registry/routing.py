from channels.generic.websocket import AsyncWebsocketConsumer
from django.urls import re_path

from registry.presence.consumer import RegisterConsumer


class RefuseConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: refused at the handshake (HTTP 403), like a bad worker id."""

    channel_layer_alias = None

    async def connect(self) -> None:
        await self.close()


# Everything after /ws/register/ reaches the consumer (slashes too), so a bad id gets the
# documented refusal, not a routing error.
websocket_urlpatterns = [
    re_path(r"^ws/register/(?P<worker_id>.*)$", RegisterConsumer.as_asgi()),
    re_path(r"", RefuseConsumer.as_asgi()),
]
