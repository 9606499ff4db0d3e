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

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the message must be dropped)."""
        if self.peek():
            self._tokens -= 1.0
            return True
        return False

    def peek(self) -> bool:
        """Whether a token is available now, without spending it."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens >= 1.0
