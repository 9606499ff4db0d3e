"""Hostile values in the fields of peer messages, through the consumer: each gets its coded
error, nothing reaches the peer, nothing is logged with a traceback, and the introduction it
named is left as it was, so the well-formed message after it still does its work (issue 19).
"""

from __future__ import annotations

import json
import logging

import pytest
from channels.db import database_sync_to_async

from registry.models import PeerConnection
from registry.ops import metrics
from tests.test_peering import ask, connect_request, connected, introduce
from tests.test_relay import CANDIDATE, offer, pair

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

SRFLX = "842163049 1 udp 1677729535 198.51.100.7 40312 typ srflx raddr 10.0.1.2 rport 5000"
# Characters str.isdigit() accepts that are not ASCII digits: superscript two (int() raises on
# it), Arabic-Indic and fullwidth digits (int() reads them as numbers).
NOT_ASCII_DIGITS = {"superscript": "²", "arabic-indic": "١٢", "fullwidth": "\uff11\uff12"}
NUMBER_FIELDS = {
    "component": (CANDIDATE, 1),
    "priority": (CANDIDATE, 3),
    "port": (CANDIDATE, 5),
    "rport": (SRFLX, 11),
}


def with_token(candidate: str, index: int, token: str) -> str:
    tokens = candidate.split()
    tokens[index] = token
    return " ".join(tokens)


def errors_counted(code: str) -> float:
    labels = {"instance_name": metrics._instance(), "code": code}
    return metrics.REGISTRY.get_sample_value("rendezvous_protocol_errors_total", labels) or 0.0


@pytest.fixture
def tracebacks(caplog: pytest.LogCaptureFixture):
    """The log records of the test at ERROR or with a traceback: there must be none."""
    caplog.set_level(logging.DEBUG, logger="registry")
    yield lambda: [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("digits", NOT_ASCII_DIGITS.values(), ids=NOT_ASCII_DIGITS.keys())
@pytest.mark.parametrize("field", NUMBER_FIELDS.keys())
async def test_a_candidate_number_in_other_than_ascii_digits_is_an_invalid_field(
    field: str, digits: str, tracebacks
) -> None:
    a, b, introduction_id = await pair()
    unavailable = errors_counted("UNAVAILABLE")
    candidate, index = NUMBER_FIELDS[field]
    reply = await ask(a, offer(introduction_id, candidates=[with_token(candidate, index, digits)]))
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    assert field in reply["message"]
    assert await b.receive_nothing(timeout=0.2)
    assert errors_counted("UNAVAILABLE") == unavailable
    assert tracebacks() == []
    await a.send_json_to(offer(introduction_id, candidates=[candidate]))  # the link still works
    assert (await b.receive_json_from(timeout=3))["candidates"] == [candidate]
    await a.disconnect()
    await b.disconnect()


UNSTORABLE = {"lone high surrogate": "\ud800 bye", "lone low surrogate": "\udcff", "NUL": "a\x00b"}


@database_sync_to_async
def record(introduction_id: str) -> PeerConnection:
    return PeerConnection.objects.get(id=introduction_id)


@pytest.mark.parametrize("reason", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_a_close_reason_utf8_cannot_store_is_refused_and_the_link_stays(
    reason: str, tracebacks
) -> None:
    a, b, introduction_id = await pair()
    close = {"type": "peer_close", "introduction_id": introduction_id}
    reply = await ask(a, {**close, "reason": reason})
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    assert "reason" in reply["message"]
    assert await b.receive_nothing(timeout=0.2)
    assert tracebacks() == []
    assert (await ask(a, {**close, "reason": "done"}))["type"] == "peer_closed"
    assert (await b.receive_json_from(timeout=3))["reason"] == "done"
    await a.disconnect()
    await b.disconnect()
    assert (await record(introduction_id)).close_reason == "done"


@pytest.mark.parametrize("reason", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_a_reject_reason_utf8_cannot_store_is_refused_and_the_request_stays(
    reason: str, tracebacks
) -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    await ask(a, connect_request("b"))
    asked = await b.receive_json_from(timeout=3)
    reject = {"type": "introduction_reject", "introduction_id": asked["introduction_id"]}
    reply = await ask(b, {**reject, "reason": reason})
    assert (reply["type"], reply["code"]) == ("error", "INVALID_FIELD")
    assert await a.receive_nothing(timeout=0.1)
    assert (await ask(b, {**reject, "reason": "busy"}))["type"] == "introduction_rejected"
    assert (await a.receive_json_from(timeout=3))["reason"] == "busy"
    assert tracebacks() == []
    await a.disconnect()
    await b.disconnect()
    stored = await record(asked["introduction_id"])
    assert (stored.failure_code, stored.detail) == ("PEER_REFUSED", "busy")


async def test_ice_candidates_of_the_well_formed_kind_still_pass_in_canonical_form() -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    introduction_id = for_a["introduction_id"]
    padded = f"candidate:{SRFLX.replace(' 5000', ' 05000')} generation 0"
    await a.send_to(text_data=json.dumps(offer(introduction_id, candidates=[padded])))
    assert (await b.receive_json_from(timeout=3))["candidates"] == [SRFLX]
    await a.disconnect()
    await b.disconnect()


def dropped_counted(reason: str) -> float:
    labels = {"instance_name": metrics._instance(), "reason": reason}
    return metrics.REGISTRY.get_sample_value("rendezvous_messages_dropped_total", labels) or 0.0


async def test_a_flood_gets_one_log_line_per_streak_and_one_at_its_close(settings, caplog) -> None:
    """Issue 19: after the 4029 close every further frame logged "closed for flooding" again (870
    lines for one connection). The drops are counted in /metrics instead."""
    settings.RENDEZVOUS = {
        **settings.RENDEZVOUS,
        "RATE_LIMIT": 1.0,
        "RATE_BURST": 3,
        "RATE_LIMIT_CLOSE_AFTER": 10,
    }
    caplog.set_level(logging.INFO, logger="registry.consumers")
    before = dropped_counted("rate_limited"), dropped_counted("closing")
    comm = await connected("flooder")
    for _ in range(3 + 10 + 50):  # the burst, the streak that closes it, and what comes after
        await comm.send_to(text_data='{"type": "heartbeat"}')
    replies = [await comm.receive_output(timeout=3) for _ in range(3 + 1 + 2)]
    assert [json.loads(r["text"]).get("code") for r in replies[:5]] == [None] * 3 + [
        "RATE_LIMITED",
        4029,
    ]
    assert replies[5] == {"type": "websocket.close", "code": 4029}
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect(code=4029)
    messages = [r.getMessage() for r in caplog.records if "worker=flooder" in r.getMessage()]
    [closed] = [m for m in messages if "closed for flooding" in m]
    assert closed.endswith("closed for flooding: 10 messages dropped")
    assert len([m for m in messages if "RATE_LIMITED" in m]) == 1
    assert dropped_counted("rate_limited") == before[0] + 10
    assert dropped_counted("closing") == before[1] + 50
