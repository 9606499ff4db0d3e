"""Rate limits per connection: bursts are fine, a sustained flood is not."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


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


class Flood(Enum):
    """What to do with a message `MessageRate` did not let through."""

    DROP = "drop"  # drop it quietly: the sender was told at the start of this streak
    WARN = "warn"  # drop it and tell the sender (once per streak of drops)
    CLOSE = "close"  # the drops keep coming: close the connection


class MessageRate:
    """A connection's text messages: bursts are fine; a message over the rate is dropped, the
    first of each streak of drops is answered with an error, and a connection whose drops keep
    coming (`close_after` of them, with no gap of `memory` seconds) is closed."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        close_after: int,
        memory: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
        self._close_after = close_after
        self._memory = memory
        self._clock = clock
        self._dropped = 0
        self._last_drop = 0.0
        self._streak = False

    def admit(self) -> Flood | None:
        """None to let the message through; otherwise what to do about dropping it."""
        if self._bucket.take():
            self._streak = False
            return None
        now = self._clock()
        if now - self._last_drop > self._memory:
            self._dropped = 0  # a burst long ago does not count towards closing the connection
        self._last_drop = now
        self._dropped += 1
        if self._dropped >= self._close_after:
            return Flood.CLOSE
        if self._streak:
            return Flood.DROP
        # One error per streak of dropped messages: a flood is not answered with a flood.
        self._streak = True
        return Flood.WARN
