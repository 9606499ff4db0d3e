"""The Rendezvous worker agent: keeps a worker registered with the service over a WebSocket.

Needs only `websocket-client` and the standard library; it imports nothing from the service.
"""

from .agent import AgentState, WorkerAgent
from .agents import AgentGroup, run_agents
from .backoff import Backoff
from .p2p.connection import PeerConnection, PeerStream
from .p2p.errors import (
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
from .p2p.path import PeerPath
from .version import __version__

__all__ = [
    "AgentGroup",
    "AgentState",
    "Backoff",
    "HandshakeFailed",
    "IdentityMismatch",
    "NoPath",
    "P2PUnavailable",
    "PeerClosed",
    "PeerConnection",
    "PeerError",
    "PeerPath",
    "PeerRefused",
    "PeerStream",
    "PeerUnavailable",
    "PeerUnresponsive",
    "PolicyDenied",
    "StreamReset",
    "WorkerAgent",
    "__version__",
    "run_agents",
]
