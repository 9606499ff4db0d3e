"""What a worker may send: one frozen dataclass per client message, as `parse` makes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry.core.protocol.codes import (
    IcePolicy,
    NatMapping,
    PathKind,
    PortMappingProtocol,
    Transport,
)
from registry.core.protocol.fields import UdpEndpoint


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
class PortMapping:
    """The router's mapping of the report's UDP socket (NAT-PMP, PCP or UPnP IGD)."""

    protocol: PortMappingProtocol
    external: UdpEndpoint


@dataclass(frozen=True, slots=True)
class NatReport:
    mapping: NatMapping
    udp_endpoint: UdpEndpoint | None
    port_mapping: PortMapping | None = None


@dataclass(frozen=True, slots=True)
class ListPeers:
    tag: str | None
    request_id: str | None
    offline: bool = False  # also the workers that are not connected, each with `online`


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
    resumes: str | None = None  # the introduction this one replaces, its connection carrying on


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
