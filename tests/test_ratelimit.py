"""The rate limits on a clock the test moves: what a sender just over a limit is told (once per
streak, however its drops and admitted messages alternate), and when its connection closes."""

from __future__ import annotations

import asyncio

import pytest

from registry.core import protocol
from registry.core.ratelimit import Flood, MessageRate, Streak
from registry.peering.links import PeerLink, PeerLinks
from registry.peering.relay import REFUSAL_QUIET, RelayPort

pytestmark = pytest.mark.standalone


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_streak_is_refusals_less_than_its_quiet_time_apart() -> None:
    clock = Clock()
    streak = Streak(quiet=10.0, clock=clock)
    firsts = []
    for step in (0, 3, 9, 9, 11, 25):  # seconds since the previous refusal
        clock.now += step
        firsts.append(streak.refused())
    assert firsts == [True, False, False, False, True, True]
    assert streak.count == 1


def test_a_sender_just_over_the_message_rate_is_told_once_per_streak() -> None:
    """Issue 19: every drop that followed an admitted message began a new streak, so a sender at
    11 messages a second against 10 got an error (and a log line) for every drop."""
    clock = Clock()
    rate = MessageRate(rate=10.0, burst=10, close_after=10_000, memory=10.0, clock=clock)
    outcomes = []
    for _ in range(11 * 30):  # 30 s at 11 a second
        clock.now += 1 / 11
        outcomes.append(rate.admit())
    dropped = [o for o in outcomes if o is not None]
    assert 15 <= len(dropped) <= 25  # 330 sent, 10 + 300 allowed
    assert dropped.count(Flood.WARN) == 1
    assert rate.dropped == len(dropped)


def test_a_streak_long_enough_closes_the_connection_and_a_quiet_spell_forgives() -> None:
    clock = Clock()
    rate = MessageRate(rate=1.0, burst=1, close_after=5, memory=10.0, clock=clock)
    assert rate.admit() is None
    assert [rate.admit() for _ in range(4)] == [Flood.WARN, Flood.DROP, Flood.DROP, Flood.DROP]
    clock.now += 10.5  # a quiet spell: the next streak starts from nothing
    assert rate.admit() is None
    assert [rate.admit() for _ in range(5)] == [Flood.WARN, *[Flood.DROP] * 3, Flood.CLOSE]


def relay_frame(introduction_id: str, size: int) -> bytes:
    return b"\x01" + bytes.fromhex(introduction_id) + size.to_bytes(2, "big") + b"x" * size


def test_a_relay_sender_just_over_its_budget_is_told_once_per_streak() -> None:
    """Issue 19: a relayed frame between two refused ones ended the streak, so a flood just over
    the budget got an error frame and a log line for every other frame (350 lines a second)."""
    clock = Clock()
    links = PeerLinks(4)
    introduction_id = "ab" * 16
    links.add(PeerLink(introduction_id, "b", "channel", 2, initiator=True))
    forwarded = []

    async def forward(link: PeerLink, frame: bytes) -> bool:
        forwarded.append(frame)
        return True

    port = RelayPort(
        links=links,
        forward=forward,
        bytes_per_second=1e9,
        frames_per_second=10.0,
        clock=clock,
    )

    async def run() -> list[protocol.RelayError | None]:
        told = []
        for _ in range(11 * 30):  # 30 s at 11 frames a second against 10
            clock.now += 1 / 11
            told.append(await port.from_worker(relay_frame(introduction_id, 10)))
        return told

    told = asyncio.run(run())
    errors = [e for e in told if e is not None]
    assert [e.code for e in errors] == [protocol.ErrorCode.RELAY_RATE_LIMITED]
    assert 15 <= len(told) - len(forwarded) <= 25
    clock.now += REFUSAL_QUIET + 1  # quiet, then over the budget again: a new streak
    again = asyncio.run(run())
    assert [e.code for e in again if e is not None] == [protocol.ErrorCode.RELAY_RATE_LIMITED]
