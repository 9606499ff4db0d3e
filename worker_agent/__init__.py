"""The Rendezvous worker agent: keeps a worker registered with the service over a WebSocket.

Needs only `websocket-client` and the standard library; it imports nothing from the service.
The names below are loaded on first use, so that a command of `rendezvous-worker` (a client of
the running agent) starts without loading the agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
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

_WHERE = {
    "AgentState": "agent",
    "WorkerAgent": "agent",
    "AgentGroup": "agents",
    "run_agents": "agents",
    "PeerConnection": "connection",
    "PeerStream": "connection",
    **dict.fromkeys(
        [
            "HandshakeFailed",
            "IdentityMismatch",
            "NoPath",
            "P2PUnavailable",
            "PeerClosed",
            "PeerError",
            "PeerRefused",
            "PeerUnavailable",
            "PeerUnresponsive",
            "PolicyDenied",
            "StreamReset",
        ],
        "errors",
    ),
    **dict.fromkeys(
        [
            "Callbacks",
            "EnrolmentOptions",
            "PeerOptions",
            "ReconnectOptions",
            "ReportingOptions",
            "ServiceOptions",
        ],
        "options",
    ),
    "PeerPath": "paths.path",
    "Backoff": "service.backoff",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'worker_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
