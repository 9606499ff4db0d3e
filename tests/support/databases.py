"""The database the test process uses, as a DATABASE_URL a child server process can open."""

from __future__ import annotations

import os
import socket
from urllib.parse import quote

from django.db import connection


def current_database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    if connection.vendor == "postgresql":
        user = quote(settings.get("USER") or "")
        password = quote(settings.get("PASSWORD") or "")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = settings.get("HOST") or "localhost"
        port = settings.get("PORT") or 5432
        return f"postgres://{auth}{host}:{port}/{settings['NAME']}"
    raise RuntimeError(f"no URL for database vendor {connection.vendor}")


def services_required() -> bool:
    """CI sets RENDEZVOUS_REQUIRE_SERVICES=1: there a missing Redis or PostgreSQL fails."""
    return os.environ.get("RENDEZVOUS_REQUIRE_SERVICES", "") not in ("", "0", "false")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
