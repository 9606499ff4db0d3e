"""The Rendezvous worker agent: keeps a worker registered with the service over a WebSocket.

Needs only `websocket-client` and the standard library; it imports nothing from the service.
"""

from .agent import AgentState, WorkerAgent
from .agents import AgentGroup, run_agents
from .connection import PeerConnection, PeerStream
from .errors import (
    HandshakeFailed,
    IdentityMismatch,
    NoPath,
    P2PUnavailable,
    PeerClosed,
    PeerError,
    PeerRefused,
    PeerUnavailable,
    PeerUnresponsive,
    PolicyDenied,
    StreamReset,
)
from .options import (
    Callbacks,
    EnrolmentOptions,
    PeerOptions,
    ReconnectOptions,
    ReportingOptions,
    ServiceOptions,
)
from .paths.path import PeerPath
from .service.backoff import Backoff
from .version import __version__

__all__ = [
    "AgentGroup",
    "AgentState",
    "Backoff",
    "Callbacks",
    "EnrolmentOptions",
    "HandshakeFailed",
    "IdentityMismatch",
    "NoPath",
    "P2PUnavailable",
    "PeerClosed",
    "PeerConnection",
    "PeerError",
    "PeerOptions",
    "PeerPath",
    "PeerRefused",
    "PeerStream",
    "PeerUnavailable",
    "PeerUnresponsive",
    "PolicyDenied",
    "ReconnectOptions",
    "ReportingOptions",
    "ServiceOptions",
    "StreamReset",
    "WorkerAgent",
    "__version__",
    "run_agents",
]
