"""Turning one text frame into a client message, or into the ProtocolError that says what is
wrong with it: the frame's size, its JSON, then one parser per message type."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from registry.core.protocol.candidates import (
    MAX_ATTEMPT,
    MAX_CANDIDATES,
    is_pwd,
    is_ufrag,
    parse_candidate,
)
from registry.core.protocol.client import (
    AgentInfo,
    ClientMessage,
    ConnectRequest,
    Heartbeat,
    IceCandidates,
    IntroductionAccept,
    IntroductionReject,
    ListPeers,
    NatReport,
    PathReport,
    PeerClose,
    PortMapping,
    RegisterPublicIp,
    SubscribePeers,
    UnsubscribePeers,
)
from registry.core.protocol.codes import (
    ClientMessageType,
    IcePolicy,
    NatMapping,
    PathKind,
    PortMappingProtocol,
    Transport,
)
from registry.core.protocol.errors import (
    FrameTooLarge,
    InvalidField,
    InvalidJson,
    MissingField,
    MissingType,
    NotAnObject,
    UnknownType,
)
from registry.core.protocol.fields import (
    MAX_DETAIL_LENGTH,
    REQUEST_ID_PATTERN,
    TAG_RULE,
    is_storable,
    is_valid_tag,
    is_valid_worker_id,
    normalize_ip,
    parse_udp_endpoint,
)

_REQUEST_ID_RE = re.compile(rf"\A{REQUEST_ID_PATTERN}\Z")
_INTRODUCTION_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")
# Frames above this many bytes of UTF-8 are refused with FRAME_TOO_LARGE; the connection stays.
DEFAULT_MAX_FRAME_BYTES = 4096
# What an agent may say about itself (`agent_info`): a flat object of short scalar values.
AGENT_INFO_MAX_KEYS = 32
AGENT_INFO_MAX_KEY_LENGTH = 64
AGENT_INFO_MAX_VALUE_LENGTH = 256


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


def _introduction_id(data: dict[str, Any], name: str = "introduction_id") -> str:
    value = data.get(name)
    if value is None:
        raise MissingField(f"'{name}' is required")
    if not isinstance(value, str) or not _INTRODUCTION_ID_RE.match(value):
        raise InvalidField(f"'{name}' must be 32 lowercase hex characters")
    return value


def _nat_mapping(value: Any) -> NatMapping:
    try:
        return NatMapping(value)
    except ValueError:
        raise InvalidField(
            f"'nat_mapping' must be one of {', '.join(m.value for m in NatMapping)}"
        ) from None


def _peer_id(data: dict[str, Any]) -> str:
    value = data.get("peer_id")
    if value is None:
        raise MissingField("'peer_id' is required")
    if not isinstance(value, str) or not is_valid_worker_id(value):
        raise InvalidField("'peer_id' is not a valid worker id")
    return value


def _detail(data: dict[str, Any], name: str) -> str:
    """Free text a worker gives (a `reason`): logged, recorded and passed to the peer."""
    value = data.get(name, "")
    if not isinstance(value, str):
        raise InvalidField(f"'{name}' must be a string")
    if not is_storable(value):
        raise InvalidField(f"'{name}' must not hold NUL characters or lone surrogates")
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
        port_mapping=_port_mapping(data.get("port_mapping")),
    )


def _port_mapping(value: Any) -> PortMapping | None:
    """`port_mapping`: null, or {"protocol": "nat-pmp" | "pcp" | "upnp", "external": endpoint}."""
    if value is None:
        return None
    if not isinstance(value, dict) or "protocol" not in value or "external" not in value:
        raise InvalidField(
            "'port_mapping' must be null or an object with 'protocol' and 'external'"
        )
    try:
        protocol = PortMappingProtocol(value["protocol"])
    except ValueError:
        names = ", ".join(p.value for p in PortMappingProtocol)
        raise InvalidField(f"'port_mapping.protocol' must be one of {names}") from None
    return PortMapping(protocol=protocol, external=parse_udp_endpoint(value["external"]))


def _parse_register_public_ip(data: dict[str, Any]) -> RegisterPublicIp:
    if "ip" not in data:
        raise MissingField("register_public_ip needs 'ip'")
    return RegisterPublicIp(ip=normalize_ip(data["ip"]))


def _parse_ice_candidates(data: dict[str, Any]) -> IceCandidates:
    attempt = data.get("attempt")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 0 <= attempt <= MAX_ATTEMPT:
        raise InvalidField(f"'attempt' must be an integer from 0 to {MAX_ATTEMPT}")
    try:
        policy = IcePolicy(data.get("policy"))
    except ValueError:
        raise InvalidField("'policy' must be 'all', 'relay' or 'probe'") from None
    ufrag, pwd = data.get("ufrag"), data.get("pwd")
    if not is_ufrag(ufrag):
        raise InvalidField("'ufrag' must be 4 to 256 ICE characters (A-Z a-z 0-9 + /)")
    if not is_pwd(pwd):
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
        tag=_optional_tag(d),
        request_id=_request_id(d, required=False),
        offline=d.get("offline") is True,
    ),
    ClientMessageType.SUBSCRIBE_PEERS: lambda d: SubscribePeers(tag=_optional_tag(d)),
    ClientMessageType.UNSUBSCRIBE_PEERS: lambda d: UnsubscribePeers(),
    ClientMessageType.CONNECT_REQUEST: lambda d: ConnectRequest(
        peer_id=_peer_id(d),
        request_id=_request_id(d, required=True) or "",
        protocol_version=_protocol_version(d),
        transport=_transport(d),
        resumes=_introduction_id(d, "resumes") if d.get("resumes") is not None else None,
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
        if not is_storable(key) or (isinstance(value, str) and not is_storable(value)):
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
