"""The service relay and ICE signalling through the consumer (in process, two or three
communicators on one in-memory layer): what is relayed between introduced workers, and what
is refused, with which code, changing nothing for anyone else. Real agents over real daphne:
tests/test_paths_e2e.py."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from twisted.internet import abstract

from registry.models import Worker
from registry.ops import metrics
from registry.peering.relay import SEND_BUFFER_BYTES, RelayOutbox, SendWindow
from registry.presence.runtime import get_runtime
from tests.test_peering import ask, connected, introduce

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

CANDIDATE = "6815297761 1 udp 2130706431 192.0.2.2 37929 typ host"
SRFLX = (
    "candidate:842163049 1 UDP 1677729535 198.51.100.7 40312 typ srflx raddr 10.0.1.2 rport 5000 "
    "generation 0"
)


def frame(introduction_id: str, *datagrams: bytes) -> bytes:
    body = b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)
    return b"\x01" + bytes.fromhex(introduction_id) + body


def relay_counter(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        name, {"instance_name": metrics._instance(), **labels}
    )
    return value or 0.0


async def pair() -> tuple[WebsocketCommunicator, WebsocketCommunicator, str]:
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    return a, b, for_a["introduction_id"]


async def test_relay_frames_reach_the_introduced_peer_unchanged_both_ways() -> None:
    a, b, introduction_id = await pair()
    before = relay_counter("rendezvous_relay_bytes_total")
    datagrams = (b"first", b"", b"x" * 1200)
    await a.send_to(bytes_data=frame(introduction_id, *datagrams))
    assert await b.receive_from(timeout=3) == frame(introduction_id, *datagrams)
    await b.send_to(bytes_data=frame(introduction_id, b"back"))
    assert await a.receive_from(timeout=3) == frame(introduction_id, b"back")
    relayed = len(frame(introduction_id, *datagrams)) + len(frame(introduction_id, b"back"))
    assert relay_counter("rendezvous_relay_bytes_total") == before + relayed
    await a.disconnect()
    await b.disconnect()


async def test_a_worker_not_part_of_an_introduction_cannot_use_its_relay() -> None:
    a, b, introduction_id = await pair()
    c = await connected("c", 3)
    before = relay_counter("rendezvous_relay_dropped_total", reason="not_introduced")
    await c.send_to(bytes_data=frame(introduction_id, b"injected"))
    error = await c.receive_json_from(timeout=3)
    assert error == {
        "type": "error",
        "code": "RELAY_NOT_INTRODUCED",
        "message": "no introduction under that id on this connection (closed, or never made)",
        "introduction_id": introduction_id,
    }
    assert await a.receive_nothing(timeout=0.2) and await b.receive_nothing(timeout=0.2)
    assert relay_counter("rendezvous_relay_dropped_total", reason="not_introduced") == before + 1
    await a.send_to(bytes_data=frame(introduction_id, b"still fine"))  # the pair is untouched
    assert await b.receive_from(timeout=3) == frame(introduction_id, b"still fine")
    for comm in (a, b, c):
        await comm.disconnect()


async def test_with_the_relay_off_introductions_say_so_and_relay_frames_are_refused(
    settings,
) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "RELAY": False}
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, for_b = await introduce(a, b)
    assert for_a["relay"] is False and for_b["relay"] is False
    introduction_id = for_a["introduction_id"]
    before = relay_counter("rendezvous_relay_dropped_total", reason="relay_off")
    await a.send_to(bytes_data=frame(introduction_id, b"through the service?"))
    assert await a.receive_json_from(timeout=3) == {
        "type": "error",
        "code": "RELAY_OFF",
        "message": "this service does not relay (RENDEZVOUS_RELAY is off): use the UDP path",
        "introduction_id": introduction_id,
    }
    assert await b.receive_nothing(timeout=0.2)
    assert relay_counter("rendezvous_relay_dropped_total", reason="relay_off") == before + 1
    # Signalling still flows: ICE candidates reach the peer.
    await a.send_json_to(
        {"type": "ice_candidates", "introduction_id": introduction_id, "attempt": 0,
         "policy": "all", "ufrag": "abcd", "pwd": "p" * 22, "candidates": [CANDIDATE],
         "done": True}
    )  # fmt: skip
    assert (await b.receive_json_from(timeout=3))["type"] == "ice_candidates"
    for comm in (a, b):
        await comm.disconnect()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x02" + b"\x00" * 16 + b"\x00\x00", "RELAY_MALFORMED"),  # unknown kind
        (b"\x01" + b"\x00" * 10, "RELAY_MALFORMED"),  # header cut short
        (b"\x01" + b"\x00" * 16, "RELAY_MALFORMED"),  # no datagram
        (b"\x01" + b"\x00" * 16 + b"\x00\x09abc", "RELAY_MALFORMED"),  # length overruns
        (b"\x01" + b"\x00" * 16 + b"\x00", "RELAY_MALFORMED"),  # half a length
        (b"\x01" + b"\x00" * 16 + b"\xff\xff" + b"x" * 65535, "RELAY_FRAME_TOO_LARGE"),
    ],
    ids=["kind", "short", "empty", "overrun", "half length", "too large"],
)
async def test_malformed_relay_frames_get_a_coded_error_and_nothing_is_forwarded(
    data: bytes, code: str
) -> None:
    a, b, _ = await pair()
    await a.send_to(bytes_data=data)
    error = await a.receive_json_from(timeout=3)
    assert (error["type"], error["code"]) == ("error", code)
    assert await b.receive_nothing(timeout=0.2)
    assert (await ask(a, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await a.disconnect()
    await b.disconnect()


async def test_a_relay_flood_is_dropped_past_the_budget_with_one_error_per_streak(
    settings,
) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "RELAY_FRAMES_PER_SECOND": 5.0}
    a, b, introduction_id = await pair()
    for n in range(20):
        await a.send_to(bytes_data=frame(introduction_id, str(n).encode()))
    received = []
    while not await b.receive_nothing(timeout=0.2):
        received.append(await b.receive_from())
    assert received == [frame(introduction_id, str(n).encode()) for n in range(5)]  # the burst
    errors = []
    while not await a.receive_nothing(timeout=0.2):
        errors.append(json.loads(await a.receive_from()))
    assert [e["code"] for e in errors] == ["RELAY_RATE_LIMITED"]  # one, not fifteen
    assert (await ask(a, {"type": "heartbeat"}))["type"] == "heartbeat_ack"  # the socket stays
    await a.disconnect()
    await b.disconnect()


async def test_the_byte_budget_drops_frames_beyond_it(settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "RELAY_BYTES_PER_SECOND": 1000.0}
    a, b, introduction_id = await pair()
    big = frame(introduction_id, b"x" * 60_000)  # the burst is one full frame at least
    await a.send_to(bytes_data=big)
    assert await b.receive_from(timeout=3) == big
    await a.send_to(bytes_data=big)
    assert (await a.receive_json_from(timeout=3))["code"] == "RELAY_RATE_LIMITED"
    assert await b.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


async def test_after_a_close_the_pairs_relay_is_gone() -> None:
    a, b, introduction_id = await pair()
    await ask(a, {"type": "peer_close", "introduction_id": introduction_id, "reason": "done"})
    assert (await b.receive_json_from(timeout=3))["type"] == "peer_closed"
    for sender in (a, b):
        await sender.send_to(bytes_data=frame(introduction_id, b"late"))
        assert (await sender.receive_json_from(timeout=3))["code"] == "RELAY_NOT_INTRODUCED"
    await a.disconnect()
    await b.disconnect()


async def test_ice_candidates_reach_the_peer_in_canonical_form_and_nothing_is_answered() -> None:
    a, b, introduction_id = await pair()
    offer = {
        "type": "ice_candidates",
        "introduction_id": introduction_id,
        "attempt": 0,
        "policy": "all",
        "ufrag": "Ab+/",
        "pwd": "p" * 22,
        "candidates": [CANDIDATE, SRFLX, CANDIDATE],
        "done": True,
    }
    await a.send_to(text_data=json.dumps(offer))
    assert await b.receive_json_from(timeout=3) == {
        **offer,
        "candidates": [
            CANDIDATE,
            "842163049 1 udp 1677729535 198.51.100.7 40312 typ srflx raddr 10.0.1.2 rport 5000",
        ],
    }
    assert await a.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


def offer(introduction_id: str, **changes: object) -> dict:
    return {
        "type": "ice_candidates",
        "introduction_id": introduction_id,
        "attempt": 0,
        "policy": "all",
        "ufrag": "abcd",
        "pwd": "p" * 22,
        "candidates": [CANDIDATE],
        "done": True,
        **changes,
    }


BAD_CANDIDATES = {
    "not a candidate": {"candidates": ["hello"]},
    "tcp": {"candidates": [CANDIDATE.replace("udp", "tcp")]},
    "name, not address": {"candidates": [CANDIDATE.replace("192.0.2.2", "evil.local")]},
    "port out of range": {"candidates": [CANDIDATE.replace("37929", "70000")]},
    "unknown type": {"candidates": [CANDIDATE.replace("host", "magic")]},
    "oversized candidate": {"candidates": [CANDIDATE + " x" * 200]},
    "too many": {"candidates": [CANDIDATE] * 17},
    "not a list": {"candidates": CANDIDATE},
    "short ufrag": {"ufrag": "ab"},
    "short pwd": {"pwd": "short"},
    "bad policy": {"policy": "direct-please"},
    "bad attempt": {"attempt": -1},
    "done not bool": {"done": "yes"},
}


@pytest.mark.parametrize("changes", BAD_CANDIDATES.values(), ids=BAD_CANDIDATES.keys())
async def test_malformed_candidates_get_an_error_and_nothing_reaches_the_peer(changes) -> None:
    a, b, introduction_id = await pair()
    reply = await ask(a, offer(introduction_id, **changes))
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    assert await b.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


async def test_candidates_for_an_introduction_not_made_are_refused() -> None:
    a, b, introduction_id = await pair()
    c = await connected("c", 3)
    reply = await ask(c, offer(introduction_id))
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    assert "no introduction under that id" in reply["message"]
    assert await a.receive_nothing(timeout=0.2) and await b.receive_nothing(timeout=0.2)
    for comm in (a, b, c):
        await comm.disconnect()


# ---- frames for another instance: the outbox ---------------------------------------------------


class SlowLayer:
    """Stands in for the channel layer's send: each batch waits until the test releases it."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[tuple[str, int, list[bytes]]] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def send(self, channel: str, connection_id: int, frames: list[bytes]) -> None:
        self.batches.append((channel, connection_id, list(frames)))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the channel layer is away")


