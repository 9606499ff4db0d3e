"""Which kind a working pair of host candidates is: `lan` or `direct`.

Two host candidates that reach each other are not always on one LAN: two workers with global
IPv6 addresses on different networks talk host to host, through their routers' firewalls, as
directly as two punched NATs do. `lan` means the same private network or the same link: both
addresses private (RFC 1918, shared address space, unique local, link-local, loopback), or the
peer's address on the prefix of the local address's interface. Anything else is `direct`.
"""

from __future__ import annotations

import functools
import ipaddress

import ifaddr

from .. import wire

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that are never routed between networks: a pair of them shares a private network.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # RFC 6598, a carrier's NAT: one provider's network
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)


def host_pair_kind(local: str, remote: str) -> wire.PathKind:
    """`lan` for two host candidates on one private network or link, `direct` otherwise."""
    try:
        mine, theirs = _address(local), _address(remote)
    except ValueError:
        return wire.PathKind.LAN  # not addresses (an mDNS name): nothing says it left the LAN
    if mine.version != theirs.version:
        return wire.PathKind.DIRECT
    if is_private(mine) and is_private(theirs):
        return wire.PathKind.LAN
    network = on_link_network(str(mine))
    if network is not None and theirs in network:
        return wire.PathKind.LAN
    return wire.PathKind.DIRECT


def is_private(address: IpAddress) -> bool:
    return any(
        address in network for network in PRIVATE_NETWORKS if network.version == address.version
    )


def on_link_network(
    address: str,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network of the interface that holds `address` (its prefix), or None."""
    return _interface_networks().get(_address(address).compressed) or _refreshed(address)


def _refreshed(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    _interface_networks.cache_clear()  # an address that came up since the last look
    return _interface_networks().get(_address(address).compressed)


@functools.lru_cache(maxsize=1)
def _interface_networks() -> dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                network = ipaddress.ip_network(f"{text}/{ip.network_prefix}", strict=False)
            except ValueError:
                continue
            networks[_address(text).compressed] = network
    return networks


def _address(text: str) -> IpAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])
