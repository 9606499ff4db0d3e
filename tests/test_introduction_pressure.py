"""A worker many others ask to connect to and never use (issue 19, item 3): its answers cost its
own rate limit nothing, their unused introductions end within seconds and take none of its
peer slots, so it stays connected and reachable, and can still reach others itself.

In process through the consumer first; then end to end, on a real daphne, with twenty raw
WebSocket clients that ask for introductions and never use them, a real agent as the target and
another as the legitimate peer.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable

import pytest
import websockets
from channels.db import database_sync_to_async

from registry.models import PeerConnection
from registry.ops import metrics
from registry.ops.checks import check_rendezvous_settings
from tests.support.processes import ServerProcess, wait_until
from tests.test_peering import accept, ask, connect_request, connected, introduce
from tests.test_relay import frame, offer
from worker_agent import PeerPath, WorkerAgent

UNUSED = "UNUSED"


def unused_counted() -> float:
    labels = {"instance_name": metrics._instance()}
    return metrics.REGISTRY.get_sample_value("rendezvous_unused_introductions_total", labels) or 0


# ---- through the consumer ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_answers_to_requests_cost_the_answerer_nothing_of_its_rate_limit(settings) -> None:
    """Issue 19: twenty requesters, each within its own limit, made the target's answers exceed
    the target's: it was closed with 4029. An answer to no request it holds is charged."""
    settings.RENDEZVOUS = {
        **settings.RENDEZVOUS,
        "RATE_LIMIT": 0.5,
        "RATE_BURST": 3,
        "RATE_LIMIT_CLOSE_AFTER": 5,
    }
    target = await connected("target", 1)
    requesters = [await connected(f"r{n}", 10 + n) for n in range(4)]
    for n, requester in enumerate(requesters):
        for m in range(3):  # three requests each: the requesters' own rates allow it
            pending = await ask(requester, connect_request("target", request_id=f"q{n}-{m}"))
            assert pending["type"] == "connect_pending"
            asked = await target.receive_json_from(timeout=3)
            answer = accept(asked["introduction_id"]) if m else {
                "type": "introduction_reject", "introduction_id": asked["introduction_id"],
            }  # fmt: skip
            replied = await ask(target, answer)
            assert replied["type"] in ("introduction", "introduction_rejected"), replied
            told = await requester.receive_json_from(timeout=3)
            assert told["type"] in ("introduction", "connect_failed"), told
    # Twelve answers; the target's own burst of three is still whole.
    for _ in range(3):
        assert (await ask(target, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    stray = await ask(target, accept("0" * 32))  # answers nothing: charged, and over the limit
    assert (stray["type"], stray["code"]) == ("error", "RATE_LIMITED")
    for comm in (target, *requesters):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_introduction_neither_side_uses_ends_for_both(settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "UNUSED_INTRODUCTION_TIMEOUT": 0.3}
    before = unused_counted()
    a, b = await connected("a", 1), await connected("b", 2)
    started = time.monotonic()
    for_a, _ = await introduce(a, b)
    introduction_id = for_a["introduction_id"]
    told = [await comm.receive_json_from(timeout=3) for comm in (a, b)]
    assert 0.3 <= time.monotonic() - started < 2.0
    assert [(m["type"], m["introduction_id"], m["code"]) for m in told] == [
        ("peer_closed", introduction_id, UNUSED)
    ] * 2
    assert told[0]["reason"] == "neither worker used the introduction within 0.3s"
    assert unused_counted() == before + 1
    await a.send_to(bytes_data=frame(introduction_id, b"too late"))
    assert (await a.receive_json_from(timeout=3))["code"] == "RELAY_NOT_INTRODUCED"
    for comm in (a, b):
        await comm.disconnect()
    record = await database_sync_to_async(PeerConnection.objects.get)(id=introduction_id)
    assert record.closed_at is not None and "neither worker used" in record.close_reason


USES = {
    "the initiator's path report": lambda a, b, i: (a, {"type": "path_report",
                                                          "introduction_id": i, "kind": "relay"}),
    "the responder's ICE candidates": lambda a, b, i: (b, offer(i)),
    "the initiator's relay frame": lambda a, b, i: (a, frame(i, b"hello")),
    "the responder's relay frame": lambda a, b, i: (b, frame(i, b"hello")),
}  # fmt: skip


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
async def test_an_introduction_either_side_uses_is_not_ended(settings, use) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "UNUSED_INTRODUCTION_TIMEOUT": 0.3}
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    sender, message = use(a, b, for_a["introduction_id"])
    if isinstance(message, bytes):
        await sender.send_to(bytes_data=message)
    else:
        await sender.send_to(text_data=json.dumps(message))
    # Past the timeout: whatever the use caused (a path_report_recorded, the frame at the peer)
    # and nothing else; no peer_closed.
    await asyncio.sleep(0.6)
    for comm in (a, b):
        while not await comm.receive_nothing(timeout=0.1):
            output = await comm.receive_output()
            assert "peer_closed" not in output.get("text", ""), output
    await a.send_to(bytes_data=frame(for_a["introduction_id"], b"still linked"))
    assert await b.receive_from(timeout=3) == frame(for_a["introduction_id"], b"still linked")
    for comm in (a, b):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_unused_requests_of_others_take_none_of_the_targets_slots(settings) -> None:
    """Issue 19: unfinished introductions filled the target's 64 links; its peers' connects
    then failed with TOO_MANY_PEERS. They count against their requesters until used."""
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "RELAY_MAX_PEERS": 2}
    target, friend = await connected("target", 1), await connected("friend", 2)
    squatters = [await connected(f"s{n}", 10 + n) for n in range(4)]
    for squatter in squatters:
        await introduce(squatter, target, peer_id="target")
    for_friend, _ = await introduce(friend, target, peer_id="target")  # the fifth: accepted
    assert for_friend["type"] == "introduction"
    for_target, _ = await introduce(target, friend, peer_id="friend")  # and its own
    assert for_target["type"] == "introduction"
    await introduce(squatters[0], friend, peer_id="friend")  # the squatter's second: its limit
    again = await ask(squatters[0], connect_request("s1", request_id="third"))
    assert (again["type"], again["code"]) == ("connect_failed", "TOO_MANY_PEERS")
    for comm in (target, friend, *squatters):
        await comm.disconnect()


