"""The Redis channel layer as the settings build it, against a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.exceptions import ChannelFull

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


async def test_a_message_crosses_redis_once_each_way_in_order(redis: RedisServer) -> None:
    """A send is one script and a receive one blocking pop: no backup copy of each message is
    written to Redis and read back (channels-redis's `$inflight` queue), and none is left."""
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="once")
    client = layer.connection(0)
    await client.config_resetstat()
    for n in range(20):
        await layer.send("rendezvous.instance.once", {"type": "worker.relay", "n": n})
    received = [await layer.receive("rendezvous.instance.once") for _ in range(20)]
    await asyncio.sleep(0.1)  # channels-redis's backup cleaner, had it run
    assert [message["n"] for message in received] == list(range(20))
    stats = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    assert calls.get("eval", 0) + calls.get("evalsha", 0) == 20  # one round trip per send
    assert calls["bzpopmin"] == 20 and "zpopmin" not in calls  # one per receive, no backup
    assert await client.keys("once*$inflight") == []


async def test_a_full_channel_refuses_the_message_past_its_capacity(redis: RedisServer) -> None:
    layer = RedisChannelLayer(hosts=redis_hosts(redis.url), prefix="full", capacity=3)
    for n in range(3):
        await layer.send("rendezvous.instance.full", {"type": "x", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send("rendezvous.instance.full", {"type": "x", "n": 3})
    assert (await layer.receive("rendezvous.instance.full"))["n"] == 0
    await layer.send("rendezvous.instance.full", {"type": "x", "n": 4})  # room again
