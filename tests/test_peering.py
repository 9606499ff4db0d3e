"""Peer discovery and introductions through the consumer: NAT reports, the peer list, join and
leave events, and the introduction handshake between two workers (in process; the real NAT
test is tests/test_punch_e2e.py)."""

from __future__ import annotations

import json
import time

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from registry import protocol
from registry.models import Worker
from registry.routing import websocket_urlpatterns

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

application = URLRouter(websocket_urlpatterns)
CONE = "endpoint-independent"
SYMMETRIC = "endpoint-dependent"


async def connected(worker_id: str, port: int = 40000) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, f"/ws/register/{worker_id}")
    comm.scope["client"] = ("203.0.113.5", port)
    assert (await comm.connect())[0]
    assert (await comm.receive_json_from())["type"] == "welcome"
    return comm


async def ask(comm: WebsocketCommunicator, message: dict) -> dict:
    await comm.send_to(text_data=json.dumps(message))
    return await comm.receive_json_from(timeout=3)


async def report_nat(comm: WebsocketCommunicator, mapping: str, port: int) -> None:
    reply = await ask(
        comm,
        {
            "type": "nat_report",
            "mapping": mapping,
            "udp_endpoint": {"ip": "198.51.100.1", "port": port},
        },
    )
    assert reply == {"type": "nat_report_recorded", "mapping": mapping}


def endpoints(port: int) -> list[dict]:
    return [{"ip": "198.51.100.1", "port": port}, {"ip": "10.0.0.2", "port": port}]


def connect_request(peer_id: str, *, request_id: str = "r", mapping: str = CONE) -> dict:
    """A's request, announcing endpoints(5000)."""
    return {
        "type": "connect_request",
        "peer_id": peer_id,
        "request_id": request_id,
        "endpoints": endpoints(5000),
        "nat_mapping": mapping,
    }


def accept(introduction_id: str, *, mapping: str = CONE) -> dict:
    """B's answer, announcing endpoints(6000)."""
    return {
        "type": "introduction_accept",
        "introduction_id": introduction_id,
        "endpoints": endpoints(6000),
        "nat_mapping": mapping,
    }


async def test_a_nat_report_is_stored_for_the_admin_and_the_api() -> None:
    comm = await connected("a")
    await report_nat(comm, SYMMETRIC, 5000)
    worker = await database_sync_to_async(Worker.objects.get)(id="a")
    assert (worker.nat_mapping, worker.udp_ip, worker.udp_port) == (SYMMETRIC, "198.51.100.1", 5000)
    reply = await ask(comm, {"type": "nat_report", "mapping": "cone"})
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    await comm.disconnect()


async def test_the_peer_list_shows_other_connected_workers_without_addresses() -> None:
    a, b = await connected("a"), await connected("b")
    await report_nat(b, CONE, 6000)
    reply = await ask(a, {"type": "list_peers", "request_id": "r1"})
    assert reply == {
        "type": "peers",
        "request_id": "r1",
        "peers": [{"worker_id": "b", "tags": [], "nat_mapping": CONE}],
        "truncated": False,
    }
    tagged = await ask(a, {"type": "list_peers", "tag": "gpu"})
    assert tagged["peers"] == []
    await a.disconnect()
    await b.disconnect()


async def test_subscribers_hear_joins_and_leaves_but_not_themselves() -> None:
    watcher = await connected("watcher")
    assert await ask(watcher, {"type": "subscribe_peers"}) == {
        "type": "peers_subscribed",
        "tag": None,
    }
    newcomer = await connected("newcomer")
    joined = await watcher.receive_json_from(timeout=3)
    assert joined == {"type": "peer_joined", "peer": {"worker_id": "newcomer", "tags": []}}
    await newcomer.disconnect()
    assert await watcher.receive_json_from(timeout=3) == {
        "type": "peer_left",
        "worker_id": "newcomer",
    }
    assert await ask(watcher, {"type": "unsubscribe_peers"}) == {"type": "peers_unsubscribed"}
    late = await connected("late")
    assert await watcher.receive_nothing(timeout=0.3)
    await late.disconnect()
    await watcher.disconnect()


async def test_a_tag_filtered_subscription_hears_only_that_tag() -> None:
    await database_sync_to_async(Worker.objects.create)(
        id="gpu-1", first_seen="2026-01-01T00:00Z", last_seen="2026-01-01T00:00Z", tags=",gpu,"
    )
    watcher = await connected("watcher")
    await ask(watcher, {"type": "subscribe_peers", "tag": "gpu"})
    plain = await connected("plain")
    gpu = await connected("gpu-1")
    event = await watcher.receive_json_from(timeout=3)
    assert event["peer"] == {"worker_id": "gpu-1", "tags": ["gpu"]}
    for comm in (plain, gpu, watcher):
        await comm.disconnect()


