"""The agent's copy of the wire protocol: constants, the frames it sends, the frames it reads.

`registry/core/protocol/` is the source of truth. This module copies what a worker needs so the
agent installs without the service; `tests/test_agent_unit.py` checks that the copies agree.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from enum import IntEnum, StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PROTOCOL_VERSION = 3
PEER_PROTOCOL_VERSION = 3
# A service that says it speaks this version (`welcome`) resumes introductions (`resumes` in
# `connect_request`) and says why one ended (`code` in `peer_closed`).
RESUMING_PROTOCOL_VERSION = 3

WORKER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
WORKER_ID_MAX_LENGTH = 128
_WORKER_ID_RE = re.compile(rf"\A{WORKER_ID_PATTERN}\Z")

DEFAULT_MAX_FRAME_BYTES = 4096
AGENT_INFO_MAX_KEYS = 32
AGENT_INFO_MAX_KEY_LENGTH = 64
AGENT_INFO_MAX_VALUE_LENGTH = 256

REGISTER_PATH = "/ws/register/{worker_id}"
# Handshake headers besides Authorization (registry/core/protocol/ has the rules).
CREDENTIAL_HEADER = "Rendezvous-Credential"  # the agent's own credential, to bind at enrolment
CERTIFICATE_HEADER = "Rendezvous-Certificate"  # its identity certificate, base64 DER

_WEBSOCKET_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}

Scalar = str | int | float | bool | None


class ClientMessageType(StrEnum):
    REGISTER_PUBLIC_IP = "register_public_ip"
    HEARTBEAT = "heartbeat"
    AGENT_INFO = "agent_info"
    NAT_REPORT = "nat_report"
    LIST_PEERS = "list_peers"
    SUBSCRIBE_PEERS = "subscribe_peers"
    UNSUBSCRIBE_PEERS = "unsubscribe_peers"
    CONNECT_REQUEST = "connect_request"
    INTRODUCTION_ACCEPT = "introduction_accept"
    INTRODUCTION_REJECT = "introduction_reject"
    ICE_CANDIDATES = "ice_candidates"
    PATH_REPORT = "path_report"
    PEER_CLOSE = "peer_close"


class ServerMessageType(StrEnum):
    WELCOME = "welcome"
    PUBLIC_IP_REGISTERED = "public_ip_registered"
    HEARTBEAT_ACK = "heartbeat_ack"
    AGENT_INFO_RECORDED = "agent_info_recorded"
    ERROR = "error"
    CLOSING = "closing"
    NAT_REPORT_RECORDED = "nat_report_recorded"
    PEERS = "peers"
    PEERS_SUBSCRIBED = "peers_subscribed"
    PEERS_UNSUBSCRIBED = "peers_unsubscribed"
    PEER_JOINED = "peer_joined"
    PEER_LEFT = "peer_left"
    CONNECT_PENDING = "connect_pending"
    CONNECT_FAILED = "connect_failed"
    INTRODUCTION_REQUEST = "introduction_request"
    INTRODUCTION = "introduction"
    INTRODUCTION_REJECTED = "introduction_rejected"
    ICE_CANDIDATES = "ice_candidates"
    PATH_REPORT_RECORDED = "path_report_recorded"
    PEER_CLOSED = "peer_closed"


class PathKind(StrEnum):
    """Which route carries a peer connection's data, best first."""

    LAN = "lan"
    DIRECT = "direct"
    TURN = "turn"
    RELAY = "relay"


class Transport(StrEnum):
    """What an introduction is for: encrypted QUIC streams, or raw datagrams on the path."""

    QUIC = "quic"
    DATAGRAMS = "datagrams"


