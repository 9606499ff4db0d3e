"""`python manage.py serve`: daphne on HOST:PORT with the service's WebSocket settings.

The one way the service is started: by `make run`, the Dockerfile and the end-to-end tests.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from registry.core import protocol
from registry.security import modes

# daphne's own frame cap: above it the WebSocket layer drops the connection (the client sees 1006).
# Text frames between MAX_FRAME_BYTES and this get the protocol's FRAME_TOO_LARGE error, relay
# frames between RELAY_MAX_FRAME_BYTES and this RELAY_FRAME_TOO_LARGE.
TRANSPORT_MAX_MESSAGE_BYTES = 2 * protocol.RELAY_MAX_FRAME_BYTES


def endpoint(host: str, port: int, backlog: int) -> str:
    """A Twisted endpoint string: daphne's --bind/--port cannot set the listen backlog.

    Colons separate its fields, so an IPv6 address has each of its own escaped.
    """
    interface = host.strip("[]").replace(":", r"\:")
    return f"tcp:port={int(port)}:interface={interface}:backlog={int(backlog)}"


def daphne_arguments(host: str, port: int) -> list[str]:
    config = settings.RENDEZVOUS
    return [
        "--endpoint",
        endpoint(host, port, config["LISTEN_BACKLOG"]),
        "--websocket_timeout",
        str(config["WEBSOCKET_TIMEOUT"]),
        "--ping-interval",
        str(config["PING_INTERVAL"]),
        "--ping-timeout",
        str(config["PING_TIMEOUT"]),
        "--websocket-max-message-size",
        str(max(TRANSPORT_MAX_MESSAGE_BYTES, config["MAX_FRAME_BYTES"])),
        "--websocket-max-frame-size",
        str(max(TRANSPORT_MAX_MESSAGE_BYTES, config["MAX_FRAME_BYTES"])),
        "--application-close-timeout",
        "10",
        *(["--access-log", "-"] if config["ACCESS_LOG"] else ["--verbosity", "0"]),
        "rendezvous_project.asgi:application",
    ]


class Command(BaseCommand):
    help = "Serve Rendezvous with daphne on HOST:PORT (settings HOST and PORT)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=settings.HOST)
        parser.add_argument("--port", type=int, default=settings.PORT)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        database = settings.DATABASES["default"]
        layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
        self.stdout.write(
            f"Rendezvous on http://{host}:{port}/ (WebSocket /ws/register/<worker_id>), "
            f"database {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}, "
            f"channel layer {layer}, instance {settings.RENDEZVOUS['INSTANCE_NAME']}"
        )
        self.stdout.write(modes.mode_notice(settings.RENDEZVOUS["SECURITY_MODE"]))
        self.stdout.flush()
        os.environ["HOST"], os.environ["PORT"] = host, str(port)  # the instance name uses PORT
        argv = [sys.executable, "-m", "daphne", *daphne_arguments(host, port)]
        # exec: daphne takes this process's PID, so signals from make, Docker or a test reach it.
        os.execv(sys.executable, argv)