def spawner() -> tuple[Callable[..., None], set[asyncio.Task[None]]]:
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Any, *, what: str) -> None:
        tasks.add(asyncio.get_running_loop().create_task(coroutine))

    return spawn, tasks


async def test_frames_for_another_instance_cross_in_batches_while_one_is_under_way() -> None:
    layer = SlowLayer()
    spawn, tasks = spawner()
    outbox = RelayOutbox(layer.send, spawn)
    await outbox.put("instance-b", 7, b"first")
    await asyncio.sleep(0)
    for n in range(5):  # these arrive while "first" is crossing: they wait, and go together
        await outbox.put("instance-b", 7, b"next%d" % n)
    await outbox.put("instance-b", 8, b"another consumer")
    layer.release.set()
    await asyncio.gather(*tasks)
    assert layer.batches == [
        ("instance-b", 7, [b"first"]),
        ("instance-b", 8, [b"another consumer"]),
        ("instance-b", 7, [b"next0", b"next1", b"next2", b"next3", b"next4"]),
    ]
    assert len(outbox) == 0  # nothing kept once drained


async def test_a_full_outbox_holds_the_sender_back_instead_of_growing() -> None:
    layer = SlowLayer()
    spawn, tasks = spawner()
    outbox = RelayOutbox(layer.send, spawn, max_bytes=100, batch_bytes=60)
    await outbox.put("instance-b", 7, b"a" * 60)
    await outbox.put("instance-b", 7, b"b" * 40)
    blocked = asyncio.get_running_loop().create_task(outbox.put("instance-b", 7, b"c" * 10))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # 100 bytes queued: the sender waits
    layer.release.set()
    await asyncio.wait_for(blocked, 2)
    await asyncio.gather(*tasks)
    assert [frames for _, _, frames in layer.batches] == [[b"a" * 60], [b"b" * 40], [b"c" * 10]]


