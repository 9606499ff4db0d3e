"""ASGI entry point: HTTP (JSON views, admin, static assets) and the worker WebSocket."""

import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rendezvous_project.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from registry.ops import websocket_server  # noqa: E402
from registry.presence.housekeeping import install_graceful_shutdown  # noqa: E402
from registry.presence.runtime import get_runtime  # noqa: E402
from registry.routing import websocket_urlpatterns  # noqa: E402
from registry.security import modes  # noqa: E402

websocket_server.install()

application = ProtocolTypeRouter(
    {
        # Admin assets are served by the app itself: one process, styled pages, no extra server.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

_mode = settings.RENDEZVOUS["SECURITY_MODE"]
logging.getLogger("registry.security").log(
    logging.WARNING if _mode == modes.OPEN else logging.INFO, modes.mode_notice(_mode)
)

if settings.RENDEZVOUS["HOUSEKEEPING"]:
    get_runtime().start_housekeeping()
    install_graceful_shutdown(get_runtime())