async def test_an_introduction_gives_both_sides_the_others_endpoints_a_key_and_a_start() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await report_nat(b, CONE, 6000)
    pending = await ask(
        a,
        connect_request("b", request_id="req-1"),
    )
    assert pending["type"] == "connect_pending" and pending["request_id"] == "req-1"
    asked = await b.receive_json_from(timeout=3)
    assert asked == {
        "type": "introduction_request",
        "introduction_id": pending["introduction_id"],
        "peer_id": "a",
        "peer_nat_mapping": CONE,
    }
    before = time.time()
    for_b = await ask(
        b,
        accept(asked["introduction_id"]),
    )
    for_a = await a.receive_json_from(timeout=3)
    assert for_a["type"] == for_b["type"] == "introduction"
    assert for_a["introduction_id"] == for_b["introduction_id"] == pending["introduction_id"]
    assert for_a["key"] == for_b["key"] and len(bytes.fromhex(for_a["key"])) == 32
    assert for_a["start_at"] == for_b["start_at"] and for_a["start_at"] > before
    assert (for_a["peer_id"], for_a["peer_endpoints"], for_a["role"]) == (
        "b",
        endpoints(6000),
        "initiator",
    )
    assert (for_b["peer_id"], for_b["peer_endpoints"], for_b["role"]) == (
        "a",
        endpoints(5000),
        "responder",
    )
    assert for_a["request_id"] == "req-1"
    # The introduction is used up: a second answer is an error, not a second introduction.
    again = await ask(
        b,
        accept(asked["introduction_id"]),
    )
    assert again["type"] == "error"
    await a.disconnect()
    await b.disconnect()


async def test_a_refusing_peer_makes_the_request_fail_with_its_reason() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    request = connect_request("b")
    await ask(a, request)
    asked = await b.receive_json_from(timeout=3)
    acknowledged = await ask(
        b,
        {
            "type": "introduction_reject",
            "introduction_id": asked["introduction_id"],
            "reason": "busy",
        },
    )
    assert acknowledged == {
        "type": "introduction_rejected",
        "introduction_id": asked["introduction_id"],
    }
    failed = await a.receive_json_from(timeout=3)
    assert (failed["type"], failed["code"], failed["reason"]) == (
        "connect_failed",
        "PEER_REFUSED",
        "busy",
    )
    await a.disconnect()
    await b.disconnect()


