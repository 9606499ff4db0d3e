"""Peer discovery and introductions through the consumer: NAT reports, the peer list, join and
leave events, and the introduction handshake between two workers (in process; the relay is
tests/test_relay.py, real agents across real NAT tests/test_paths_e2e.py)."""

from __future__ import annotations

import json
import time

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from registry.core import turn
from registry.models import PeerConnection, Worker
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


def connect_request(
    peer_id: str, *, request_id: str = "r", version: int | None = 2, transport: str = "datagrams"
) -> dict:
    """A raw datagram path by default: these communicators present no certificate (QUIC
    introductions, which need one, are tested in tests/test_identities.py)."""
    request = {
        "type": "connect_request",
        "peer_id": peer_id,
        "request_id": request_id,
        "transport": transport,
    }
    return request if version is None else {**request, "protocol_version": version}


def accept(introduction_id: str, *, version: int | None = 2) -> dict:
    answer = {"type": "introduction_accept", "introduction_id": introduction_id}
    return answer if version is None else {**answer, "protocol_version": version}


async def introduce(a: WebsocketCommunicator, b: WebsocketCommunicator, peer_id: str = "b"):
    """A asks for `peer_id` (B), B accepts: (A's introduction, B's introduction)."""
    pending = await ask(a, connect_request(peer_id))
    asked = await b.receive_json_from(timeout=3)
    for_b = await ask(b, accept(asked["introduction_id"]))
    for_a = await a.receive_json_from(timeout=3)
    assert for_a["introduction_id"] == for_b["introduction_id"] == pending["introduction_id"]
    return for_a, for_b


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


async def test_an_introduction_tells_both_sides_of_each_other_and_of_the_relay() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    pending = await ask(a, connect_request("b", request_id="req-1"))
    assert pending["type"] == "connect_pending" and pending["request_id"] == "req-1"
    asked = await b.receive_json_from(timeout=3)
    assert asked == {
        "type": "introduction_request",
        "introduction_id": pending["introduction_id"],
        "peer_id": "a",
        "protocol_version": 3,
        "transport": "datagrams",
    }
    for_b = await ask(b, accept(asked["introduction_id"]))
    for_a = await a.receive_json_from(timeout=3)
    common = {"type": "introduction", "introduction_id": pending["introduction_id"]}
    assert for_a == {
        **common,
        "request_id": "req-1",
        "peer_id": "b",
        "role": "initiator",
        "relay": True,
        "turn": None,  # no TURN configured
        "transport": "datagrams",
        "peer_certificate": None,
    }
    assert for_b == {
        **common,
        "request_id": None,
        "peer_id": "a",
        "role": "responder",
        "relay": True,
        "turn": None,
        "transport": "datagrams",
        "peer_certificate": None,
    }
    # The introduction is used up: a second answer is an error, not a second introduction.
    again = await ask(b, accept(asked["introduction_id"]))
    assert again["type"] == "error"
    await a.disconnect()
    await b.disconnect()


async def test_each_side_gets_turn_credentials_of_its_own_and_never_the_secret(settings) -> None:
    settings.RENDEZVOUS = {
        **settings.RENDEZVOUS,
        "TURN_SERVERS": ["203.0.113.10:3480"],
        "TURN_SECRET": "s3cret-s3cret-s3cret",
        "TURN_TTL": 600.0,
    }
    a, b = await connected("a", 1), await connected("b", 2)
    before = time.time()
    for_a, for_b = await introduce(a, b)
    for offer, worker_id in ((for_a["turn"], "a"), (for_b["turn"], "b")):
        assert offer["servers"] == ["203.0.113.10:3480"]
        expiry, name = offer["username"].split(":")
        assert name == worker_id and int(before) + 600 <= int(expiry) <= time.time() + 600
        assert offer["expires_at"] == int(expiry)
        assert offer["password"] == turn.password_for("s3cret-s3cret-s3cret", offer["username"])
        assert "s3cret" not in json.dumps(offer)
    await a.disconnect()
    await b.disconnect()


@pytest.mark.parametrize(
    ("probing", "mappings", "parts"),
    [
        (True, (SYMMETRIC, CONE), ("hard", "easy")),
        (True, (CONE, SYMMETRIC), ("easy", "hard")),
        (True, (SYMMETRIC, SYMMETRIC), (None, None)),  # probing cannot help two hard NATs
        (True, (CONE, CONE), (None, None)),  # ICE punches those
        (True, (SYMMETRIC, None), (None, None)),  # B has not reported yet
        (False, (SYMMETRIC, CONE), (None, None)),  # off: the default
    ],
    ids=["hard-easy", "easy-hard", "hard-hard", "easy-easy", "unreported", "off"],
)
async def test_hard_nat_probing_is_asked_of_exactly_one_hard_and_one_easy_side_when_on(
    settings, probing: bool, mappings: tuple, parts: tuple
) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "HARD_NAT_PROBING": probing}
    a, b = await connected("a", 1), await connected("b", 2)
    for comm, mapping, port in ((a, mappings[0], 5001), (b, mappings[1], 5002)):
        if mapping is not None:
            await report_nat(comm, mapping, port)
    for_a, for_b = await introduce(a, b)
    assert (for_a.get("hard_nat"), for_b.get("hard_nat")) == parts
    await a.disconnect()
    await b.disconnect()


