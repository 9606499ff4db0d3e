"""The Rendezvous worker agent: keeps a worker registered with the service over a WebSocket.

Needs only `websocket-client` and the standard library; it imports nothing from the service.
"""

from .agent import AgentState, WorkerAgent
from .agents import AgentGroup, run_agents
from .backoff import Backoff
from .version import __version__

__all__ = ["AgentGroup", "AgentState", "Backoff", "WorkerAgent", "__version__", "run_agents"]
