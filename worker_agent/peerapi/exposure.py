"""What this agent lets peers forward to, and how a `[HOST:]PORT` is written.

An exposure is a host and port pair, compared exactly after normalising the host (`localhost`
is 127.0.0.1, addresses in their canonical form, names lower case): exposing `8888` lets peers
reach 127.0.0.1:8888 and nothing else, not 0.0.0.0:8888, not another port of that host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import threading
from collections.abc import Iterable

Endpoint = tuple[str, int]
DEFAULT_HOST = "127.0.0.1"


def parse_endpoint(text: str, *, default_host: str = DEFAULT_HOST) -> Endpoint:
    """`PORT`, `HOST:PORT` or `[V6]:PORT` as (host, port); `localhost` is 127.0.0.1.
    ValueError with what is wrong."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    else:
        host, port_text = default_host, text
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    if not host:
        raise ValueError(f"{text!r}: empty host")
    return normal_host(host), int(port_text)


def normal_host(host: str) -> str:
    host = host.strip().lower()
    if host == "localhost":
        return DEFAULT_HOST
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Exposures:
    """What this agent forwards peers to: host and port pairs, each exposed until withdrawn."""

    def __init__(self, initial: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._exposed: dict[int, Endpoint] = {}
        self._ids = itertools.count(1)
        for text in initial:
            self.add(parse_endpoint(text))

    def add(self, endpoint: Endpoint) -> int:
        with self._lock:
            handle = next(self._ids)
            self._exposed[handle] = (normal_host(endpoint[0]), endpoint[1])
            return handle

    def remove(self, handle: int) -> None:
        with self._lock:
            self._exposed.pop(handle, None)

    def allows(self, endpoint: Endpoint) -> bool:
        wanted = (normal_host(endpoint[0]), endpoint[1])
        with self._lock:
            return wanted in self._exposed.values()

    def listed(self) -> list[str]:
        with self._lock:
            return sorted({format_endpoint(e) for e in self._exposed.values()})


def parse_exposures(text: str) -> list[str]:
    """`RENDEZVOUS_EXPOSE=8888,127.0.0.1:5432`: each entry checked (ValueError otherwise)."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    for entry in entries:
        parse_endpoint(entry)
    return entries