@pytest.mark.parametrize(
    ("peer_id", "mine", "code"),
    [
        ("ghost", CONE, "PEER_UNAVAILABLE"),
        ("a", CONE, "NOT_YOURSELF"),
        ("b", SYMMETRIC, "PUNCH_IMPOSSIBLE"),
    ],
)
async def test_requests_that_cannot_succeed_fail_at_once(
    peer_id: str, mine: str, code: str
) -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await report_nat(b, SYMMETRIC, 6000)
    reply = await ask(
        a,
        connect_request(peer_id, mapping=mine),
    )
    assert (reply["type"], reply["code"]) == ("connect_failed", code)
    if code == "PUNCH_IMPOSSIBLE":
        assert "symmetric" in reply["reason"] and "relay" in reply["reason"]
    assert await b.receive_nothing(timeout=0.2)  # B was never bothered
    await a.disconnect()
    await b.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "connect_request", "peer_id": "b", "request_id": "r", "nat_mapping": CONE},
        {"type": "connect_request", "peer_id": "b", "endpoints": [], "nat_mapping": CONE},
        {
            "type": "connect_request",
            "peer_id": "../b",
            "request_id": "r",
            "endpoints": endpoints(1),
            "nat_mapping": CONE,
        },
        {
            "type": "connect_request",
            "peer_id": "b",
            "request_id": "r",
            "endpoints": [{"ip": "example.com", "port": 1}],
            "nat_mapping": CONE,
        },
        {
            "type": "connect_request",
            "peer_id": "b",
            "request_id": "r",
            "endpoints": [{"ip": "10.0.0.1", "port": 70000}],
            "nat_mapping": CONE,
        },
        {"type": "introduction_accept", "introduction_id": "nothex", "endpoints": endpoints(1)},
        {"type": "punch_result", "introduction_id": "0" * 32, "ok": "yes"},
    ],
)
async def test_malformed_peering_frames_get_an_error_and_the_connection_stays(frame) -> None:
    comm = await connected("a")
    reply = await ask(comm, frame)
    assert reply["type"] == "error" and reply["code"] in {
        "INVALID_FIELD",
        "MISSING_FIELD",
        "INVALID_IP",
    }
    assert (await ask(comm, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await comm.disconnect()


async def test_an_answer_to_an_introduction_never_requested_is_an_error() -> None:
    b = await connected("b")
    reply = await ask(
        b,
        {
            "type": "introduction_accept",
            "introduction_id": "0" * 32,
            "endpoints": endpoints(1),
            "nat_mapping": CONE,
        },
    )
    assert reply["type"] == "error" and "no introduction pending" in reply["message"]
    await b.disconnect()


async def test_parsing_a_connect_request_drops_duplicate_endpoints() -> None:
    message = protocol.parse_client_message(
        json.dumps(
            {
                "type": "connect_request",
                "peer_id": "b",
                "request_id": "r",
                "endpoints": endpoints(5000) + endpoints(5000),  # duplicates are dropped
                "nat_mapping": CONE,
            }
        )
    )
    assert isinstance(message, protocol.ConnectRequest)
    assert [(e.ip, e.port) for e in message.endpoints] == [
        ("198.51.100.1", 5000),
        ("10.0.0.2", 5000),
    ]


async def test_the_api_shows_the_nat_report(async_client) -> None:
    comm = await connected("a")
    await report_nat(comm, CONE, 5000)
    body = (await async_client.get("/api/workers/a/")).json()
    assert body["nat"]["mapping"] == CONE
    assert body["nat"]["udp_endpoint"] == {"ip": "198.51.100.1", "port": 5000}
    assert body["nat"]["reported_at"]
    await comm.disconnect()


async def test_a_new_connection_forgets_the_previous_nat_report() -> None:
    first = await connected("a", 1)
    await report_nat(first, SYMMETRIC, 5000)
    await first.disconnect()
    second = await connected("a", 2)
    worker = await database_sync_to_async(Worker.objects.get)(id="a")
    # Another network, maybe: a stale report must not refuse introductions (PUNCH_IMPOSSIBLE).
    assert (worker.nat_mapping, worker.udp_ip, worker.udp_port) == ("", None, None)
    await second.disconnect()


async def test_the_requested_side_is_told_why_when_both_nats_are_symmetric() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await ask(
        a,
        connect_request("b", mapping=SYMMETRIC),
    )
    asked = await b.receive_json_from(timeout=3)
    for_b = await ask(
        b,
        accept(asked["introduction_id"], mapping=SYMMETRIC),
    )
    for_a = await a.receive_json_from(timeout=3)
    assert for_a["code"] == for_b["code"] == "PUNCH_IMPOSSIBLE"
    assert (for_a["peer_id"], for_b["peer_id"]) == ("b", "a")  # each is told of the other
    await a.disconnect()
    await b.disconnect()


async def test_connect_requests_beyond_the_burst_are_refused_without_bothering_the_peer() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    codes = [(await ask(a, connect_request("b", request_id=f"r{n}"))).get("code") for n in range(7)]
    assert codes[:5] == [None] * 5  # connect_pending
    assert codes[5:] == ["RATE_LIMITED"] * 2
    asked = [await b.receive_json_from(timeout=3) for _ in range(5)]
    assert {m["type"] for m in asked} == {"introduction_request"}
    assert await b.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


async def test_a_worker_disconnected_by_an_operator_is_announced_as_left() -> None:
    # Regression: the operator's close ended the row first, so the consumer's own close did not
    # "end" the worker and no peer_left went out.
    from registry import control

    watcher = await connected("watcher", 1)
    await ask(watcher, {"type": "subscribe_peers"})
    target = await connected("target", 2)
    assert (await watcher.receive_json_from(timeout=3))["type"] == "peer_joined"
    await database_sync_to_async(control.disable_workers)(["target"])
    assert (await target.receive_json_from(timeout=3))["code"] == 4011
    assert (await target.receive_output(timeout=3))["type"] == "websocket.close"
    await target.disconnect(code=4011)  # what daphne reports once the socket is closed
    assert await watcher.receive_json_from(timeout=3) == {
        "type": "peer_left",
        "worker_id": "target",
    }
    await watcher.disconnect()


async def test_a_channel_layer_failure_fails_the_frame_not_the_connection(monkeypatch) -> None:
    # Regression: an exception from the layer escaped receive() and ended the consumer without
    # its disconnect clean-up, leaving the socket counted as held for ever.
    from registry.runtime import get_runtime

    comm = await connected("a")

    async def broken(*args, **kwargs):
        raise ConnectionError("layer away")

    monkeypatch.setattr(get_runtime().peers, "subscribe", broken)
    reply = await ask(comm, {"type": "subscribe_peers"})
    assert (reply["type"], reply["code"]) == ("error", "UNAVAILABLE")
    assert (await ask(comm, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await comm.disconnect()
    assert get_runtime().held_count() == 0


async def test_tags_match_whatever_their_case() -> None:
    await database_sync_to_async(Worker.objects.create)(
        id="gpu-1", first_seen="2026-01-01T00:00Z", last_seen="2026-01-01T00:00Z", tags=",gpu,"
    )
    gpu = await connected("gpu-1", 1)
    a = await connected("a", 2)
    reply = await ask(a, {"type": "list_peers", "tag": "GPU"})
    assert [p["worker_id"] for p in reply["peers"]] == ["gpu-1"]
    await gpu.disconnect()
    await a.disconnect()
