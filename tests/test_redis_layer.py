"""The Redis channel layer as the settings build it, against a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.ops.layers import RedisChannelLayer
from rendezvous_project.settings import redis_hosts
from tests.support.backing import RedisServer, require_or_skip

pytestmark = [pytest.mark.standalone, pytest.mark.asyncio]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    require_or_skip(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def test_an_idle_receive_waits_quietly_past_the_blocking_pop_timeout(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: redis-py's default socket timeout cut channels-redis's 5 s BZPOPMIN short.
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="idle")
    with caplog.at_level(logging.WARNING, logger="registry.layers"), pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive("rendezvous.instance.idle"), 7)
    assert not caplog.records


async def test_a_message_sent_after_a_long_wait_arrives(redis: RedisServer) -> None:
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="late")
    receiving = asyncio.ensure_future(layer.receive("rendezvous.instance.late"))
    await asyncio.sleep(6)
    await layer.send("rendezvous.instance.late", {"type": "worker.disconnect", "connection_id": 1})
    assert await asyncio.wait_for(receiving, 5) == {"type": "worker.disconnect", "connection_id": 1}


async def test_a_redis_restart_is_waited_out(redis: RedisServer) -> None:
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="restart")
    receiving = asyncio.ensure_future(layer.receive("rendezvous.instance.r"))
    await asyncio.sleep(0.5)
    redis.stop()
    await asyncio.sleep(1.5)
    assert not receiving.done()  # retrying, not crashed
    redis.start()
    await asyncio.sleep(1)
    await layer.send("rendezvous.instance.r", {"type": "worker.disconnect", "connection_id": 2})
    assert (await asyncio.wait_for(receiving, 10))["connection_id"] == 2


async def test_sends_after_a_redis_restart_land_on_the_first_call(redis: RedisServer) -> None:
    # Regression: idle pooled connections are dead after a restart; the first send (a
    # supersede, a peer event) failed on one and was lost until housekeeping redid it.
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="stale")
    await asyncio.gather(
        *(layer.send(f"rendezvous.instance.s{n}", {"type": "x", "n": n}) for n in range(4)),
        layer.group_add("rendezvous.peers", "rendezvous.instance.s0"),
    )
    redis.stop()
    redis.start()
    await layer.send("rendezvous.instance.t", {"type": "worker.superseded", "connection_id": 3})
    await layer.group_send("rendezvous.peers", {"type": "peers.events", "events": []})
    received = await asyncio.wait_for(layer.receive("rendezvous.instance.t"), 5)
    assert received["connection_id"] == 3


async def test_a_burst_of_sends_is_not_refused_for_want_of_connections(redis: RedisServer) -> None:
    # Regression: redis-py 8 caps a pool at 100 connections and fails the 101st command at once;
    # 1,000 workers subscribing after a restart made subscribe_peers fail with "Too many
    # connections".
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="burst")
    await asyncio.gather(
        *(layer.send(f"rendezvous.instance.b{n}", {"type": "x"}) for n in range(300)),
        *(layer.group_add(f"group{n}", f"rendezvous.instance.b{n}") for n in range(300)),
    )
    assert (await asyncio.wait_for(layer.receive("rendezvous.instance.b7"), 5))["type"] == "x"
