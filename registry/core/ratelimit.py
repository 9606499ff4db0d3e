"""A token bucket per connection: bursts are fine, a sustained flood is not."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self, cost: float = 1.0) -> bool:
        """Spend `cost` tokens (one message, or a frame's bytes); False when the bucket holds
        fewer (the message must be dropped, and nothing is spent)."""
        if self.peek(cost):
            self._tokens -= cost
            return True
        return False

    def peek(self, cost: float = 1.0) -> bool:
        """Whether `cost` tokens are available now, without spending them."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens >= cost
