"""The protocol's names and numbers: its versions, the message types, the enums frames carry,
and the close codes with their reasons (docs/protocol.md)."""

from __future__ import annotations

from enum import IntEnum, StrEnum

# Version 3: `peer_closed` says why an introduction ended (`code`), and a `connect_request` may
# resume an introduction whose service link went (`resumes`): agents that see 3 in `welcome`
# keep their connections across a renewed WebSocket and resume them.
PROTOCOL_VERSION = 3
# Peer messages: `connect_request` and `introduction_accept` say which version they speak. An
# agent below MIN_PEER_PROTOCOL_VERSION (before ICE and the service relay) gets AGENT_OUTDATED
# instead of an introduction it could not use; one below RESUMING_PEER_PROTOCOL_VERSION is not
# asked to resume an introduction.
PEER_PROTOCOL_VERSION = 3
MIN_PEER_PROTOCOL_VERSION = 2
RESUMING_PEER_PROTOCOL_VERSION = 3


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
    """How a worker's NAT maps its UDP socket, from two STUN servers
    (the agent's check: worker_agent/paths/netcheck.py)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


class PortMappingProtocol(StrEnum):
    """How a worker's router mapped a UDP port for it (the agent's worker_agent/paths/portmap/)."""

    NAT_PMP = "nat-pmp"  # RFC 6886
    PCP = "pcp"  # RFC 6887
    UPNP = "upnp"  # UPnP Internet Gateway Device


class PathKind(StrEnum):
    """Which route carries a peer connection's data, best first (docs/nat-traversal.md)."""

    LAN = "lan"  # host to host candidate on one private network or link
    DIRECT = "direct"  # between networks: punched, port-mapped, or global IPv6 host to host
    TURN = "turn"  # through a TURN server (coturn)
    RELAY = "relay"  # through this service, over the workers' WebSockets


class IcePolicy(StrEnum):
    """Which candidates an ICE attempt gathers (aioice's transport policy)."""

    ALL = "all"  # host and server-reflexive candidates: LAN and direct paths
    RELAY = "relay"  # TURN relay candidates only
    # Not ICE: hard-NAT probing's public endpoints and token (RENDEZVOUS_HARD_NAT_PROBING)
    PROBE = "probe"


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
    RATE_LIMITED = "RATE_LIMITED"  # connect requests over peering.requester.REQUEST_RATE
    TOO_MANY_PEERS = "TOO_MANY_PEERS"  # either side holds RELAY_MAX_PEERS peer links already
    AGENT_OUTDATED = "AGENT_OUTDATED"  # either side's agent speaks an older peer protocol
    NO_IDENTITY = "NO_IDENTITY"  # a QUIC connection, and either side presented no certificate
    POLICY_DENIED = "POLICY_DENIED"  # the peer policy does not let the requester reach the target


class PeerClosedCode(StrEnum):
    """Why an introduction ended (`peer_closed`)."""

    CLOSED = "CLOSED"  # either side closed it
    PEER_OFFLINE = "PEER_OFFLINE"  # the peer's connection to the service ended: it may resume
    POLICY_DENIED = "POLICY_DENIED"  # the peer rules no longer allow the pair
    TOO_MANY_PEERS = "TOO_MANY_PEERS"  # this side held too many peers when it was made (or used)
    UNUSED = "UNUSED"  # neither side sent anything on it in time (UNUSED_INTRODUCTION_TIMEOUT)


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
