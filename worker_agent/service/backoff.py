"""Reconnection delays: exponential backoff with full jitter.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): the n-th delay is drawn
uniformly from [0, min(cap, base * 2**n)], so a fleet that lost its server together does not
come back together. For `fast_for` seconds after a registered connection ended (a service
restart, a network blip) the delays stay within [0, base] instead: a restart of a few seconds
costs its workers a few seconds, not the 8 or 16 of the third and fourth draw, and what rides on
their connections (relayed peer connections, resumed under a new introduction) outlives it. A
connection lost again within that window does not extend it (a service that accepts and drops
workers is not hammered for long); after it the exponent counts on.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

Uniform = Callable[[float, float], float]

DEFAULT_BASE = 2.0
DEFAULT_CAP = 60.0
DEFAULT_STABLE_AFTER = 30.0
DEFAULT_FAST_FOR = 60.0

# 2**64 seconds dwarfs any cap; bounding the exponent keeps the arithmetic finite.
_MAX_EXPONENT = 64


class Backoff:
    """Delays before successive reconnection attempts; forgets failures after a stable connection.

    `uniform` is the random source (`random.uniform` by default); tests pass a fixed one.
    """

    def __init__(
        self,
        *,
        base: float = DEFAULT_BASE,
        cap: float = DEFAULT_CAP,
        stable_after: float = DEFAULT_STABLE_AFTER,
        fast_for: float = DEFAULT_FAST_FOR,
        uniform: Uniform | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base <= 0:
            raise ValueError("backoff base must be positive")
        if cap < base:
            raise ValueError("backoff cap must be at least the base")
        if stable_after < 0:
            raise ValueError("stable_after must not be negative")
        if fast_for < 0:
            raise ValueError("fast_for must not be negative")
        self.base = float(base)
        self.cap = float(cap)
        self.stable_after = float(stable_after)
        self.fast_for = float(fast_for)
        self.uniform: Uniform = uniform or random.uniform
        self.clock = clock
        self.attempt = 0
        self._lost_at: float | None = None  # when the quick retries began

    def ceiling(self, attempt: int | None = None) -> float:
        """The upper bound of the delay drawn for `attempt` (the next one by default)."""
        n = self.attempt if attempt is None else attempt
        return min(self.cap, self.base * 2 ** min(n, _MAX_EXPONENT))

    def next_delay(self) -> float:
        if self.fast():
            return max(0.0, self.uniform(0.0, self.base))
        delay = self.uniform(0.0, self.ceiling())
        self.attempt += 1
        return max(0.0, delay)

    def fast(self) -> bool:
        """Whether the quick retries after a registered connection's end are still on."""
        return self._lost_at is not None and self.clock() - self._lost_at < self.fast_for

    def registered_connection_ended(self) -> None:
        """A connection that was registered ended: retry quickly for `fast_for` seconds, unless
        such a window is on already."""
        if not self.fast():
            self._lost_at = self.clock()

    def reset(self) -> None:
        self.attempt = 0

    def connection_lasted(self, seconds: float) -> bool:
        """Report how long a connection stayed up; a stable one resets the backoff."""
        if seconds >= self.stable_after:
            self.reset()
            return True
        return False
