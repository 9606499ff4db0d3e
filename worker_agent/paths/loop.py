"""The agent's asyncio loop for peer connections, in a daemon thread of its own.

aioice (and aioquic above it) are asyncio libraries, while the agent and its host program are
synchronous: everything peer-to-peer runs on this one loop, and the synchronous API hands work
to it and waits for the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import PeerClosed

logger = logging.getLogger("worker_agent.p2p")

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (from any other thread)."""
        try:
            future = self.submit(coroutine)
        except RuntimeError:  # the loop is closed: the agent has stopped
            coroutine.close()
            raise PeerClosed("the agent has stopped") from None
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        except concurrent.futures.CancelledError:  # the loop is shutting down: the agent stops
            raise PeerClosed("the agent is stopping") from None

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the agent is stopping
            logger.debug("peer loop closed; dropped a call to %r", callback)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.running:
            return

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if not self.in_loop():
            try:
                self.call(shutdown(), timeout)
            except (TimeoutError, RuntimeError):
                logger.debug("peer loop shutdown timed out")
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop():
            self._thread.join(timeout)
