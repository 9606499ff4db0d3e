"""The wire protocol between workers and the service: every message, field, rule and close code.

Nothing else in the project builds or parses a frame. `docs/protocol.md` documents this module;
keep the two in step. Compatible with the proof of concept: its only message,
`register_public_ip`, is unchanged, and everything it ignored is still harmless to send.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

PROTOCOL_VERSION = 1

# Worker ids: what fits in a URL path segment, a log line and a channel-layer group name.
WORKER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
WORKER_ID_MAX_LENGTH = 128
_WORKER_ID_RE = re.compile(rf"\A{WORKER_ID_PATTERN}\Z")

# Tags (copied from an enrolment key onto the workers it enrols; peers are filtered by them).
TAG_RULE = "1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
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


class ServerMessageType(StrEnum):
    WELCOME = "welcome"
    PUBLIC_IP_REGISTERED = "public_ip_registered"
    HEARTBEAT_ACK = "heartbeat_ack"
    AGENT_INFO_RECORDED = "agent_info_recorded"
    ERROR = "error"
    CLOSING = "closing"


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
    BINARY_NOT_SUPPORTED = "BINARY_NOT_SUPPORTED"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"


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


class BinaryNotSupported(ProtocolError):
    code = ErrorCode.BINARY_NOT_SUPPORTED


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class RateLimited(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class Unavailable(ProtocolError):
    """The frame was valid but the registry could not record it now; send it again later."""

    code = ErrorCode.UNAVAILABLE


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


ClientMessage = RegisterPublicIp | Heartbeat | AgentInfo


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
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise InvalidIp("ip must not carry an IPv6 zone")
    return address.compressed


def check_frame_size(text: str, max_bytes: int) -> None:
    # Cheap bound first: a str of n characters has between n and 4n UTF-8 bytes.
    if len(text) > max_bytes or (4 * len(text) > max_bytes and len(text.encode()) > max_bytes):
        raise FrameTooLarge(f"frames are limited to {max_bytes} bytes")


def parse_client_message(text: str, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> ClientMessage:
    """Turn one text frame into a message, or raise the ProtocolError that says what is wrong."""
    check_frame_size(text, max_bytes)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidJson("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise NotAnObject("frame must be a JSON object")
    kind = data.get("type")
    if kind is None:
        raise MissingType("frame has no 'type'")
    if not isinstance(kind, str):
        raise UnknownType("'type' must be a string")
    if kind == ClientMessageType.REGISTER_PUBLIC_IP:
        if "ip" not in data:
            raise MissingField("register_public_ip needs 'ip'")
        return RegisterPublicIp(ip=normalize_ip(data["ip"]))
    if kind == ClientMessageType.HEARTBEAT:
        return Heartbeat()
    if kind == ClientMessageType.AGENT_INFO:
        return AgentInfo(info=_validate_agent_info(data.get("info")))
    raise UnknownType(f"unknown message type {kind[:64]!r}")


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
    return encode({"type": ServerMessageType.ERROR, "code": exc.code, "message": exc.message})


def closing(code: CloseCode, reason: str | None = None) -> str:
    """Sent just before the server closes a socket: daphne cannot carry a close reason."""
    return encode(
        {
            "type": ServerMessageType.CLOSING,
            "code": int(code),
            "reason": reason or CLOSE_REASONS[code],
        }
    )
