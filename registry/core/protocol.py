"""The wire protocol between workers and the service: every message, field, rule and close code.

Nothing else in the project builds or parses a frame. `docs/protocol.md` documents this module;
keep the two in step. Compatible with the proof of concept: its only message,
`register_public_ip`, is unchanged, and everything it ignored is still harmless to send.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

PROTOCOL_VERSION = 2
# The peer messages changed in version 2 (ICE and the service relay replaced probe punching):
# `connect_request` and `introduction_accept` say which version they speak, and an agent that
# says less gets AGENT_OUTDATED instead of an introduction it could not use.
PEER_PROTOCOL_VERSION = 2

# Worker ids: what fits in a URL path segment, a log line and a channel-layer group name.
WORKER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
WORKER_ID_MAX_LENGTH = 128
_WORKER_ID_RE = re.compile(rf"\A{WORKER_ID_PATTERN}\Z")

# Tags (copied from an enrolment key onto the workers it enrols; peers are filtered by them).
TAG_RULE = "1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit (case-insensitive)"
_TAG_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# Frames above this many bytes of UTF-8 are refused with FRAME_TOO_LARGE; the connection stays.
DEFAULT_MAX_FRAME_BYTES = 4096
# What an agent may say about itself (`agent_info`): a flat object of short scalar values.
AGENT_INFO_MAX_KEYS = 32
AGENT_INFO_MAX_KEY_LENGTH = 64
AGENT_INFO_MAX_VALUE_LENGTH = 256


class ClientMessageType(StrEnum):
    REGISTER_PUBLIC_IP = "register_public_ip"
    HEARTBEAT = "heartbeat"
    AGENT_INFO = "agent_info"
    # Peer discovery and introductions (docs/nat-traversal.md).
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
    ICE_CANDIDATES = "ice_candidates"  # forwarded from the peer
    PATH_REPORT_RECORDED = "path_report_recorded"
    PEER_CLOSED = "peer_closed"


class NatMapping(StrEnum):
    """How a worker's NAT maps its UDP socket, from two STUN servers (worker_agent/stun.py)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


class PathKind(StrEnum):
    """Which route carries a peer connection's data, best first (docs/nat-traversal.md)."""

    LAN = "lan"  # host candidate to host candidate: no NAT in between
    DIRECT = "direct"  # through one or both NATs, hole-punched by ICE
    TURN = "turn"  # through a TURN server (coturn)
    RELAY = "relay"  # through this service, over the workers' WebSockets


class IcePolicy(StrEnum):
    """Which candidates an ICE attempt gathers (aioice's transport policy)."""

    ALL = "all"  # host and server-reflexive candidates: LAN and direct paths
    RELAY = "relay"  # TURN relay candidates only


class Transport(StrEnum):
    """What an introduction is for: encrypted QUIC streams between pinned identities
    (peer-connections.md), or raw datagrams on the path."""

    QUIC = "quic"
    DATAGRAMS = "datagrams"


class ConnectFailure(StrEnum):
    """Why an introduction did not happen (`connect_failed`)."""

    PEER_UNAVAILABLE = "PEER_UNAVAILABLE"  # the peer is not connected (or is disabled)
    PEER_REFUSED = "PEER_REFUSED"  # the peer does not accept connections
    PEER_UNRESPONSIVE = "PEER_UNRESPONSIVE"  # the peer's agent did not answer in time
    NOT_YOURSELF = "NOT_YOURSELF"  # a worker asked to reach itself
    RATE_LIMITED = "RATE_LIMITED"  # more connect requests than INTRODUCTION_RATE allows
    TOO_MANY_PEERS = "TOO_MANY_PEERS"  # either side holds RELAY_MAX_PEERS peer links already
    AGENT_OUTDATED = "AGENT_OUTDATED"  # either side's agent speaks an older peer protocol
    NO_IDENTITY = "NO_IDENTITY"  # a QUIC connection, and either side presented no certificate
    POLICY_DENIED = "POLICY_DENIED"  # the peer policy does not let the requester reach the target