class NatMapping(StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


class PortMappingProtocol(StrEnum):
    NAT_PMP = "nat-pmp"
    PCP = "pcp"
    UPNP = "upnp"


class IcePolicy(StrEnum):
    ALL = "all"
    RELAY = "relay"
    PROBE = "probe"  # hard-NAT probing's endpoints (paths/probing.py), not ICE


class ConnectFailure(StrEnum):
    PEER_UNAVAILABLE = "PEER_UNAVAILABLE"
    PEER_REFUSED = "PEER_REFUSED"
    PEER_UNRESPONSIVE = "PEER_UNRESPONSIVE"
    NOT_YOURSELF = "NOT_YOURSELF"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_PEERS = "TOO_MANY_PEERS"
    AGENT_OUTDATED = "AGENT_OUTDATED"
    NO_IDENTITY = "NO_IDENTITY"
    POLICY_DENIED = "POLICY_DENIED"


class PeerClosedCode(StrEnum):
    """Why an introduction ended (`peer_closed`'s `code`)."""

    CLOSED = "CLOSED"  # either side closed it
    PEER_OFFLINE = "PEER_OFFLINE"  # the peer's connection to the service ended: it may resume
    POLICY_DENIED = "POLICY_DENIED"  # the peer rules no longer allow the pair
    TOO_MANY_PEERS = "TOO_MANY_PEERS"  # this side held too many peers when it was made (or used)
    UNUSED = "UNUSED"  # neither side sent anything on it in time


class CloseCode(IntEnum):
    """Close codes the service sends. SUPERSEDED has its own rule; the FINAL ones end the agent;
    any other means "reconnect with backoff"."""

    NORMAL = 1000
    SUPERSEDED = 4000
    DISCONNECTED_BY_OPERATOR = 4001
    GOING_AWAY = 4002
    INSTANCE_RESET = 4003
    TRY_AGAIN_LATER = 4004
    LIMIT_EXCEEDED = 4008
    AUTHENTICATION_FAILED = 4010
    WORKER_DISABLED = 4011
    RATE_LIMITED = 4029


# Retrying cannot help after these: the agent stops (state "refused") and says why.
FINAL_CLOSE_CODES = frozenset({CloseCode.AUTHENTICATION_FAILED, CloseCode.WORKER_DISABLED})


class ErrorCode(StrEnum):
    INVALID_JSON = "INVALID_JSON"
    NOT_AN_OBJECT = "NOT_AN_OBJECT"
    MISSING_TYPE = "MISSING_TYPE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    MISSING_FIELD = "MISSING_FIELD"
    INVALID_IP = "INVALID_IP"
    INVALID_FIELD = "INVALID_FIELD"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    RELAY_NOT_INTRODUCED = "RELAY_NOT_INTRODUCED"
    RELAY_MALFORMED = "RELAY_MALFORMED"
    RELAY_FRAME_TOO_LARGE = "RELAY_FRAME_TOO_LARGE"
    RELAY_RATE_LIMITED = "RELAY_RATE_LIMITED"
    RELAY_OFF = "RELAY_OFF"


class ServerFrameError(ValueError):
    """A frame from the server that is not a JSON object with a string `type`."""


# ---- addressing --------------------------------------------------------------------------------


def is_valid_worker_id(worker_id: object) -> bool:
    return isinstance(worker_id, str) and bool(_WORKER_ID_RE.match(worker_id))


def websocket_url(service_url: str, worker_id: str) -> str:
    """The registration endpoint for `worker_id` under a service base URL (http(s) or ws(s))."""
    if not isinstance(service_url, str) or not service_url.strip():
        raise ValueError("the service URL is empty")
    if not is_valid_worker_id(worker_id):
        raise ValueError(
            f"invalid worker id {worker_id!r}: it must match {WORKER_ID_PATTERN} "
            "(a letter or digit, then up to 127 letters, digits, '.', '_' or '-')"
        )
    text = service_url.strip()
    parts = urlsplit(text)
    scheme = _WEBSOCKET_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"invalid service URL {text!r}: the scheme must be http, https, ws or wss")
    if not parts.hostname:
        raise ValueError(f"invalid service URL {text!r}: it has no host")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValueError(
            f"invalid service URL {text!r}: the port is not a number 0-65535"
        ) from None
    path = parts.path.rstrip("/") + REGISTER_PATH.format(worker_id=worker_id)
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def parse_host_port(text: str, default_port: int = 3478) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address, as a configuration value."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


