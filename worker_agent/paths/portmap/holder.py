"""The agent's one `PortMapper`, made on first use on the peer loop.

Importing this needs only the standard library: the mapper (aioice's neighbours, aiohttp for
UPnP) is imported when the peer loop exists, as every other p2p module is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..loop import LoopThread
    from .manager import PortMapper

logger = logging.getLogger("worker_agent.portmap")

ENVIRONMENT = "RENDEZVOUS_PORT_MAPPING"
OFF = frozenset({"off", "0", "false", "no"})


def enabled_by_environment(environ: Any = None) -> bool:
    """RENDEZVOUS_PORT_MAPPING=off (or 0, false, no) turns port mapping off; on by default."""
    value = (os.environ if environ is None else environ).get(ENVIRONMENT, "")
    return value.strip().lower() not in OFF


class PortMapperHolder:
    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._mapper: PortMapper | None = None

    def get(self) -> PortMapper | None:
        """The mapper (made now if need be); None when port mapping is off."""
        if not self.enabled:
            return None
        from .manager import PortMapper

        with self._lock:
            if self._mapper is None:
                self._mapper = PortMapper()
            return self._mapper

    def probe_soon(self, loop: LoopThread) -> None:
        """Probe the gateway now, in the background (the agent starts)."""
        mapper = self.get()
        if mapper is None:
            return
        # Imported here, not on the peer loop: aiohttp takes a few hundred milliseconds. Without
        # it the mapper says why it has no UPnP.
        with contextlib.suppress(ImportError):
            from . import upnp  # noqa: F401
        loop.submit(mapper.probe())

    def status(self) -> dict[str, Any] | None:
        with self._lock:
            mapper = self._mapper
        return None if mapper is None else mapper.snapshot()

    def release(self, loop: LoopThread, timeout: float = 2.0) -> None:
        """Every mapping deleted at the gateway, bounded: one that went away holds nothing up."""
        with self._lock:
            mapper = self._mapper
        if mapper is None or loop.in_loop() or not loop.running:
            return
        try:
            loop.call(mapper.close(), timeout)
        except Exception as exc:  # the agent stops all the same
            logger.info("port mappings not all deleted: %s", exc)
