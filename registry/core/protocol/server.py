"""What the service sends: one function per server message, each returning the frame's text."""

from __future__ import annotations

import json
from typing import Any

from registry.core.protocol.client import IceCandidates
from registry.core.protocol.codes import (
    CLOSE_REASONS,
    PEER_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    CloseCode,
    ConnectFailure,
    NatMapping,
    PathKind,
    PeerClosedCode,
    ServerMessageType,
    Transport,
)
from registry.core.protocol.errors import ProtocolError, RelayError
from registry.core.protocol.fields import MAX_DETAIL_LENGTH


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
    turn_servers: list[str] | None = None,
    relay: bool = True,
) -> str:
    """`credential` only on enrolment: the worker's secret for every later connection.
    `turn_servers` are addresses only (credentials come per introduction): what an agent's
    netcheck can test reachability of; `relay` says whether the service relays peer traffic."""
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
            "turn_servers": turn_servers or [],
            "relay": relay,
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


def introduction_request(
    *, introduction_id: str, peer_id: str, transport: Transport, resumes: str | None = None
) -> str:
    """`resumes`: the introduction with this peer that the new one replaces (the target's
    agent carries its connection on under the new one)."""
    extra = {"resumes": resumes} if resumes else {}
    return encode(
        {
            "type": ServerMessageType.INTRODUCTION_REQUEST,
            "introduction_id": introduction_id,
            "peer_id": peer_id,
            "protocol_version": PEER_PROTOCOL_VERSION,
            "transport": transport,
            **extra,
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
    hard_nat: str | None = None,
) -> str:
    """Both sides get one once the peer accepted: from now on the service passes on their ICE
    candidates, and relays their binary frames if `relay`. `turn`: credentials for this side
    alone, or None. `peer_certificate`: the other side's identity (base64 DER), to pin.
    `hard_nat`: this side's part in hard-NAT probing ("hard" or "easy"), only when it probes."""
    extra = {"hard_nat": hard_nat} if hard_nat else {}
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
            **extra,
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


def peer_closed(
    *,
    introduction_id: str,
    peer_id: str,
    reason: str,
    code: PeerClosedCode = PeerClosedCode.CLOSED,
) -> str:
    return encode(
        {
            "type": ServerMessageType.PEER_CLOSED,
            "introduction_id": introduction_id,
            "peer_id": peer_id,
            "code": code,
            "reason": reason[:MAX_DETAIL_LENGTH],
        }
    )