# ---- frames the agent sends --------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def register_public_ip(ip: str) -> str:
    """The proof of concept's one message, unchanged. `ip` must be an address literal."""
    address = ipaddress.ip_address(ip.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError("the server refuses IPv6 addresses with a zone")
    return encode({"type": ClientMessageType.REGISTER_PUBLIC_IP, "ip": address.compressed})


def heartbeat() -> str:
    return encode({"type": ClientMessageType.HEARTBEAT})


def agent_info(info: Mapping[str, Scalar]) -> str:
    return encode({"type": ClientMessageType.AGENT_INFO, "info": clean_agent_info(info)})


def clean_agent_info(info: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """What the server accepts: a flat object of scalars. Long strings are cut, not refused."""
    if len(info) > AGENT_INFO_MAX_KEYS:
        raise ValueError(f"agent info may hold at most {AGENT_INFO_MAX_KEYS} keys")
    clean: dict[str, Scalar] = {}
    for key, value in info.items():
        if not isinstance(key, str) or not key or len(key) > AGENT_INFO_MAX_KEY_LENGTH:
            raise ValueError(
                f"agent info keys must be strings of 1-{AGENT_INFO_MAX_KEY_LENGTH} chars: {key!r}"
            )
        if isinstance(value, str):
            value = value[:AGENT_INFO_MAX_VALUE_LENGTH]
        elif value is not None and not isinstance(value, (int, float, bool)):
            raise ValueError(
                f"agent info value for {key!r} must be a string, number, boolean or None"
            )
        clean[key] = value
    return clean


def _endpoints(endpoints: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"ip": ip, "port": port} for ip, port in endpoints]


def nat_report(
    mapping: str,
    udp_endpoint: tuple[str, int] | None,
    port_mapping: Mapping[str, Any] | None = None,
) -> str:
    """`port_mapping`: {"protocol": one of PORT_MAPPING_PROTOCOLS, "external": (ip, port)}."""
    return encode(
        {
            "type": ClientMessageType.NAT_REPORT,
            "mapping": mapping,
            "udp_endpoint": _endpoints([udp_endpoint])[0] if udp_endpoint else None,
            "port_mapping": None
            if not port_mapping
            else {
                "protocol": str(port_mapping["protocol"]),
                "external": _endpoints([port_mapping["external"]])[0],
            },
        }
    )


def list_peers(*, request_id: str, tag: str | None = None, offline: bool = False) -> str:
    message = {"type": ClientMessageType.LIST_PEERS, "request_id": request_id, "tag": tag}
    return encode({**message, "offline": True} if offline else message)


def subscribe_peers(tag: str | None = None) -> str:
    return encode({"type": ClientMessageType.SUBSCRIBE_PEERS, "tag": tag})


def unsubscribe_peers() -> str:
    return encode({"type": ClientMessageType.UNSUBSCRIBE_PEERS})


def connect_request(
    *,
    peer_id: str,
    request_id: str,
    transport: str = Transport.QUIC,
    resumes: str | None = None,
) -> str:
    """`resumes`: the introduction this one replaces (the connection on it carries on)."""
    extra = {"resumes": resumes} if resumes else {}
    return encode(
        {
            "type": ClientMessageType.CONNECT_REQUEST,
            "peer_id": peer_id,
            "request_id": request_id,
            "protocol_version": PEER_PROTOCOL_VERSION,
            "transport": transport,
            **extra,
        }
    )


def introduction_accept(*, introduction_id: str) -> str:
    return encode(
        {
            "type": ClientMessageType.INTRODUCTION_ACCEPT,
            "introduction_id": introduction_id,
            "protocol_version": PEER_PROTOCOL_VERSION,
        }
    )


def introduction_reject(*, introduction_id: str, reason: str) -> str:
    return encode(
        {
            "type": ClientMessageType.INTRODUCTION_REJECT,
            "introduction_id": introduction_id,
            "reason": reason[:200],
        }
    )


def ice_candidates(
    *,
    introduction_id: str,
    attempt: int,
    policy: str,
    ufrag: str,
    pwd: str,
    candidates: list[str],
    done: bool,
) -> str:
    return encode(
        {
            "type": ClientMessageType.ICE_CANDIDATES,
            "introduction_id": introduction_id,
            "attempt": attempt,
            "policy": policy,
            "ufrag": ufrag,
            "pwd": pwd,
            "candidates": candidates,
            "done": done,
        }
    )


def path_report(
    *,
    introduction_id: str,
    kind: str,
    remote: tuple[str, int] | None,
    setup_ms: int | None = None,
) -> str:
    return encode(
        {
            "type": ClientMessageType.PATH_REPORT,
            "introduction_id": introduction_id,
            "kind": kind,
            "remote": _endpoints([remote])[0] if remote else None,
            "setup_ms": setup_ms,
        }
    )


def peer_close(*, introduction_id: str, reason: str = "") -> str:
    return encode(
        {
            "type": ClientMessageType.PEER_CLOSE,
            "introduction_id": introduction_id,
            "reason": reason[:200],
        }
    )


# ---- relay frames (binary; registry/core/protocol/relay_frames.py has the layout) ----------------

RELAY_DATA = 1
RELAY_HEADER_BYTES = 17
RELAY_LENGTH_BYTES = 2
RELAY_MAX_FRAME_BYTES = 65536
MAX_DATAGRAM_BYTES = RELAY_MAX_FRAME_BYTES - RELAY_HEADER_BYTES - RELAY_LENGTH_BYTES


def relay_header(introduction_id: str) -> bytes:
    return bytes([RELAY_DATA]) + bytes.fromhex(introduction_id)


def relay_frame(header: bytes, datagrams: list[bytes]) -> bytes:
    """One frame for the datagrams; the caller keeps it within RELAY_MAX_FRAME_BYTES."""
    parts = [header]
    for datagram in datagrams:
        parts.append(len(datagram).to_bytes(RELAY_LENGTH_BYTES, "big"))
        parts.append(datagram)
    return b"".join(parts)


def parse_relay_frame(frame: bytes) -> tuple[str, list[bytes]]:
    """(introduction id, datagrams) of a relay frame; ServerFrameError if it is not one."""
    size = len(frame)
    if size < RELAY_HEADER_BYTES or frame[0] != RELAY_DATA:
        raise ServerFrameError("binary frame is not a relay frame")
    datagrams = []
    offset = RELAY_HEADER_BYTES
    view = memoryview(frame)
    while offset < size:
        end = offset + RELAY_LENGTH_BYTES
        length = int.from_bytes(view[offset:end], "big")
        if end + length > size:
            raise ServerFrameError("relay frame datagram lengths overrun the frame")
        datagrams.append(bytes(view[end : end + length]))
        offset = end + length
    return frame[1:RELAY_HEADER_BYTES].hex(), datagrams


# ---- frames the agent reads --------------------------------------------------------------------


def parse_server_message(text: str | bytes) -> dict[str, Any]:
    """One server frame as a dict. Unknown types pass through: newer servers may say more."""
    if isinstance(text, bytes | bytearray):
        raise ServerFrameError("binary frames are not part of the protocol")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ServerFrameError("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ServerFrameError("frame is not a JSON object")
    if not isinstance(data.get("type"), str):
        raise ServerFrameError("frame has no string 'type'")
    return data
