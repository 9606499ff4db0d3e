"""The observed address: a proxy's X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import pytest

from registry.core.addresses import observed_address, parse_networks
from registry.security.origins import origin_allowed

pytestmark = pytest.mark.standalone

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


def scope(peer: str, port: int = 40000, **headers: str) -> dict:
    return {
        "client": (peer, port),
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def test_without_trusted_proxies_the_socket_peer_is_the_address() -> None:
    assert observed_address(scope("198.51.100.7", x_forwarded_for="203.0.113.9")) == (
        "198.51.100.7",
        40000,
    )


def test_a_spoofed_header_from_an_untrusted_peer_is_ignored() -> None:
    spoof = scope("198.51.100.7", x_forwarded_for="203.0.113.66")
    assert observed_address(spoof, PROXIES) == ("198.51.100.7", 40000)


def test_behind_a_trusted_proxy_the_forwarded_client_is_taken_without_a_port() -> None:
    assert observed_address(scope("10.1.2.3", x_forwarded_for="203.0.113.9"), PROXIES) == (
        "203.0.113.9",
        None,
    )


def test_what_the_client_wrote_into_the_header_itself_is_never_taken() -> None:
    # The client sent "X-Forwarded-For: 192.0.2.1"; the proxy appended the address it saw.
    forged = scope("10.1.2.3", x_forwarded_for="192.0.2.1, 203.0.113.9")
    assert observed_address(forged, PROXIES)[0] == "203.0.113.9"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    chain = scope("10.1.2.3", x_forwarded_for="192.0.2.1, 203.0.113.9, 10.9.9.9")
    assert observed_address(chain, PROXIES)[0] == "203.0.113.9"


def test_garbage_in_the_chain_stops_the_walk_at_the_last_trusted_hop() -> None:
    chain = scope("10.1.2.3", x_forwarded_for="203.0.113.9, not-an-ip")
    assert observed_address(chain, PROXIES) == ("10.1.2.3", None)


def test_ipv6_and_mapped_addresses_are_canonical() -> None:
    assert observed_address(scope("::ffff:198.51.100.7")) == ("198.51.100.7", 40000)
    v6 = scope("2001:db8:ffff::1", x_forwarded_for="2001:DB8::7")
    assert observed_address(v6, PROXIES)[0] == "2001:db8::7"


HOSTS = ["localhost", "127.0.0.1", "rendezvous.example.com", ".corp.example"]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # a program (the PoC worker sends no Origin)
        ("http://127.0.0.1:8000", True),  # websocket-client's default: its target's own origin
        ("https://rendezvous.example.com", True),
        ("https://ops.corp.example", True),
        ("https://evil.example", False),  # a page on another site (cross-site hijacking)
        ("null", False),  # a sandboxed page or a file:// document
        ("https://dashboard.example", True),  # listed in RENDEZVOUS_ALLOWED_ORIGINS
    ],
)
def test_which_origins_may_open_a_worker_socket(origin: str | None, allowed: bool) -> None:
    headers = [] if origin is None else [(b"origin", origin.encode())]
    result = origin_allowed(
        {"headers": headers},
        allowed_hosts=HOSTS,
        allowed_origins=["https://dashboard.example"],
    )
    assert result is allowed
