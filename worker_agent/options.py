"""What a `WorkerAgent` can be told, in groups that say what each option is for.

Each group is a frozen dataclass that checks its values when it is made. `WorkerAgent` takes
the groups (`service=ServiceOptions(...)`) and, as a shorthand, any of their fields as a
keyword of its own (`WorkerAgent(url, heartbeat_interval=5, on_peer=echo)`): `grouped` sorts
the keywords into their groups and refuses one that belongs to none.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import wire
from .service.backoff import Backoff
from .service.public_ip import DEFAULT_IP_ECHO_URL, DEFAULT_TIMEOUT
from .service.reconnect import (
    DEFAULT_MAX_SUPERSEDED,
    DEFAULT_SUPERSEDED_DELAY,
    DEFAULT_SUPERSEDED_RESET_AFTER,
)

if TYPE_CHECKING:
    from .connection import PeerConnection
    from .paths.path import PeerPath

DEFAULT_PING_INTERVAL = 25.0
DEFAULT_PING_TIMEOUT = 25.0
DEFAULT_CONNECT_TIMEOUT = 30.0
# How long stop() waits for the server to answer the close frame before cutting the socket.
CLOSE_GRACE = 3.0

# Each callback gets the agent first: a `WorkerAgent`, typed Any here because the agent module
# imports this one.
MessageCallback = Callable[[Any, dict[str, Any]], None]
StateCallback = Callable[[Any, str, str], None]
PeerCallback = Callable[[Any, "PeerConnection"], None]
PathCallback = Callable[[Any, "PeerPath"], None]


@dataclass(frozen=True)
class ServiceOptions:
    """How the agent talks to the service: keep-alive, timeouts, what the handshake carries."""

    ping_interval: float = DEFAULT_PING_INTERVAL  # WebSocket pings (0: none)
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    heartbeat_interval: float | None = None  # None: what the service says in `welcome`
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    close_timeout: float = CLOSE_GRACE
    header: Mapping[str, str] = field(default_factory=dict)
    suppress_origin: bool = False
    sslopt: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        interval = self.ping_interval
        if not isinstance(interval, int | float) or interval < 0 or not math.isfinite(interval):
            raise ValueError("ping_interval must be 0 (no pings) or a positive number of seconds")
        timeout = self.ping_timeout
        if timeout is not None and (
            not isinstance(timeout, int | float) or timeout < 0 or not math.isfinite(timeout)
        ):
            raise ValueError("ping_timeout must be a positive number of seconds")
        if self.heartbeat_interval is not None and not positive(self.heartbeat_interval):
            raise ValueError("heartbeat_interval must be a positive number of seconds")
        if not positive(self.connect_timeout):
            raise ValueError("connect_timeout must be a positive number of seconds")


@dataclass(frozen=True)
class EnrolmentOptions:
    """Who this worker is to a secured service (docs/security.md)."""

    enrolment_key: str | None = None
    credential: str | None = None
    credential_file: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class ReportingOptions:
    """What the agent tells the service about itself once registered."""

    ip_echo_url: str | None = DEFAULT_IP_ECHO_URL
    ip_echo_timeout: float = DEFAULT_TIMEOUT
    public_ip_fetcher: Callable[[], str | None] | None = None
    agent_info: Mapping[str, wire.Scalar] | None = None
    report_nat: bool = True


@dataclass(frozen=True)
class ReconnectOptions:
    """When to connect again (docs/agent.md, "Connection life")."""

    backoff: Backoff | None = None
    superseded_delay: float = DEFAULT_SUPERSEDED_DELAY
    max_superseded: int | None = DEFAULT_MAX_SUPERSEDED
    superseded_reset_after: float = DEFAULT_SUPERSEDED_RESET_AFTER


@dataclass(frozen=True)
class PeerOptions:
    """Peer connections: where to find STUN, whether to use UDP at all, port mapping; the peer
    API (what the command line's ping, forward, pipe and send ask of the peer's agent)."""

    stun_servers: Sequence[str] | None = None  # None: what the service says in `welcome`
    peer_udp: bool = True  # False: the service relay only
    # Ask the home router for UDP port mappings (NAT-PMP, PCP, UPnP IGD: docs/nat-traversal.md).
    # None: on, unless the environment says RENDEZVOUS_PORT_MAPPING=off.
    port_mapping: bool | None = None
    peer_api: bool = False  # serve the peer API to peers, beside any on_peer of the host's
    expose: Sequence[str] = ()  # `[HOST:]PORT` peers may forward to (with peer_api)
    inbox: str | os.PathLike[str] | None = None  # where peers' files go without `receive`

    def __post_init__(self) -> None:
        from .peerapi.exposure import parse_endpoint

        for entry in self.expose:
            parse_endpoint(entry)  # ValueError names the bad entry
        if (self.expose or self.inbox) and not self.peer_api:
            raise ValueError("expose and inbox need peer_api=True")


@dataclass(frozen=True)
class Callbacks:
    """Called on the agent's threads with the agent first: keep them short."""

    on_message: MessageCallback | None = None
    on_registered: MessageCallback | None = None
    on_state_change: StateCallback | None = None
    on_peer: PeerCallback | None = None  # an encrypted connection a peer opened to us
    on_peer_path: PathCallback | None = None  # a raw datagram path a peer opened to us


GROUPS: dict[str, type[Any]] = {
    "service": ServiceOptions,
    "enrolment": EnrolmentOptions,
    "reporting": ReportingOptions,
    "reconnect": ReconnectOptions,
    "peers": PeerOptions,
    "callbacks": Callbacks,
}
_OWNER = {f.name: name for name, group in GROUPS.items() for f in dataclasses.fields(group)}


def grouped(given: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """Every group, from the group objects `given` (by group name, None: defaults) with the
    `flat` keywords applied on top; TypeError for a keyword no group has."""
    unknown = sorted(set(flat) - set(_OWNER))
    if unknown:
        raise TypeError(f"WorkerAgent() got an unexpected keyword argument {unknown[0]!r}")
    result = {}
    for name, group in GROUPS.items():
        mine = {key: value for key, value in flat.items() if _OWNER[key] == name}
        base = given.get(name)
        if base is None:
            result[name] = group(**mine)
        else:
            result[name] = dataclasses.replace(base, **mine) if mine else base
    return result


def positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
