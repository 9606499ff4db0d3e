"""The values frames carry, with their rules: worker ids, tags, request ids, IP literals and UDP
endpoints. The models, the peer policy and the views check the same rules through these."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from registry.core.protocol.errors import InvalidField, InvalidIp

# Worker ids: what fits in a URL path segment, a log line and a channel-layer group name.
WORKER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
WORKER_ID_MAX_LENGTH = 128
_WORKER_ID_RE = re.compile(rf"\A{WORKER_ID_PATTERN}\Z")

# Tags (copied from an enrolment key onto the workers it enrols; peers are filtered by them).
TAG_RULE = "1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit (case-insensitive)"
_TAG_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

REQUEST_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
MAX_DETAIL_LENGTH = 200


def is_storable(text: str) -> bool:
    """Text the logs and the database can take: no NUL (PostgreSQL refuses it in text and jsonb)
    and no lone surrogate (UTF-8 cannot encode one; JSON's \\ud800 escapes make them)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_valid_worker_id(worker_id: str) -> bool:
    return bool(_WORKER_ID_RE.match(worker_id))


def is_valid_tag(tag: object) -> bool:
    return isinstance(tag, str) and bool(_TAG_RE.match(tag))


def normalize_ip(value: Any) -> str:
    """The canonical text of an IPv4 or IPv6 literal, or InvalidIp. Nothing else is ever stored."""
    if not isinstance(value, str) or not value or len(value) > 45:
        raise InvalidIp("ip must be an IPv4 or IPv6 address literal")
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidIp("ip must be an IPv4 or IPv6 address literal") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            raise InvalidIp("ip must not carry an IPv6 zone")
        if address.ipv4_mapped is not None:
            # What the database stores for it (unpack_ipv4), and what the worker is told.
            return address.ipv4_mapped.compressed
    return address.compressed


def is_port(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= 65535


@dataclass(frozen=True, slots=True)
class UdpEndpoint:
    ip: str
    port: int

    def as_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port}

    def text(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def parse_udp_endpoint(value: Any) -> UdpEndpoint:
    if not isinstance(value, dict) or "ip" not in value or "port" not in value:
        raise InvalidField("an endpoint is an object with 'ip' and 'port'")
    port = value["port"]
    if not is_port(port):
        raise InvalidField("an endpoint's 'port' must be an integer from 1 to 65535")
    return UdpEndpoint(ip=normalize_ip(value["ip"]), port=port)