async def test_a_batch_the_layer_cannot_take_is_dropped_and_counted() -> None:
    layer = SlowLayer(fail=True)
    layer.release.set()
    spawn, tasks = spawner()
    outbox = RelayOutbox(layer.send, spawn)
    before = relay_counter("rendezvous_relay_dropped_total", reason="peer_gone")
    await outbox.put("instance-b", 7, b"lost")
    await asyncio.gather(*tasks)
    assert relay_counter("rendezvous_relay_dropped_total", reason="peer_gone") == before + 1
    await outbox.put("instance-b", 7, b"the next one is tried")
    await asyncio.gather(*tasks)
    assert len(layer.batches) == 2


async def test_the_receiving_side_drops_frames_for_a_link_it_does_not_hold() -> None:
    """The sender's side checks its own link; the receiver's checks again, so that a link ended
    on one side only (a rule change one instance applied, a close not yet heard) carries
    nothing more to that worker."""
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    runtime = get_runtime()
    connection_id = await database_sync_to_async(
        lambda: Worker.objects.get(id="a").current_connection_id
    )()
    before = relay_counter("rendezvous_relay_dropped_total", reason="not_introduced")
    held = frame(for_a["introduction_id"], b"for a")
    assert await runtime.relay_to(runtime.channel_name, connection_id, held)
    assert await a.receive_from(timeout=3) == held
    foreign = frame("ab" * 16, b"not a's")
    assert await runtime.relay_to(runtime.channel_name, connection_id, foreign)
    assert await a.receive_nothing(timeout=0.2)
    after = relay_counter("rendezvous_relay_dropped_total", reason="not_introduced")
    assert after == before + 1
    await a.disconnect()
    await b.disconnect()


async def test_the_send_window_holds_a_mib_unsent_and_leaves_the_read_size_alone() -> None:
    """Raising Twisted's `bufferSize` to hold 1 MiB unsent also made it read 1 MiB from the socket
    at a time: a pair relaying both ways had its frames parsed in bursts while every other
    connection waited (issue 19, item 7; bench/relay_fairness.py)."""

    class Protocol:
        transport = abstract.FileDescriptor()

    transport = Protocol.transport
    window = SendWindow.attach(functools.partial(lambda protocol, message: None, Protocol()))
    assert window is not None and transport.producer is window
    assert transport.bufferSize == 64 * 1024  # Twisted's read size, as it was
    transport.dataBuffer = b"x" * (SEND_BUFFER_BYTES - 10)
    assert not transport._isSendBufferFull()
    transport._tempDataLen = 20
    assert transport._isSendBufferFull()
