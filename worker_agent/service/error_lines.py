"""How often the session logs the service's error frames: a flood of one code (a peer over its
relay budget, say) is a line every few seconds with a count, not a line per frame."""

from __future__ import annotations

import time
from collections.abc import Callable


class ErrorLines:
    """When a log line for an error code is due: at most one per code every `quiet` seconds."""

    def __init__(self, quiet: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.clock = clock
        self._codes: dict[str, tuple[float, int]] = {}  # code -> (last line at, repeats since)

    def due(self, code: str) -> int | None:
        """None: this one is only counted; otherwise log it, with how many were not logged."""
        now = self.clock()
        last = self._codes.get(code)
        if last is not None and now - last[0] < self.quiet:
            self._codes[code] = (last[0], last[1] + 1)
            return None
        self._codes[code] = (now, 0)
        return last[1] if last is not None else 0
