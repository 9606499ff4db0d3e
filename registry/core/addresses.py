"""Where a connection comes from, as the service sees it, and whether to believe a proxy.

Behind a load balancer or reverse proxy (Cloud Run included) the socket's peer is the proxy;
the client's address is in `X-Forwarded-For`. That header is believed only when the direct
peer is in `RENDEZVOUS_TRUSTED_PROXIES`, and then read from the right: each trusted proxy
appends the address it saw, so the first address from the right that is not itself a trusted
proxy is the client. Whatever a client writes into the header itself sits further left and is
never taken.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> list[Network]:
    """`RENDEZVOUS_TRUSTED_PROXIES` entries ("10.0.0.0/8", "203.0.113.7") as networks."""
    return [ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip()]


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except (ValueError, TypeError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: Sequence[Network]) -> bool:
    return any(address in network for network in proxies)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", []) if key.lower() == name]
    return b",".join(values).decode("latin-1") if values else None


def observed_address(
    scope: dict[str, Any], trusted_proxies: Sequence[Network] = ()
) -> tuple[str | None, int | None]:
    """The client's IP literal and port: the socket's peer, or, when that peer is a trusted
    proxy, the client it forwarded for (port unknown then). Scopes from tests may lack `client`."""
    client = scope.get("client")
    if not client:
        return None, None
    peer = _address(str(client[0]))
    if peer is None:
        return None, None  # a unix socket path or a name: nothing worth storing as an address
    port = int(client[1]) if client[1] is not None else None
    if not trusted_proxies or not _trusted(peer, trusted_proxies):
        return peer.compressed, port
    forwarded = _header(scope, b"x-forwarded-for")
    if not forwarded:
        return peer.compressed, port
    for hop in reversed(forwarded.split(",")):
        address = _address(hop)
        if address is None:
            break  # garbage in the chain: stop believing it and keep the last good hop
        if not _trusted(address, trusted_proxies):
            return address.compressed, None
        peer = address
    return peer.compressed, None
