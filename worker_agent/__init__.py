"""The Rendezvous worker agent: keeps a worker registered with the service over a WebSocket.

Needs only `websocket-client` and the standard library; it imports nothing from the service.
"""

from .agent import AgentState, WorkerAgent
from .agents import AgentGroup, run_agents
from .backoff import Backoff
from .peering import (
    PeerError,
    PeerRefused,
    PeerUnavailable,
    PunchFailed,
    PunchImpossible,
    StunFailed,
)
from .punch import PeerPath
from .version import __version__

__all__ = [
    "AgentGroup",
    "AgentState",
    "Backoff",
    "PeerError",
    "PeerPath",
    "PeerRefused",
    "PeerUnavailable",
    "PunchFailed",
    "PunchImpossible",
    "StunFailed",
    "WorkerAgent",
    "__version__",
    "run_agents",
]
