"""ICE as one attempt may announce it (RFC 8445 section 5.3, RFC 8839 section 5.1): candidates
checked and put in canonical form, and the characters of its credentials. The service passes
candidates on to the peer; it never takes part in ICE itself."""

from __future__ import annotations

import re
from typing import Any

from registry.core.protocol.errors import InvalidField, InvalidIp
from registry.core.protocol.fields import normalize_ip

MAX_CANDIDATES = 16
MAX_CANDIDATE_LENGTH = 256
MAX_ATTEMPT = 9999
_ICE_CHARS = r"[A-Za-z0-9+/]"
_UFRAG_RE = re.compile(rf"\A{_ICE_CHARS}{{4,256}}\Z")
_PWD_RE = re.compile(rf"\A{_ICE_CHARS}{{22,256}}\Z")
_FOUNDATION_RE = re.compile(rf"\A{_ICE_CHARS}{{1,32}}\Z")
# ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and other scripts' digits.
_NUMBER_RE = re.compile(r"\A[0-9]{1,10}\Z")
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


def is_ufrag(value: Any) -> bool:
    """4 to 256 ICE characters: an attempt's username fragment."""
    return isinstance(value, str) and bool(_UFRAG_RE.match(value))


def is_pwd(value: Any) -> bool:
    """22 to 256 ICE characters: an attempt's password."""
    return isinstance(value, str) and bool(_PWD_RE.match(value))


def parse_candidate(value: Any) -> str:
    """An ICE candidate attribute value (RFC 8839 section 5.1), in canonical form, or
    InvalidField. UDP only; the address must be an IP literal (no mDNS names)."""
    if not isinstance(value, str) or not value or len(value) > MAX_CANDIDATE_LENGTH:
        raise InvalidField(f"a candidate is a string of 1 to {MAX_CANDIDATE_LENGTH} characters")
    text = value[len("candidate:") :] if value.startswith("candidate:") else value
    bits = text.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise InvalidField(f"{value[:60]!r} is not an ICE candidate")
    foundation, component, transport, priority, ip, port, _, kind, *extensions = bits
    if not _FOUNDATION_RE.match(foundation):
        raise InvalidField("a candidate's foundation must be 1-32 ICE characters")
    component_number = _number(component, "component", 1, 256)
    if transport.lower() != "udp":
        raise InvalidField("only UDP candidates are supported")
    priority_number = _number(priority, "priority", 1, 2**31 - 1)
    port_number = _number(port, "port", 1, 65535)
    if kind not in CANDIDATE_TYPES:
        raise InvalidField(f"a candidate's type must be one of {', '.join(CANDIDATE_TYPES)}")
    parts = [foundation, str(component_number), "udp", str(priority_number)]
    parts += [_candidate_ip(ip), str(port_number), "typ", kind]
    pairs = dict(zip(extensions[::2], extensions[1::2], strict=False))
    if "raddr" in pairs and "rport" in pairs:
        rport = _number(pairs["rport"], "rport", 0, 65535)
        parts += ["raddr", _candidate_ip(pairs["raddr"]), "rport", str(rport)]
    return " ".join(parts)  # other extensions (generation, tcptype, ...) are dropped


def _number(text: str, name: str, low: int, high: int) -> int:
    """One of a candidate's numbers: ASCII digits within [low, high], or InvalidField."""
    if not _NUMBER_RE.match(text) or not low <= int(text) <= high:
        raise InvalidField(f"a candidate's {name} must be {low} to {high} in ASCII digits")
    return int(text)


def _candidate_ip(value: str) -> str:
    try:
        return normalize_ip(value)
    except InvalidIp:
        raise InvalidField(
            f"a candidate's address must be an IP literal, not {value[:60]!r}"
        ) from None
