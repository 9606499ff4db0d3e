"""The default in-memory layer: the expiry scan no longer runs once per message."""

from __future__ import annotations

import asyncio

import pytest

from registry.ops.layers import CLEAN_INTERVAL, InMemoryChannelLayer

pytestmark = [pytest.mark.standalone, pytest.mark.asyncio]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_thousand_receives_within_the_interval_cost_one_scan() -> None:
    clock = Clock()
    layer = InMemoryChannelLayer(clock=clock, capacity=10)
    channels = [await layer.new_channel() for _ in range(1000)]
    for channel in channels:
        await layer.send(channel, {"type": "x"})
    for channel in channels:
        assert await layer.receive(channel) == {"type": "x"}
    assert layer.full_scans == 1
    clock.now += CLEAN_INTERVAL
    await layer.send(channels[0], {"type": "y"})
    await layer.receive(channels[0])
    assert layer.full_scans == 2


async def test_messages_still_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    layer = InMemoryChannelLayer(clock=clock, expiry=60)
    stale, fresh = await layer.new_channel(), await layer.new_channel()
    monkeypatch.setattr("channels.layers.time.time", lambda: 0.0)
    await layer.send(stale, {"type": "old"})
    monkeypatch.setattr("channels.layers.time.time", lambda: 100.0)
    await layer.send(fresh, {"type": "new"})
    clock.now += CLEAN_INTERVAL
    assert await layer.receive(fresh) == {"type": "new"}
    assert stale not in layer.channels
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(stale), 0.05)


async def test_full_channels_still_refuse_messages() -> None:
    from channels.exceptions import ChannelFull

    layer = InMemoryChannelLayer(capacity=1)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "a"})
    with pytest.raises(ChannelFull):
        await layer.send(channel, {"type": "b"})


async def test_channel_capacity_globs_apply_to_the_in_memory_layer() -> None:
    layer = InMemoryChannelLayer(capacity=2, channel_capacity={"rendezvous.instance.*": 5})
    assert layer.get_capacity("rendezvous.instance.abc") == 5
    assert layer.get_capacity("specific.x!y") == 2