async def test_a_refusing_peer_makes_the_request_fail_with_its_reason() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await ask(a, connect_request("b"))
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
    record = await database_sync_to_async(PeerConnection.objects.get)(id=asked["introduction_id"])
    assert (record.outcome, record.failure_code, record.detail) == (
        "refused",
        "PEER_REFUSED",
        "busy",
    )
    await a.disconnect()
    await b.disconnect()


async def test_a_peer_that_does_not_answer_fails_the_request_within_two_seconds() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    started = time.monotonic()
    await ask(a, connect_request("b"))
    asked = await b.receive_json_from(timeout=3)  # ... and B's agent says nothing
    failed = await a.receive_json_from(timeout=3)
    assert time.monotonic() - started < 2.0
    assert (failed["code"], failed["introduction_id"]) == (
        "PEER_UNRESPONSIVE",
        asked["introduction_id"],
    )
    late = await ask(b, accept(asked["introduction_id"]))
    assert late["type"] == "error" and "no introduction pending" in late["message"]
    await a.disconnect()
    await b.disconnect()


async def test_a_peer_that_leaves_before_answering_fails_the_request() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await ask(a, connect_request("b"))
    await b.receive_json_from(timeout=3)
    await b.disconnect()
    failed = await a.receive_json_from(timeout=3)
    assert (failed["code"], failed["reason"]) == ("PEER_UNAVAILABLE", "worker b went offline")
    await a.disconnect()


@pytest.mark.parametrize(
    ("peer_id", "code"), [("ghost", "PEER_UNAVAILABLE"), ("a", "NOT_YOURSELF")]
)
async def test_requests_that_cannot_succeed_fail_at_once(peer_id: str, code: str) -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    reply = await ask(a, connect_request(peer_id))
    assert (reply["type"], reply["code"]) == ("connect_failed", code)
    assert await b.receive_nothing(timeout=0.2)  # B was never bothered
    await a.disconnect()
    await b.disconnect()


async def test_an_agent_of_the_first_peer_protocol_gets_a_clear_error() -> None:
    """Agents before version 2 sent endpoints to punch, and no protocol_version."""
    a, b = await connected("a", 1), await connected("b", 2)
    old = {**connect_request("b", version=None), "endpoints": [{"ip": "10.0.0.1", "port": 1}]}
    reply = await ask(a, old)
    assert (reply["type"], reply["code"]) == ("connect_failed", "AGENT_OUTDATED")
    assert "upgrade rendezvous-worker-agent" in reply["reason"]
    assert await b.receive_nothing(timeout=0.2)
    # An old agent on the asked side: the requester is told, the old agent gets an error.
    await ask(a, connect_request("b"))
    asked = await b.receive_json_from(timeout=3)
    answer = await ask(b, accept(asked["introduction_id"], version=None))
    assert answer["type"] == "error" and "upgrade" in answer["message"]
    failed = await a.receive_json_from(timeout=3)
    assert failed["code"] == "AGENT_OUTDATED" and "worker b" in failed["reason"]
    await a.disconnect()
    await b.disconnect()