class CloseCode(IntEnum):
    """Close codes the service sends. Besides 1000, daphne's WebSocket layer (autobahn) lets an
    application send only 3000-4999, so every other reason has a private 40xx code."""

    NORMAL = 1000
    SUPERSEDED = 4000  # another connection registered the same worker id; do not fight over it
    DISCONNECTED_BY_OPERATOR = 4001  # an operator ended the session; reconnecting is allowed
    GOING_AWAY = 4002  # this server instance is shutting down; reconnect with backoff
    INSTANCE_RESET = 4003  # this instance lost its registration; reconnect with backoff
    TRY_AGAIN_LATER = 4004  # the registry could not record the connection; reconnect with backoff
    LIMIT_EXCEEDED = 4008  # a connection limit (instance, address, handshake rate); back off
    AUTHENTICATION_FAILED = 4010  # no, a wrong, or an unusable credential or key; do not retry
    WORKER_DISABLED = 4011  # an operator disabled this worker id; do not retry
    RATE_LIMITED = 4029  # the connection kept flooding after RATE_LIMITED errors


# Close codes after which an agent must not reconnect by itself: retrying cannot help.
FINAL_CLOSE_CODES = frozenset({CloseCode.AUTHENTICATION_FAILED, CloseCode.WORKER_DISABLED})


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    # The proof of concept's reason text, kept word for word.
    CloseCode.SUPERSEDED: "New connection from same worker ID",
    CloseCode.DISCONNECTED_BY_OPERATOR: "disconnected by an operator",
    CloseCode.GOING_AWAY: "server shutting down, reconnect",
    CloseCode.INSTANCE_RESET: "server instance lost its registration, reconnect",
    CloseCode.TRY_AGAIN_LATER: "registry unavailable, try again later",
    CloseCode.LIMIT_EXCEEDED: "connection limit reached, try again later",
    CloseCode.AUTHENTICATION_FAILED: "authentication failed",
    CloseCode.WORKER_DISABLED: "worker disabled by an operator",
    CloseCode.RATE_LIMITED: "too many messages",
}

# How a close the worker started is recorded (daphne reports the code only, never a reason).
_CLIENT_CLOSE_REASONS = {
    1000: "closed by the worker",
    1001: "worker going away",
    1006: "connection lost",
}


def describe_close(code: int | None, *, by_server: bool) -> str:
    if by_server and code is not None and code in CloseCode._value2member_map_:
        return CLOSE_REASONS[CloseCode(code)]
    return _CLIENT_CLOSE_REASONS.get(code or 1006, f"closed by the worker with code {code}")


# Reasons recorded on connection rows that the service closed without a socket to close.
REASON_INSTANCE_LOST = "server instance stopped answering"
REASON_INSTANCE_RESTARTED = "server instance restarted"


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
    # Binary relay frames (docs/protocol.md, "The service relay").
    RELAY_NOT_INTRODUCED = "RELAY_NOT_INTRODUCED"
    RELAY_MALFORMED = "RELAY_MALFORMED"
    RELAY_FRAME_TOO_LARGE = "RELAY_FRAME_TOO_LARGE"
    RELAY_RATE_LIMITED = "RELAY_RATE_LIMITED"
    RELAY_OFF = "RELAY_OFF"  # the introduction said relay: false (RENDEZVOUS_RELAY off)


class ProtocolError(Exception):
    """A frame the service refuses. The connection stays open; the sender gets an error frame."""

    code: ErrorCode = ErrorCode.INVALID_FIELD

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class InvalidJson(ProtocolError):
    code = ErrorCode.INVALID_JSON


class NotAnObject(ProtocolError):
    code = ErrorCode.NOT_AN_OBJECT


class MissingType(ProtocolError):
    code = ErrorCode.MISSING_TYPE


