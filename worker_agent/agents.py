"""Several agents in one process, with one health server: `rendezvous-worker --count N` and
`manage.py runworker --count N` both run through here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from .agent import AgentState, WorkerAgent
from .health import HealthServer
from .service import credentials

logger = logging.getLogger("worker_agent")


class AgentGroup:
    """Builds every agent first (so a bad URL or id fails before anything connects), then runs
    them together. With `health_port` set (0 picks a free port) it also serves the health check.
    """

    def __init__(
        self,
        url: str,
        count: int | None = None,
        worker_ids: Sequence[str] | None = None,
        *,
        health_host: str = "0.0.0.0",
        health_port: int | None = None,
        **agent_kwargs: Any,
    ) -> None:
        if worker_ids is not None:
            if count is not None and count != len(worker_ids):
                raise ValueError(f"count is {count} but {len(worker_ids)} worker ids were given")
            ids: list[str | None] = list(worker_ids)
        else:
            if count is None:
                count = 1
            if count < 1:
                raise ValueError("count must be at least 1")
            ids = [None] * count
        if len(set(i for i in ids if i is not None)) != len([i for i in ids if i is not None]):
            raise ValueError("worker ids must be distinct: agents sharing one would supersede")
        credential_file = agent_kwargs.pop("credential_file", None)
        self.agents = [
            WorkerAgent(
                url,
                worker_id,
                credential_file=None
                if credential_file is None
                else credentials.numbered(credential_file, index),
                **agent_kwargs,
            )
            for index, worker_id in enumerate(ids)
        ]
        self.health = (
            None
            if health_port is None
            else HealthServer(health_host, health_port, status=self.status)
        )

    def start(self) -> None:
        if self.health is not None:
            self.health.start()
        for agent in self.agents:
            agent.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop every agent in parallel (each close waits for the server's reply)."""
        results: dict[int, bool] = {}

        def stop_one(index: int, agent: WorkerAgent) -> None:
            results[index] = agent.stop(timeout)

        threads = [
            threading.Thread(target=stop_one, args=(i, agent), daemon=True)
            for i, agent in enumerate(self.agents)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 1)
        if self.health is not None:
            self.health.stop()
        return len(results) == len(self.agents) and all(results.values())

    def all_refused(self) -> bool:
        return all(agent.state == AgentState.REFUSED for agent in self.agents)

    def wait(self, stop_event: threading.Event, poll: float = 0.5) -> str:
        """Block until `stop_event` is set ("stopped") or every agent was refused ("refused").

        Superseded agents do not end the wait: the process stays up, so a restart policy does
        not bring it back to fight over the id again.
        """
        while not stop_event.wait(poll):
            if self.all_refused():
                return "refused"
        return "stopped"

    def status(self) -> dict[str, Any]:
        """One agent: its snapshot. Several: counts and every snapshot."""
        if len(self.agents) == 1:
            return self.agents[0].status()
        statuses = [agent.status() for agent in self.agents]
        return {
            "count": len(statuses),
            "registered": sum(1 for s in statuses if s["registered"]),
            "agents": statuses,
        }

    def __enter__(self) -> AgentGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_agents(
    url: str,
    count: int | None = None,
    worker_ids: Sequence[str] | None = None,
    *,
    stop_event: threading.Event,
    health_host: str = "0.0.0.0",
    health_port: int | None = None,
    stop_timeout: float = 10.0,
    **agent_kwargs: Any,
) -> str:
    """Run `count` agents until `stop_event` is set; returns how the run ended (see `wait`)."""
    group = AgentGroup(
        url,
        count,
        worker_ids,
        health_host=health_host,
        health_port=health_port,
        **agent_kwargs,
    )
    group.start()
    try:
        ended = group.wait(stop_event)
    finally:
        if not group.stop(stop_timeout):
            logger.warning("some agents did not stop within %ss", stop_timeout)
    return ended
