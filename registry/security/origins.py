"""Which browser pages may open a worker WebSocket (cross-site WebSocket hijacking).

Workers are programs: the PoC's `websockets` client sends no `Origin`, websocket-client sends
its own target's origin. A browser always sends the page's origin, so a page on another site
would otherwise drive a visitor's browser into registering (and superseding) worker ids. A
handshake is allowed with no `Origin`, with an origin whose host is one of ALLOWED_HOSTS (the
service's own names), or with one listed in RENDEZVOUS_ALLOWED_ORIGINS; any other is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from django.http.request import validate_host


def origin_allowed(
    scope: dict[str, Any], *, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]
) -> bool:
    origins = [value for key, value in scope.get("headers", []) if key.lower() == b"origin"]
    if not origins:
        return True
    origin = origins[0].decode("latin-1").strip()
    if origin in allowed_origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        return False  # includes the literal "null" of sandboxed pages and file:// documents
    return validate_host(parts.hostname, list(allowed_hosts))