class UnknownType(ProtocolError):
    code = ErrorCode.UNKNOWN_TYPE


class MissingField(ProtocolError):
    code = ErrorCode.MISSING_FIELD


class InvalidIp(ProtocolError):
    code = ErrorCode.INVALID_IP


class InvalidField(ProtocolError):
    code = ErrorCode.INVALID_FIELD


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class RateLimited(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class Unavailable(ProtocolError):
    """The frame was valid but the registry could not record it now; send it again later."""

    code = ErrorCode.UNAVAILABLE


class RelayError(ProtocolError):
    """A relay frame the service dropped; the error names the introduction it was for."""

    def __init__(self, message: str, *, code: ErrorCode, introduction_id: str | None) -> None:
        super().__init__(message, code=code)
        self.introduction_id = introduction_id


# ---- client messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterPublicIp:
    ip: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class AgentInfo:
    info: dict[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class UdpEndpoint:
    ip: str
    port: int

    def as_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port}

    def text(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class NatReport:
    mapping: NatMapping
    udp_endpoint: UdpEndpoint | None


@dataclass(frozen=True, slots=True)
class ListPeers:
    tag: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class SubscribePeers:
    tag: str | None


@dataclass(frozen=True, slots=True)
class UnsubscribePeers:
    pass


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    peer_id: str
    request_id: str
    protocol_version: int
    transport: Transport = Transport.QUIC


@dataclass(frozen=True, slots=True)
class IntroductionAccept:
    introduction_id: str
    protocol_version: int


@dataclass(frozen=True, slots=True)
class IntroductionReject:
    introduction_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class IceCandidates:
    """One side's ICE credentials and candidates for one attempt, for the peer (trickle ICE)."""

    introduction_id: str
    attempt: int
    policy: IcePolicy
    ufrag: str
    pwd: str
    candidates: tuple[str, ...]
    done: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "introduction_id": self.introduction_id,
            "attempt": self.attempt,
            "policy": self.policy,
            "ufrag": self.ufrag,
            "pwd": self.pwd,
            "candidates": list(self.candidates),
            "done": self.done,
        }


@dataclass(frozen=True, slots=True)
class PathReport:
    introduction_id: str
    kind: PathKind
    remote: str | None
    setup_ms: int | None


@dataclass(frozen=True, slots=True)
class PeerClose:
    introduction_id: str
    reason: str


ClientMessage = (
    RegisterPublicIp
    | Heartbeat
    | AgentInfo
    | NatReport
    | ListPeers
    | SubscribePeers
    | UnsubscribePeers
    | ConnectRequest
    | IntroductionAccept
    | IntroductionReject
    | IceCandidates
    | PathReport
    | PeerClose
)

REQUEST_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_REQUEST_ID_RE = re.compile(rf"\A{REQUEST_ID_PATTERN}\Z")
_INTRODUCTION_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")
MAX_DETAIL_LENGTH = 200
# ICE (RFC 8445 section 5.3, RFC 8839 section 5.1): what one attempt may announce.
MAX_CANDIDATES = 16
MAX_CANDIDATE_LENGTH = 256
MAX_ATTEMPT = 9999
_ICE_CHARS = r"[A-Za-z0-9+/]"
_UFRAG_RE = re.compile(rf"\A{_ICE_CHARS}{{4,256}}\Z")
_PWD_RE = re.compile(rf"\A{_ICE_CHARS}{{22,256}}\Z")
_FOUNDATION_RE = re.compile(rf"\A{_ICE_CHARS}{{1,32}}\Z")
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


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


def check_frame_size(text: str, max_bytes: int) -> None:
    # Cheap bound first: a str of n characters has between n and 4n UTF-8 bytes.
    if len(text) > max_bytes:
        raise FrameTooLarge(f"frames are limited to {max_bytes} bytes")
    if 4 * len(text) > max_bytes:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:  # lone surrogates: not text a WebSocket can carry
            raise InvalidJson("frame is not valid UTF-8 text") from None
        if size > max_bytes:
            raise FrameTooLarge(f"frames are limited to {max_bytes} bytes")


def parse_client_message(text: str, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> ClientMessage:
    """Turn one text frame into a message, or raise the ProtocolError that says what is wrong."""
    check_frame_size(text, max_bytes)
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise InvalidJson("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise NotAnObject("frame must be a JSON object")
    kind = data.get("type")
    if kind is None:
        raise MissingType("frame has no 'type'")
    if not isinstance(kind, str):
        raise UnknownType("'type' must be a string")
    parse = _PARSERS.get(kind)
    if parse is None:
        raise UnknownType(f"unknown message type {kind[:64]!r}")
    return parse(data)


def _optional_tag(data: dict[str, Any]) -> str | None:
    tag = data.get("tag")
    if tag is None:
        return None
    if not is_valid_tag(tag):
        raise InvalidField(f"'tag' must be {TAG_RULE}")
    return tag.lower()  # tags are case-insensitive


def _request_id(data: dict[str, Any], *, required: bool) -> str | None:
    value = data.get("request_id")
    if value is None:
        if required:
            raise MissingField("'request_id' is required")
        return None
    if not isinstance(value, str) or not _REQUEST_ID_RE.match(value):
        raise InvalidField("'request_id' must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _introduction_id(data: dict[str, Any]) -> str:
    value = data.get("introduction_id")
    if value is None:
        raise MissingField("'introduction_id' is required")
    if not isinstance(value, str) or not _INTRODUCTION_ID_RE.match(value):
        raise InvalidField("'introduction_id' must be 32 lowercase hex characters")
    return value


def _nat_mapping(value: Any) -> NatMapping:
    try:
        return NatMapping(value)
    except ValueError:
        raise InvalidField(
            f"'nat_mapping' must be one of {', '.join(m.value for m in NatMapping)}"
        ) from None


def parse_udp_endpoint(value: Any) -> UdpEndpoint:
    if not isinstance(value, dict) or "ip" not in value or "port" not in value:
        raise InvalidField("an endpoint is an object with 'ip' and 'port'")
    port = value["port"]
    if not _is_port(port):
        raise InvalidField("an endpoint's 'port' must be an integer from 1 to 65535")
    return UdpEndpoint(ip=normalize_ip(value["ip"]), port=port)


def _is_port(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= 65535


def _peer_id(data: dict[str, Any]) -> str:
    value = data.get("peer_id")
    if value is None:
        raise MissingField("'peer_id' is required")
    if not isinstance(value, str) or not is_valid_worker_id(value):
        raise InvalidField("'peer_id' is not a valid worker id")
    return value


def _detail(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise InvalidField(f"'{name}' must be a string")
    return value[:MAX_DETAIL_LENGTH]


def _protocol_version(data: dict[str, Any]) -> int:
    """What a peer message says it speaks; 1 when it says nothing (agents before version 2)."""
    value = data.get("protocol_version", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise InvalidField("'protocol_version' must be an integer from 1 to 1000")
    return value


def _transport(data: dict[str, Any]) -> Transport:
    try:
        return Transport(data.get("transport", Transport.QUIC))
    except ValueError:
        raise InvalidField("'transport' must be 'quic' or 'datagrams'") from None


def _parse_nat_report(data: dict[str, Any]) -> NatReport:
    if "mapping" not in data:
        raise MissingField("nat_report needs 'mapping'")
    endpoint = data.get("udp_endpoint")
    return NatReport(
        mapping=_nat_mapping(data["mapping"]),
        udp_endpoint=None if endpoint is None else parse_udp_endpoint(endpoint),
    )


def _parse_register_public_ip(data: dict[str, Any]) -> RegisterPublicIp:
    if "ip" not in data:
        raise MissingField("register_public_ip needs 'ip'")
    return RegisterPublicIp(ip=normalize_ip(data["ip"]))


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
    if not component.isdigit() or not 1 <= int(component) <= 256:
        raise InvalidField("a candidate's component must be 1 to 256")
    if transport.lower() != "udp":
        raise InvalidField("only UDP candidates are supported")
    if not priority.isdigit() or not 1 <= int(priority) <= 2**31 - 1:
        raise InvalidField("a candidate's priority must be 1 to 2**31-1")
    if not port.isdigit() or not _is_port(int(port)):
        raise InvalidField("a candidate's port must be 1 to 65535")
    if kind not in CANDIDATE_TYPES:
        raise InvalidField(f"a candidate's type must be one of {', '.join(CANDIDATE_TYPES)}")
    parts = [foundation, str(int(component)), "udp", str(int(priority))]
    parts += [_candidate_ip(ip), str(int(port)), "typ", kind]
    pairs = dict(zip(extensions[::2], extensions[1::2], strict=False))
    if "raddr" in pairs and "rport" in pairs:
        rport = pairs["rport"]
        if not rport.isdigit() or not 0 <= int(rport) <= 65535:
            raise InvalidField("a candidate's rport must be 0 to 65535")
        parts += ["raddr", _candidate_ip(pairs["raddr"]), "rport", str(int(rport))]
    return " ".join(parts)  # other extensions (generation, tcptype, ...) are dropped


def _candidate_ip(value: str) -> str:
    try:
        return normalize_ip(value)
    except InvalidIp:
        raise InvalidField(
            f"a candidate's address must be an IP literal, not {value[:60]!r}"
        ) from None


def _parse_ice_candidates(data: dict[str, Any]) -> IceCandidates:
    attempt = data.get("attempt")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 0 <= attempt <= MAX_ATTEMPT:
        raise InvalidField(f"'attempt' must be an integer from 0 to {MAX_ATTEMPT}")
    try:
        policy = IcePolicy(data.get("policy"))
    except ValueError:
        raise InvalidField("'policy' must be 'all' or 'relay'") from None
    ufrag, pwd = data.get("ufrag"), data.get("pwd")
    if not isinstance(ufrag, str) or not _UFRAG_RE.match(ufrag):
        raise InvalidField("'ufrag' must be 4 to 256 ICE characters (A-Z a-z 0-9 + /)")
    if not isinstance(pwd, str) or not _PWD_RE.match(pwd):
        raise InvalidField("'pwd' must be 22 to 256 ICE characters (A-Z a-z 0-9 + /)")
    candidates = data.get("candidates", [])
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES:
        raise InvalidField(f"'candidates' must be a list of at most {MAX_CANDIDATES} candidates")
    done = data.get("done", False)
    if not isinstance(done, bool):
        raise InvalidField("'done' must be true or false")
    return IceCandidates(
        introduction_id=_introduction_id(data),
        attempt=attempt,
        policy=policy,
        ufrag=ufrag,
        pwd=pwd,
        candidates=tuple(dict.fromkeys(parse_candidate(c) for c in candidates)),
        done=done,
    )


def _parse_path_report(data: dict[str, Any]) -> PathReport:
    try:
        kind = PathKind(data.get("kind"))
    except ValueError:
        raise InvalidField(
            f"'kind' must be one of {', '.join(k.value for k in PathKind)}"
        ) from None
    remote = data.get("remote")
    if remote is not None:
        if not isinstance(remote, dict):
            raise InvalidField("'remote' must be an endpoint object or null")
        remote = parse_udp_endpoint(remote).text()
    setup_ms = data.get("setup_ms")
    if setup_ms is not None and (
        isinstance(setup_ms, bool) or not isinstance(setup_ms, int) or not 0 <= setup_ms <= 10**7
    ):
        raise InvalidField("'setup_ms' must be an integer from 0 to 10000000, or null")
    return PathReport(
        introduction_id=_introduction_id(data), kind=kind, remote=remote, setup_ms=setup_ms
    )


# One parser per client message type: the frame's object in, the message (or a ProtocolError) out.
_PARSERS: dict[str, Any] = {
    ClientMessageType.REGISTER_PUBLIC_IP: _parse_register_public_ip,
    ClientMessageType.HEARTBEAT: lambda d: Heartbeat(),
    ClientMessageType.AGENT_INFO: lambda d: AgentInfo(info=_validate_agent_info(d.get("info"))),
    ClientMessageType.NAT_REPORT: _parse_nat_report,
    ClientMessageType.LIST_PEERS: lambda d: ListPeers(
        tag=_optional_tag(d), request_id=_request_id(d, required=False)
    ),
    ClientMessageType.SUBSCRIBE_PEERS: lambda d: SubscribePeers(tag=_optional_tag(d)),
    ClientMessageType.UNSUBSCRIBE_PEERS: lambda d: UnsubscribePeers(),
    ClientMessageType.CONNECT_REQUEST: lambda d: ConnectRequest(
        peer_id=_peer_id(d),
        request_id=_request_id(d, required=True) or "",
        protocol_version=_protocol_version(d),
        transport=_transport(d),
    ),
    ClientMessageType.INTRODUCTION_ACCEPT: lambda d: IntroductionAccept(
        introduction_id=_introduction_id(d), protocol_version=_protocol_version(d)
    ),
    ClientMessageType.INTRODUCTION_REJECT: lambda d: IntroductionReject(
        introduction_id=_introduction_id(d), reason=_detail(d, "reason")
    ),
    ClientMessageType.ICE_CANDIDATES: _parse_ice_candidates,
    ClientMessageType.PATH_REPORT: _parse_path_report,
    ClientMessageType.PEER_CLOSE: lambda d: PeerClose(
        introduction_id=_introduction_id(d), reason=_detail(d, "reason")
    ),
}


def _finite_float(text: str) -> float:
    # 1e400 parses as infinity, which JSON columns refuse as they refuse NaN.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _storable(text: str) -> bool:
    """No NUL and no lone surrogate: PostgreSQL's jsonb refuses both."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _refuse_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity; JSON (and the database's JSON columns) do not.
    raise ValueError(f"{name} is not JSON")


def _validate_agent_info(info: Any) -> dict[str, str | int | float | bool | None]:
    if not isinstance(info, dict):
        raise MissingField("agent_info needs an 'info' object")
    if len(info) > AGENT_INFO_MAX_KEYS:
        raise InvalidField(f"'info' may hold at most {AGENT_INFO_MAX_KEYS} keys")
    clean: dict[str, str | int | float | bool | None] = {}
    for key, value in info.items():
        if len(key) > AGENT_INFO_MAX_KEY_LENGTH:
            raise InvalidField(f"'info' keys are limited to {AGENT_INFO_MAX_KEY_LENGTH} chars")
        if not _storable(key) or (isinstance(value, str) and not _storable(value)):
            raise InvalidField("'info' text must not hold NUL characters or lone surrogates")
        if isinstance(value, str):
            if len(value) > AGENT_INFO_MAX_VALUE_LENGTH:
                raise InvalidField(
                    f"'info' values are limited to {AGENT_INFO_MAX_VALUE_LENGTH} chars"
                )
        elif value is not None and not isinstance(value, (int, float, bool)):
            raise InvalidField("'info' values must be strings, numbers, booleans or null")
        clean[key] = value
    return clean


# ---- server messages ---------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def welcome(
    *,
    worker_id: str,
    connection_id: int,
    instance_id: str,
    observed_ip: str | None,
    observed_port: int | None,
    heartbeat_interval: float,
    max_frame_bytes: int,
    security_mode: str = "open",
    credential: str | None = None,
    stun_servers: list[str] | None = None,
) -> str:
    """`credential` only on enrolment: the worker's secret for every later connection."""
    extra = {"credential": credential} if credential else {}
    return encode(
        {
            "type": ServerMessageType.WELCOME,
            "protocol_version": PROTOCOL_VERSION,
            "worker_id": worker_id,
            "connection_id": connection_id,
            "instance_id": instance_id,
            "observed_ip": observed_ip,
            "observed_port": observed_port,
            "heartbeat_interval": heartbeat_interval,
            "max_frame_bytes": max_frame_bytes,
            "security_mode": security_mode,
            "stun_servers": stun_servers or [],
            **extra,
        }
    )


def public_ip_registered(ip: str) -> str:
    return encode({"type": ServerMessageType.PUBLIC_IP_REGISTERED, "ip": ip})


def heartbeat_ack(server_time: float) -> str:
    return encode({"type": ServerMessageType.HEARTBEAT_ACK, "server_time": server_time})


def agent_info_recorded() -> str:
    return encode({"type": ServerMessageType.AGENT_INFO_RECORDED})


def error(exc: ProtocolError) -> str:
    extra = {"introduction_id": exc.introduction_id} if isinstance(exc, RelayError) else {}
    return encode(
        {"type": ServerMessageType.ERROR, "code": exc.code, "message": exc.message, **extra}
    )


def closing(code: CloseCode, reason: str | None = None) -> str:
    """Sent just before the server closes a socket: daphne cannot carry a close reason."""
    return encode(
        {
            "type": ServerMessageType.CLOSING,
            "code": int(code),
            "reason": reason or CLOSE_REASONS[code],
        }
    )


# ---- peer discovery and introductions -----------------------------------------------------------


def nat_report_recorded(mapping: NatMapping) -> str:
    return encode({"type": ServerMessageType.NAT_REPORT_RECORDED, "mapping": mapping})


def peers(peer_list: list[dict[str, Any]], *, request_id: str | None, truncated: bool) -> str:
    return encode(
        {
            "type": ServerMessageType.PEERS,
            "request_id": request_id,
            "peers": peer_list,
            "truncated": truncated,
        }
    )


def peers_subscribed(tag: str | None) -> str:
    return encode({"type": ServerMessageType.PEERS_SUBSCRIBED, "tag": tag})


def peers_unsubscribed() -> str:
    return encode({"type": ServerMessageType.PEERS_UNSUBSCRIBED})


def peer_joined(worker_id: str, tags: list[str]) -> str:
    return encode(
        {"type": ServerMessageType.PEER_JOINED, "peer": {"worker_id": worker_id, "tags": tags}}
    )


def peer_left(worker_id: str) -> str:
    return encode({"type": ServerMessageType.PEER_LEFT, "worker_id": worker_id})


def connect_pending(*, request_id: str, introduction_id: str, peer_id: str) -> str:
    return encode(
        {
            "type": ServerMessageType.CONNECT_PENDING,
            "request_id": request_id,
            "introduction_id": introduction_id,
            "peer_id": peer_id,
        }
    )


def connect_failed(
    *, request_id: str, peer_id: str, code: ConnectFailure, reason: str, introduction_id: str = ""
) -> str:
    return encode(
        {
            "type": ServerMessageType.CONNECT_FAILED,
            "request_id": request_id,
            "introduction_id": introduction_id or None,
            "peer_id": peer_id,
            "code": code,
            "reason": reason,
        }
    )


def introduction_request(*, introduction_id: str, peer_id: str, transport: Transport) -> str:
    return encode(
        {
            "type": ServerMessageType.INTRODUCTION_REQUEST,
            "introduction_id": introduction_id,
            "peer_id": peer_id,
            "protocol_version": PEER_PROTOCOL_VERSION,
            "transport": transport,
        }
    )


def introduction(
    *,
    introduction_id: str,
    request_id: str | None,
    peer_id: str,
    role: str,
    turn: dict[str, Any] | None,
    transport: Transport,
    peer_certificate: str | None,
    relay: bool,
) -> str:
    """Both sides get one once the peer accepted: from now on the service passes on their ICE
    candidates, and relays their binary frames if `relay`. `turn`: credentials for this side
    alone, or None. `peer_certificate`: the other side's identity (base64 DER), to pin."""
    return encode(
        {
            "type": ServerMessageType.INTRODUCTION,
            "introduction_id": introduction_id,
            "request_id": request_id,
            "peer_id": peer_id,
            "role": role,
            "relay": relay,
            "turn": turn,
            "transport": transport,
            "peer_certificate": peer_certificate,
        }
    )


def introduction_rejected(introduction_id: str) -> str:
    return encode(
        {"type": ServerMessageType.INTRODUCTION_REJECTED, "introduction_id": introduction_id}
    )


def ice_candidates(message: IceCandidates) -> str:
    """The peer's candidates, as validated (each candidate in canonical form)."""
    return encode({"type": ServerMessageType.ICE_CANDIDATES, **message.as_dict()})


def path_report_recorded(introduction_id: str, kind: PathKind) -> str:
    return encode(
        {
            "type": ServerMessageType.PATH_REPORT_RECORDED,
            "introduction_id": introduction_id,
            "kind": kind,
        }
    )


def peer_closed(*, introduction_id: str, peer_id: str, reason: str) -> str:
    return encode(
        {
            "type": ServerMessageType.PEER_CLOSED,
            "introduction_id": introduction_id,
            "peer_id": peer_id,
            "reason": reason[:MAX_DETAIL_LENGTH],
        }
    )


# ---- the service relay: binary frames ---------------------------------------------------------
#
# A relay frame is one binary WebSocket frame:
#   byte 0        RELAY_DATA (1)
#   bytes 1-16    the introduction id, as 16 raw bytes
#   then          one or more datagrams, each a 2-byte big-endian length and that many bytes
# The service checks the header and the packing and forwards the frame unchanged to the peer of
# that introduction, whose agent unpacks it. Small datagrams ride together in one frame.

RELAY_DATA = 1
RELAY_HEADER_BYTES = 17
RELAY_LENGTH_BYTES = 2
# Frames up to this size are relayed; daphne's transport limit (manage.py serve) sits above it,
# so a larger frame still gets RELAY_FRAME_TOO_LARGE rather than a dropped connection.
RELAY_MAX_FRAME_BYTES = 65536
MAX_DATAGRAM_BYTES = RELAY_MAX_FRAME_BYTES - RELAY_HEADER_BYTES - RELAY_LENGTH_BYTES


def relay_frame_id(frame: bytes) -> str:
    """The introduction id in the header of a relay frame already checked (as it is relayed)."""
    return frame[1:RELAY_HEADER_BYTES].hex()


def relay_frame_introduction(frame: bytes, *, max_bytes: int = RELAY_MAX_FRAME_BYTES) -> str:
    """The introduction a relay frame is for, once its header and packing check out; or the
    RelayError that says what is wrong. The datagrams themselves are never looked into."""
    size = len(frame)
    introduction_id = relay_frame_id(frame) if size >= RELAY_HEADER_BYTES else None
    if size > max_bytes:
        raise RelayError(
            f"relay frames are limited to {max_bytes} bytes",
            code=ErrorCode.RELAY_FRAME_TOO_LARGE,
            introduction_id=introduction_id,
        )
    if introduction_id is None or frame[0] != RELAY_DATA:
        raise RelayError(
            "a relay frame starts with byte 1 and a 16-byte introduction id",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    offset = RELAY_HEADER_BYTES
    if offset == size:
        raise RelayError(
            "a relay frame carries at least one datagram",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    while offset < size:
        if offset + RELAY_LENGTH_BYTES > size:
            break
        offset += RELAY_LENGTH_BYTES + int.from_bytes(frame[offset : offset + RELAY_LENGTH_BYTES])
    if offset != size:
        raise RelayError(
            "the datagram lengths in a relay frame do not add up to its size",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    return introduction_id
