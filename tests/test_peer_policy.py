"""The peer policy, enforced by the consumer (in process, one instance): introductions refused
with POLICY_DENIED and recorded, the peer list and the peer events filtered, links ended when a
rule no longer allows them, and a policy that cannot be read refusing everything. Across two
instances over Redis, with real agents: tests/test_policy_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from registry.models import PeerConnection, PeerRule, Worker
from registry.ops import metrics
from registry.peering import rules
from registry.peering.rules import POLICY_CHANGED, POLICY_GROUP
from registry.presence.runtime import get_runtime, reset_runtime
from tests.test_peering import accept, ask, connect_request, connected, introduce
from tests.test_relay import frame

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest.fixture
def rules_mode(settings) -> Iterator[None]:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "PEER_POLICY": "rules"}
    reset_runtime()  # an instance reads the mode when it starts
    yield


def tagged(worker_id: str, *tags: str) -> None:
    Worker.objects.create(
        id=worker_id,
        first_seen="2026-01-01T00:00Z",
        last_seen="2026-01-01T00:00Z",
        tags="," + ",".join(tags) + ",",
    )


async def add_rule(sources: str, destinations: str, description: str = "") -> PeerRule:
    rule = await database_sync_to_async(PeerRule.objects.create)(
        sources=sources, destinations=destinations, description=description
    )
    await get_runtime().reload_policy()  # what the announcement of the change does, at once
    return rule


async def test_with_no_rules_nothing_is_reachable_and_the_refusal_is_recorded(rules_mode) -> None:
    a, b = await connected("a", 1), await connected("b", 2)
    for peer in ("b", "offline-worker"):  # the same answer whether the peer is online or not
        reply = await ask(a, connect_request(peer))
        assert (reply["type"], reply["code"]) == ("connect_failed", "POLICY_DENIED")
        assert reply["reason"] == f"no peer policy rule lets a reach {peer}"
    assert await b.receive_nothing(timeout=0.2)  # B was never asked
    await asyncio.sleep(0.2)
    records = await database_sync_to_async(list)(
        PeerConnection.objects.order_by("target_id").values_list(
            "requester_id", "target_id", "outcome", "failure_code", "decided_by"
        )
    )
    assert records == [
        ("a", "b", "refused", "POLICY_DENIED", "no peer policy rule lets a reach b"),
        (
            "a",
            "offline-worker",
            "refused",
            "POLICY_DENIED",
            "no peer policy rule lets a reach offline-worker",
        ),
    ]
    await a.disconnect()
    await b.disconnect()


async def test_a_rule_allows_one_direction_and_the_record_names_it(rules_mode) -> None:
    await database_sync_to_async(tagged)("ci-1", "ci")
    await database_sync_to_async(tagged)("gpu-1", "gpu")
    rule = await add_rule("tag:ci", "tag:gpu", "CI may reach GPU boxes")
    ci, gpu = await connected("ci-1", 1), await connected("gpu-1", 2)
    for_ci, _ = await introduce(ci, gpu, "gpu-1")
    await asyncio.sleep(0.2)
    record = await database_sync_to_async(PeerConnection.objects.get)(id=for_ci["introduction_id"])
    assert record.decided_by == f"rule #{rule.pk} (CI may reach GPU boxes)"
    back = await ask(gpu, connect_request("ci-1"))  # the other way round: no rule
    assert back["code"] == "POLICY_DENIED"
    await ci.disconnect()
    await gpu.disconnect()


async def test_the_peer_list_and_the_peer_events_show_only_reachable_workers(rules_mode) -> None:
    for worker_id, tag in (("ci-1", "ci"), ("gpu-1", "gpu"), ("gpu-2", "gpu"), ("lab-1", "lab")):
        await database_sync_to_async(tagged)(worker_id, tag)
    await add_rule("tag:ci", "tag:gpu")
    ci = await connected("ci-1", 1)
    await ask(ci, {"type": "subscribe_peers"})
    others = [await connected(w, n) for n, w in enumerate(("gpu-1", "lab-1", "gpu-2"), 2)]
    heard = [await ci.receive_json_from(timeout=3) for _ in range(2)]
    assert sorted(event["peer"]["worker_id"] for event in heard) == ["gpu-1", "gpu-2"]
    assert await ci.receive_nothing(timeout=0.3)  # lab-1 joined, unannounced
    listed = await ask(ci, {"type": "list_peers", "request_id": "l"})
    assert [p["worker_id"] for p in listed["peers"]] == ["gpu-1", "gpu-2"]
    gpu = others[0]
    assert (await ask(gpu, {"type": "list_peers"}))["peers"] == []  # GPU boxes reach nobody
    for comm in (ci, *others):
        await comm.disconnect()


async def test_a_link_the_rules_no_longer_allow_is_ended_for_both_sides(rules_mode) -> None:
    rule = await add_rule("a", "b")
    a, b = await connected("a", 1), await connected("b", 2)
    for_a, _ = await introduce(a, b)
    introduction_id = for_a["introduction_id"]
    await a.send_to(bytes_data=frame(introduction_id, b"relayed"))
    assert await b.receive_from(timeout=3) == frame(introduction_id, b"relayed")
    before = metrics.REGISTRY.get_sample_value(
        "rendezvous_policy_links_ended_total", {"instance_name": metrics._instance()}
    )
    rule.enabled = False
    await database_sync_to_async(rule.save)()  # announced on commit: the instance reloads
    for comm in (a, b):
        closed = await comm.receive_json_from(timeout=2)  # the periodic check would take 5 s
        assert closed["type"] == "peer_closed"
        assert closed["reason"].startswith("the peer policy no longer allows it")
    after = metrics.REGISTRY.get_sample_value(
        "rendezvous_policy_links_ended_total", {"instance_name": metrics._instance()}
    )
    assert after == (before or 0) + 2  # each side's link, on this one instance
    await a.send_to(bytes_data=frame(introduction_id, b"after"))
    error = await a.receive_json_from(timeout=3)
    assert error["code"] == "RELAY_NOT_INTRODUCED"  # nothing is relayed for the pair any more
    assert await b.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


async def test_a_change_made_around_the_signals_is_found_by_the_periodic_check(
    rules_mode, monkeypatch
) -> None:
    monkeypatch.setattr(rules, "POLICY_CHECK_EVERY", 0.2)
    rule = await add_rule("a", "b")
    a, b = await connected("a", 1), await connected("b", 2)
    await introduce(a, b)
    # A bulk update sends no post_save and leaves updated_at alone: nothing is announced.
    await database_sync_to_async(PeerRule.objects.filter(pk=rule.pk).update)(enabled=False)
    for comm in (a, b):
        closed = await comm.receive_json_from(timeout=3)
        assert closed["reason"].startswith("the peer policy no longer allows it")
    await a.disconnect()
    await b.disconnect()


async def test_a_rule_removed_while_the_peer_decides_refuses_at_its_answer(rules_mode) -> None:
    rule = await add_rule("a", "b")
    a, b = await connected("a", 1), await connected("b", 2)
    pending = await ask(a, connect_request("b"))
    asked = await b.receive_json_from(timeout=3)
    await database_sync_to_async(rule.delete)()
    answer = await ask(b, accept(asked["introduction_id"]))
    assert (answer["type"], answer["code"]) == ("connect_failed", "POLICY_DENIED")
    told = await a.receive_json_from(timeout=3)
    assert told["code"] == "POLICY_DENIED"
    assert told["introduction_id"] == pending["introduction_id"]
    await asyncio.sleep(0.2)
    record = await database_sync_to_async(PeerConnection.objects.get)(id=pending["introduction_id"])
    assert (record.outcome, record.decided_by) == ("refused", "no peer policy rule lets a reach b")
    await a.disconnect()
    await b.disconnect()


async def test_a_pair_the_policy_allowed_and_the_peer_refused_says_both(rules_mode) -> None:
    rule = await add_rule("a", "b", "a may reach b")
    a, b = await connected("a", 1), await connected("b", 2)
    pending = await ask(a, connect_request("b"))
    asked = await b.receive_json_from(timeout=3)
    reject = {"type": "introduction_reject", "introduction_id": asked["introduction_id"]}
    assert (await ask(b, reject))["type"] == "introduction_rejected"
    assert (await a.receive_json_from(timeout=3))["code"] == "PEER_REFUSED"
    await asyncio.sleep(0.2)
    record = await database_sync_to_async(PeerConnection.objects.get)(id=pending["introduction_id"])
    assert record.failure_code == "PEER_REFUSED"
    assert record.decided_by == f"rule #{rule.pk} (a may reach b)"
    await a.disconnect()
    await b.disconnect()


async def test_rules_that_cannot_be_read_refuse_everything(rules_mode, monkeypatch) -> None:
    def unreadable(mode: str | None = None) -> None:
        raise RuntimeError("the database is gone")

    await add_rule("*", "*")
    a, b = await connected("a", 1), await connected("b", 2)
    monkeypatch.setattr(rules, "current", unreadable)
    reply = await ask(a, connect_request("b"))
    assert reply["code"] == "POLICY_DENIED"
    assert await b.receive_nothing(timeout=0.2)
    await a.disconnect()
    await b.disconnect()


async def test_a_stored_rule_that_cannot_be_read_allows_nothing(rules_mode) -> None:
    await database_sync_to_async(PeerRule.objects.create)(sources="a b/c", destinations="*")
    await add_rule("a", "c")
    policy = await database_sync_to_async(rules.load)()
    assert [rule.destinations[0].value for rule in policy.rules] == ["c"]  # the broken one left out


async def test_a_rule_saved_or_deleted_is_announced_to_every_instance_once_committed() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()  # stands in for another instance's command channel
    await layer.group_add(POLICY_GROUP, channel)
    rule = await database_sync_to_async(PeerRule.objects.create)(sources="a", destinations="b")
    assert (await asyncio.wait_for(layer.receive(channel), 2))["type"] == POLICY_CHANGED
    await database_sync_to_async(rule.delete)()
    assert (await asyncio.wait_for(layer.receive(channel), 2))["type"] == POLICY_CHANGED
