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

It also moves each message through Redis once, in one round trip each way. channels-redis sends
with four commands (drop expired messages, count against the capacity, add, set the expiry) and
receives with four (restore a backup queue, pop, copy the message into the backup queue, pop it
from there once handled): eight round trips, and the message's bytes crossing the socket four
times, for every command and every batch of relay frames between instances. Here a send is one
script doing the same four steps, and a receive is the blocking pop alone: a message popped by a
receive that is then cancelled is lost, as one sent while Redis is away already is (see above).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.exceptions import ChannelFull
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


# channels-redis's four send commands as one script: KEYS[1] the channel's sorted set; ARGV the
# expiry cut-off, the capacity, the score (the time), the message, the key's time to live.
_SEND = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisChannelLayer(ChannelsRedisChannelLayer):
    retry_initial = 0.5
    retry_max = 5.0

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if "!" in channel:  # a process-local channel: channels-redis's own way
            await self._once_more(super().send, channel, message)
        else:
            await self._once_more(self._send_once, channel, message)

    async def _send_once(self, channel: str, message: dict[str, Any]) -> None:
        """channels-redis's send (same checks, same keys) in one round trip."""
        assert isinstance(message, dict) and "__asgi_channel__" not in message
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        connection = self.connection(next(self._send_index_generator))
        now = time.time()
        added = await connection.eval(
            _SEND,
            1,
            self.prefix + channel,
            int(now) - int(self.expiry),
            self.get_capacity(channel),
            repr(now),
            self.serialize(message),
            int(self.expiry),
        )
        if not added:
            raise ChannelFull()

    async def _brpop_with_clean(self, index: int, channel: str, timeout: float) -> Any:
        """The blocking pop, without channels-redis's backup queue (module docstring)."""
        result = await self.connection(index).bzpopmin(channel, timeout=timeout)
        return None if result is None else result[1]

    async def _clean_receive_backup(self, index: int, channel: str) -> None:
        """Nothing was backed up (`_brpop_with_clean`)."""

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
