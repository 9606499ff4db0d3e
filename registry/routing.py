from django.urls import re_path

from registry.consumers import RegisterConsumer

# Any path segment reaches the consumer, so a bad id gets the documented refusal, not a 404.
websocket_urlpatterns = [
    re_path(r"^ws/register/(?P<worker_id>[^/]+)/?$", RegisterConsumer.as_asgi()),
]
