"""Connection limits, checked at each handshake before anything is written.

Per instance: at most `max_total` sockets; per source address: at most `max_per_address`
sockets and `handshake_rate` new handshakes a second (bursts of ten seconds' worth). Per-address
limits are off by default, because whole fleets often share one address (Cloud NAT, a corporate
proxy); turn them on for a service open to the Internet. 0 means no limit.

Failed authentications (secured mode) are limited per address whatever the other settings:
after `auth_failures_per_minute` of them an address's handshakes are refused until the count
decays, which turns guessing keys into a trickle and keeps its cost off the database.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from registry.core.ratelimit import TokenBucket

# Forget an address's handshake bucket after this long without a handshake.
IDLE_BUCKET_SECONDS = 120.0
# Addresses whose failed authentications are remembered at most (the oldest are forgotten).
MAX_TRACKED_FAILURES = 100_000


def throttle_subject(address: str | None) -> str | None:
    """Whom a failure counts against: the address, or for IPv6 its /64, which one host holds."""
    if address is None or ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address


class Admission:
    def __init__(
        self,
        *,
        max_total: int,
        max_per_address: int,
        handshake_rate: float,
        auth_failures_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.handshake_rate = handshake_rate
        self.auth_failures_per_minute = auth_failures_per_minute
        self._clock = clock
        self._open: dict[str | None, int] = {}
        self.total = 0
        self._buckets: dict[str, tuple[TokenBucket, float]] = {}
        self._failures: dict[str | None, tuple[TokenBucket, float]] = {}
        self._next_prune = 0.0

    def refusal(self, address: str | None) -> str | None:
        """Why a new connection from `address` must be refused now, or None to admit it."""
        if self.max_total and self.total >= self.max_total:
            return "this instance holds its maximum of connections"
        failures = self._failures.get(throttle_subject(address))
        if failures is not None and not failures[0].peek():
            return "too many failed authentications from your address"
        if address is None:
            return None
        if self.handshake_rate and not self._take_handshake(address):
            return "too many handshakes from your address"
        if self.max_per_address and self._open.get(address, 0) >= self.max_per_address:
            return "too many connections from your address"
        return None

    def opened(self, address: str | None) -> None:
        self.total += 1
        self._open[address] = self._open.get(address, 0) + 1

    def closed(self, address: str | None) -> None:
        self.total -= 1
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)

    def authentication_failed(self, address: str | None) -> None:
        if not self.auth_failures_per_minute:
            return
        now = self._clock()
        self._prune(now)
        address = throttle_subject(address)
        if address not in self._failures and len(self._failures) >= MAX_TRACKED_FAILURES:
            oldest = sorted(self._failures.items(), key=lambda item: item[1][1])
            self._failures = dict(oldest[MAX_TRACKED_FAILURES // 2 :])
        entry = self._failures.get(address)
        bucket = (
            entry[0]
            if entry
            else TokenBucket(
                rate=self.auth_failures_per_minute / 60.0,
                burst=self.auth_failures_per_minute,
                clock=self._clock,
            )
        )
        bucket.take()
        self._failures[address] = (bucket, now)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + IDLE_BUCKET_SECONDS
        self._buckets = {
            a: (b, seen)
            for a, (b, seen) in self._buckets.items()
            if now - seen < IDLE_BUCKET_SECONDS
        }
        self._failures = {
            a: (b, seen)
            for a, (b, seen) in self._failures.items()
            if now - seen < IDLE_BUCKET_SECONDS
        }

    def _take_handshake(self, address: str) -> bool:
        now = self._clock()
        self._prune(now)
        entry = self._buckets.get(address)
        bucket = (
            entry[0]
            if entry
            else TokenBucket(
                rate=self.handshake_rate,
                burst=max(1, int(10 * self.handshake_rate)),
                clock=self._clock,
            )
        )
        self._buckets[address] = (bucket, now)
        return bucket.take()
