"""The channel layers the settings choose between, each with one fix over its upstream class.

`InMemoryChannelLayer` (the default, single process): channels' in-memory layer without its stall.

channels' `InMemoryChannelLayer` scans every channel for expired messages on each receive and
each group send, so with one channel per connected worker the cost of every message grows with
the fleet (docs/performance.md). Here the scan runs at most
once per `CLEAN_INTERVAL` seconds, whatever the traffic; messages still expire within
`expiry + CLEAN_INTERVAL`. It stays process-local: more than one instance needs Redis.

`RedisChannelLayer` (with REDIS_URL): channels-redis, whose `receive` raises when Redis is away,
which ends the consumer and drops its worker's socket. Here a consumer waits for Redis to come
back instead, so a Redis restart costs connected workers nothing. Messages sent while it is away
are lost; each is a command already recorded in the database, which housekeeping carries out.
After a restart every idle pooled connection is dead and fails its first command, so a send
is tried once more on a fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer
from channels_redis.core import RedisChannelLayer as ChannelsRedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("registry.layers")

CLEAN_INTERVAL = 1.0


class InMemoryChannelLayer(ChannelsInMemoryChannelLayer):
    def __init__(self, *args: Any, clock: Callable[[], float] = time.monotonic, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # channels-redis compiles `channel_capacity` globs; channels' in-memory layer forgets to.
        if isinstance(self.channel_capacity, dict):
            self.channel_capacity = self.compile_capacities(self.channel_capacity)
        self._clock = clock
        self._next_clean = 0.0
        self.full_scans = 0

    def _clean_expired(self) -> None:
        now = self._clock()
        if now < self._next_clean:
            return
        self._next_clean = now + CLEAN_INTERVAL
        self.full_scans += 1
        super()._clean_expired()

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        self._clean_expired()
        queue = self.channels.get(channel)
        if queue is None:  # the parent builds a new Queue on every call, used or not
            queue = self.channels.setdefault(
                channel, asyncio.Queue(maxsize=self.get_capacity(channel))
            )
        try:
            _, message = await queue.get()
        finally:
            if queue.empty():
                self.channels.pop(channel, None)
        return message


class RedisChannelLayer(ChannelsRedisChannelLayer):
    retry_initial = 0.5
    retry_max = 5.0

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        await self._once_more(super().send, channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self._once_more(super().group_send, group, message)

    async def _once_more(self, operation: Callable[..., Any], *args: Any) -> None:
        try:
            await operation(*args)
        except RedisConnectionError as exc:  # not a timeout: the first may have been delivered
            log.info("channel layer: %s; trying once more on a fresh connection", exc)
            await operation(*args)

    async def receive(self, channel: str) -> dict[str, Any]:
        delay = self.retry_initial
        while True:
            try:
                return await super().receive(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("channel layer unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