async def test_a_worker_at_its_peer_limit_is_refused_new_introductions(settings) -> None:
    """The limit is per kind: the introductions a worker asked for, and those others asked for
    once in use. Others' requests do not take the slots of a worker's own."""
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "RELAY_MAX_PEERS": 1}
    a, b, c = await connected("a", 1), await connected("b", 2), await connected("c", 3)
    for_a, _ = await introduce(a, b)
    reply = await ask(a, connect_request("c", request_id="r2"))  # A asked for one already
    assert reply["code"] == "TOO_MANY_PEERS" and "RENDEZVOUS_RELAY_MAX_PEERS" in reply["reason"]
    await introduce(b, c, peer_id="c")  # B's own request: A's link to B does not count
    path = {"type": "path_report", "introduction_id": for_a["introduction_id"], "kind": "relay"}
    assert (await ask(a, path))["type"] == "path_report_recorded"  # A's link to B in use
    await ask(c, connect_request("b", request_id="r3"))  # B has one in use that another asked for
    asked = await b.receive_json_from(timeout=3)
    for_b = await ask(b, accept(asked["introduction_id"]))
    for_c = await c.receive_json_from(timeout=3)
    assert for_b["code"] == for_c["code"] == "TOO_MANY_PEERS"
    for comm in (a, b, c):
        await comm.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "connect_request", "peer_id": "b", "protocol_version": 2},
        {"type": "connect_request", "request_id": "r", "protocol_version": 2},
        {"type": "connect_request", "peer_id": "../b", "request_id": "r", "protocol_version": 2},
        {"type": "connect_request", "peer_id": "b", "request_id": "r", "protocol_version": "2"},
        {"type": "introduction_accept", "introduction_id": "nothex", "protocol_version": 2},
        {"type": "introduction_reject", "introduction_id": "0" * 32, "reason": 5},
        {"type": "path_report", "introduction_id": "0" * 32, "kind": "carrier-pigeon"},
        {"type": "peer_close"},
    ],
)
async def test_malformed_peering_frames_get_an_error_and_the_connection_stays(frame) -> None:
    comm = await connected("a")
    reply = await ask(comm, frame)
    assert reply["type"] == "error" and reply["code"] in {"INVALID_FIELD", "MISSING_FIELD"}
    assert (await ask(comm, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await comm.disconnect()


async def test_an_answer_to_an_introduction_never_requested_is_an_error() -> None:
    b = await connected("b")
    reply = await ask(b, accept("0" * 32))
    assert reply["type"] == "error" and "no introduction pending" in reply["message"]
    await b.disconnect()


async def test_the_requester_reports_its_path_and_the_record_follows_it() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    introduction_id = for_a["introduction_id"]
    report = {"type": "path_report", "introduction_id": introduction_id}
    recorded = await ask(a, {**report, "kind": "relay", "remote": None, "setup_ms": 42})
    assert recorded == {
        "type": "path_report_recorded",
        "introduction_id": introduction_id,
        "kind": "relay",
    }
    direct = {"ip": "198.51.100.9", "port": 4000}
    await ask(a, {**report, "kind": "direct", "remote": direct, "setup_ms": 900})
    record = await database_sync_to_async(PeerConnection.objects.get)(id=introduction_id)
    assert (record.requester_id, record.target_id, record.outcome) == ("a", "b", "connected")
    assert (record.path_kind, record.path_remote) == ("direct", "198.51.100.9:4000")
    assert (record.setup_ms, record.path_changes) == (42, 2)  # the first report's setup time
    closed = await ask(a, {"type": "peer_close", "introduction_id": introduction_id})
    assert closed["type"] == "peer_closed"
    told = await b.receive_json_from(timeout=3)
    assert told == {
        "type": "peer_closed",
        "introduction_id": introduction_id,
        "peer_id": "a",
        "code": "CLOSED",
        "reason": "closed by a",
    }
    record = await database_sync_to_async(PeerConnection.objects.get)(id=introduction_id)
    assert record.closed_at is not None and record.close_reason == "closed by a"
    stale = await ask(a, {**report, "kind": "lan"})  # the link is gone
    assert stale["type"] == "error"
    await a.disconnect()
    await b.disconnect()


async def test_a_peer_going_offline_ends_the_introduction_for_the_other_side() -> None:
    """Ended at the service, with the code that tells the agent the peer may come back and
    resume it (docs/peer-connections.md, "What survives what")."""
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    await b.disconnect()
    told = await a.receive_json_from(timeout=3)
    assert told == {
        "type": "peer_closed",
        "introduction_id": for_a["introduction_id"],
        "peer_id": "b",
        "code": "PEER_OFFLINE",
        "reason": "worker b went offline",
    }
    await a.disconnect()


async def test_a_connect_request_resumes_an_introduction_and_the_peer_is_told_which() -> None:
    """A resumed introduction is a new one (checked like any other) that names the one it
    replaces, for the target's agent to carry its connection on; an agent too old to resume
    is not asked to."""
    a, b = await connected("a", 1), await connected("b", 2)
    first, _ = await introduce(a, b)
    old = first["introduction_id"]
    pending = await ask(a, {**connect_request("b", request_id="again"), "resumes": old})
    asked = await b.receive_json_from(timeout=3)
    assert asked["type"] == "introduction_request" and asked["resumes"] == old
    assert asked["introduction_id"] == pending["introduction_id"] != old
    old_agent = {**accept(asked["introduction_id"]), "protocol_version": 2}
    refused = await ask(b, old_agent)
    assert refused == {"type": "introduction_rejected", "introduction_id": asked["introduction_id"]}
    failed = await a.receive_json_from(timeout=3)
    assert (failed["code"], "cannot resume" in failed["reason"]) == ("PEER_REFUSED", True)
    bad = await ask(a, {**connect_request("b", request_id="bad"), "resumes": "nothex"})
    assert (bad["type"], bad["code"]) == ("error", "INVALID_FIELD")
    await a.disconnect()
    await b.disconnect()


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
    assert (worker.nat_mapping, worker.udp_ip, worker.udp_port) == ("", None, None)
    await second.disconnect()


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
    from registry.ops import control

    watcher = await connected("watcher", 1)
    await ask(watcher, {"type": "subscribe_peers"})
    target = await connected("target", 2)
    assert (await watcher.receive_json_from(timeout=3))["type"] == "peer_joined"
    await database_sync_to_async(control.disable_and_disconnect)(["target"])
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
    from registry.presence.runtime import get_runtime

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
