"""`python manage.py runstun`: the service's STUN responder (UDP), so workers need nobody else's.

Give it a second port (or a second address) and agents can tell an endpoint-independent NAT from
a symmetric one. The defaults come from the environment, not from settings, so the responder can
run on a host that has no database configured: STUN_HOST, STUN_PORT, STUN_SECOND_PORT and
STUN_SECOND_HOST (the last two optional; empty means one listener).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from django.core.management.base import BaseCommand, CommandError

from registry.peering.stun.responder import ALL_ADDRESSES, DEFAULT_PORT, listeners_from, run


def _env_port(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise CommandError(f"{name} must be a port number, not {value!r}") from None


class Command(BaseCommand):
    help = (
        "Answer STUN Binding requests (RFC 5389) on UDP HOST:PORT and, with --second-port or "
        "--second-host, on a second listener for NAT mapping checks. Runs until SIGTERM/SIGINT."
    )
    # Nothing here touches the database or the channel layer.
    requires_system_checks: ClassVar[list[str]] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("STUN_HOST") or ALL_ADDRESSES)
        parser.add_argument("--port", type=int, default=None, help="default: STUN_PORT or 3478")
        parser.add_argument(
            "--second-port", type=int, default=None, help="default: STUN_SECOND_PORT or none"
        )
        parser.add_argument(
            "--second-host", default=None, help="default: STUN_SECOND_HOST or --host"
        )

    def handle(
        self,
        *args: Any,
        host: str,
        port: int | None,
        second_port: int | None,
        second_host: str | None,
        **options: Any,
    ) -> None:
        port = port if port is not None else _env_port("STUN_PORT", DEFAULT_PORT)
        if second_port is None:
            second_port = _env_port("STUN_SECOND_PORT", None)
        second_host = second_host or os.environ.get("STUN_SECOND_HOST") or None
        assert port is not None
        try:
            listeners = listeners_from(host, port, second_port, second_host)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            run(listeners)
        except OSError as exc:
            raise CommandError(f"cannot listen on {listeners}: {exc}") from exc
