"""Where a connection comes from, as the service sees it."""

from __future__ import annotations

import ipaddress
from typing import Any


def observed_address(scope: dict[str, Any]) -> tuple[str | None, int | None]:
    """The peer's IP literal and port from an ASGI scope (tests' scopes may have no `client`)."""
    client = scope.get("client")
    if not client:
        return None, None
    host, port = client[0], client[1]
    try:
        address = ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return None, None  # a unix socket path or a name: nothing worth storing as an address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.compressed, int(port) if port is not None else None
