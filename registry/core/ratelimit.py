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


class Streak:
    """Refusals of one kind, told once: the first of a streak is reported (an error frame, a log
    line) and the rest only counted; a streak ends after `quiet` seconds without a refusal. A
    sender just over a limit (one refusal between admitted messages) stays in one streak."""

    __slots__ = ("_clock", "_last", "count", "quiet")

    def __init__(self, *, quiet: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self._clock = clock
        self._last: float | None = None
        self.count = 0  # refusals in the current (or the last) streak

    def refused(self) -> bool:
        """Count one refusal; True if it starts a streak (tell the sender, log it)."""
        now = self._clock()
        first = self._last is None or now - self._last > self.quiet
        self._last = now
        self.count = 1 if first else self.count + 1
        return first


class Flood(Enum):
    """What to do with a message `MessageRate` did not let through."""

    DROP = "drop"  # drop it quietly: the sender was told at the start of this streak
    WARN = "warn"  # drop it and tell the sender (once per streak of drops)
    CLOSE = "close"  # the drops keep coming: close the connection


class MessageRate:
    """A connection's text messages: bursts are fine; a message over the rate is dropped, the
    first of each streak of drops (drops less than `memory` seconds apart) is answered with an
    error, and a connection whose streak reaches `close_after` drops is closed."""

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
        self._drops = Streak(quiet=memory, clock=clock)

    @property
    def dropped(self) -> int:
        """Messages dropped in the current (or the last) streak."""
        return self._drops.count

    def admit(self) -> Flood | None:
        """None to let the message through; otherwise what to do about dropping it."""
        if self._bucket.take():
            return None
        first = self._drops.refused()
        if self._drops.count >= self._close_after:
            return Flood.CLOSE
        return Flood.WARN if first else Flood.DROP