@pytest.mark.parametrize(
    ("timeout", "problems"),
    [(10.0, []), (3600.0, []), (5.0, ["E009"]), (0.0, ["E009"]), (float("nan"), ["E009"])],
)
def test_unused_introductions_are_given_long_enough_to_be_used(settings, timeout, problems) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "UNUSED_INTRODUCTION_TIMEOUT": timeout}
    found = [p.id for p in check_rendezvous_settings() if p.id == "rendezvous.E009"]
    assert found == [f"rendezvous.{p}" for p in problems]


# ---- end to end ----------------------------------------------------------------------------------

ATTACKERS = 20


async def squat(url: str, worker_id: str, stop: threading.Event, counts: dict) -> None:
    """A client that asks the target for an introduction a little less than once a second and
    never uses one; it counts what it is told."""
    async with websockets.connect(f"{url}/ws/register/{worker_id}") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        n = 0
        next_request = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_request:
                request = connect_request("target", request_id=f"{worker_id}-{n}")
                await ws.send(json.dumps(request))
                n += 1
                next_request += 1.1
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
            except TimeoutError:
                continue
            key = (message["type"], message.get("code"))
            counts[key] = counts.get(key, 0) + 1


def attack(url: str, stop: threading.Event, counts: dict) -> threading.Thread:
    async def run() -> None:
        await asyncio.gather(*(squat(url, f"squat-{n}", stop, counts) for n in range(ATTACKERS)))

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_target_under_unused_requests_stays_connected_and_reachable(
    server_factory: Callable[..., ServerProcess], agents: Callable[..., WorkerAgent]
) -> None:
    """Issue 19's victim, end to end: twenty clients ask it for introductions (each under its
    own limit) and never use them. Before: the target was closed with 4029 twice in 25 s and a
    legitimate peer's connects failed 10 of 19 times. Now none is closed, every connect of the
    peer and of the target itself succeeds, and the unused introductions end as UNUSED."""
    server = server_factory(
        env={"RENDEZVOUS_RELAY_MAX_PEERS": "8", "RENDEZVOUS_UNUSED_INTRODUCTION_TIMEOUT": "6"}
    ).start()
    accepted: queue.Queue[PeerPath] = queue.Queue()

    def answer(agent: WorkerAgent, path: PeerPath) -> None:
        if path.peer_id in ("target", "friend"):  # the attackers' paths are left to end
            accepted.put(path)

    target = agents(server.url, "target", peer_udp=False, on_peer_path=answer)
    friend = agents(server.url, "friend", peer_udp=False, on_peer_path=answer)
    target.start()
    friend.start()
    assert target.wait_registered(10) and friend.wait_registered(10)
    stop, counts = threading.Event(), {}
    attacker = attack(server.ws_url, stop, counts)
    try:
        wait_until(
            lambda: (
                sum(n for (kind, _), n in counts.items() if kind.startswith("connect_"))
                >= 2 * ATTACKERS
            ),
            timeout=30,
            what="two answered requests per attacker",
        )
        failures = []
        for n in range(12):
            try:
                connector = friend if n % 3 else target
                with connector.connect_path("target" if n % 3 else "friend", timeout=5) as path:
                    other = accepted.get(timeout=5)
                    path.send(b"ping %d" % n)
                    assert other.recv(timeout=5) == b"ping %d" % n
                    other.close()
            except Exception as exc:  # counted: the assertion below names them all
                failures.append(f"{n}: {exc!r}")
            time.sleep(1.05)  # the requester's own rate: one connect request a second
    finally:
        stop.set()
        attacker.join(10)
    assert failures == []
    assert target.status()["connects"] == 1 and target.status()["last_close_code"] is None
    assert counts.get(("introduction", None), 0) >= 5 * ATTACKERS
    assert counts.get(("peer_closed", UNUSED), 0) >= 2 * ATTACKERS
    assert ("closing", 4029) not in counts
    assert "closed for flooding" not in server.log_tail(5000)
