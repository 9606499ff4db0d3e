"""The peer policy across two instances over Redis, with real agents and a real admin: a pair
refused, then allowed once a rule is added in the admin of one instance; the peer list and the
peer events filtered; an encrypted session through the service relay ended on both sides, at
once, when its rule is switched off in the admin of the other instance."""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from registry.models import PeerConnection, PeerRule, Worker
from tests.support.admin_http import AdminSession
from tests.support.backing import RedisServer, require_or_skip
from tests.support.processes import ServerProcess, wait_until
from worker_agent import PeerConnection as Connection
from worker_agent import PeerError, PolicyDenied, WorkerAgent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres_only]


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess


@pytest.fixture
def instances(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Pair]:
    if connection.vendor != "postgresql":
        pytest.skip("multi-instance tests run on PostgreSQL: the second pass of `make test`")
    require_or_skip(shutil.which("redis-server") is not None, "redis-server is not installed")
    redis = RedisServer(tmp_path).start()
    env = {"REDIS_URL": redis.url, "RENDEZVOUS_PEER_POLICY": "rules"}
    try:
        yield Pair(a=server_factory(env=env).start(), b=server_factory(env=env).start())
    finally:
        redis.stop()


@pytest.fixture
def agents() -> Iterator[Callable[..., WorkerAgent]]:
    made: list[WorkerAgent] = []

    def make(url: str, worker_id: str, *tags: str, **kwargs: object) -> WorkerAgent:
        now = timezone.now()
        Worker.objects.create(
            id=worker_id, first_seen=now, last_seen=now, tags="," + ",".join(tags) + ","
        )
        agent = WorkerAgent(url, worker_id, ip_echo_url="", **kwargs)  # type: ignore[arg-type]
        made.append(agent)
        agent.start()
        assert agent.wait_registered(10)
        return agent

    yield make
    for agent in made:
        agent.stop(5)


def admin(server: ServerProcess) -> AdminSession:
    if not User.objects.filter(username="ops").exists():
        User.objects.create_superuser("ops", "ops@example.com", "correct horse battery")
    return AdminSession(server.url).login("ops", "correct horse battery")


def test_a_pair_is_refused_until_a_rule_added_in_the_admin_allows_it(
    instances: Pair, agents: Callable[..., WorkerAgent]
) -> None:
    heard: queue.Queue[dict] = queue.Queue()
    ci = agents(
        instances.a.url,
        "ci-1",
        "ci",
        on_message=lambda agent, message: (
            heard.put(message) if message["type"] == "peer_joined" else None
        ),
    )
    gpu = agents(instances.b.url, "gpu-1", "gpu", on_peer=lambda agent, conn: None)
    with pytest.raises(PolicyDenied, match="no peer policy rule lets ci-1 reach gpu-1"):
        ci.connect("gpu-1", timeout=5)
    assert ci.list_peers() == []

    page = admin(instances.a).post_form(
        "/admin/registry/peerrule/add/",
        {"description": "CI may reach GPU boxes", "sources": "tag:ci",
         "destinations": "tag:gpu", "enabled": "on"},
    )  # fmt: skip
    assert "was added successfully" in page
    with ci.connect("gpu-1", timeout=5) as conn:  # at once: the next request reads the rules
        assert conn.peer_id == "gpu-1"
    assert [p["worker_id"] for p in ci.list_peers()] == ["gpu-1"]
    assert gpu.list_peers() == []  # one way only
    with pytest.raises(PolicyDenied):
        gpu.connect("ci-1", timeout=5)

    ci.subscribe_peers()
    time.sleep(0.5)
    agents(instances.b.url, "lab-1", "lab")  # on the other instance: ci-1 may not reach it
    agents(instances.b.url, "gpu-2", "gpu")
    joined = heard.get(timeout=5)
    assert joined["peer"]["worker_id"] == "gpu-2"
    assert heard.empty()
    rule = PeerRule.objects.get()
    record = PeerConnection.objects.filter(outcome="refused").order_by("requested_at").first()
    assert record is not None and record.failure_code == "POLICY_DENIED"
    allowed = PeerConnection.objects.exclude(outcome="refused").get()
    assert allowed.decided_by == f"rule #{rule.pk} (CI may reach GPU boxes)"


def test_switching_a_rule_off_ends_the_relayed_session_on_both_sides_at_once(
    instances: Pair, agents: Callable[..., WorkerAgent]
) -> None:
    rule = PeerRule.objects.create(sources="near", destinations="far")
    answered: queue.Queue[Connection] = queue.Queue()
    agents(instances.b.url, "far", peer_udp=False, on_peer=lambda agent, conn: answered.put(conn))
    near = agents(instances.a.url, "near", peer_udp=False)
    conn = near.connect("far", timeout=10)
    theirs = answered.get(timeout=10)
    assert conn.path_kind == "relay"
    stream = conn.open_stream()
    stream.sendall(b"x" * 100_000)
    assert len(theirs.accept_stream(timeout=5).recv_exactly(100_000, timeout=10)) == 100_000

    switched = time.monotonic()
    page = admin(instances.b).post_form(  # the other instance than the requester's
        f"/admin/registry/peerrule/{rule.pk}/change/",
        {"description": "", "sources": "near", "destinations": "far"},  # enabled: unchecked
    )
    assert "was changed successfully" in page
    wait_until(lambda: conn.closed and theirs.closed, timeout=4, what="both ends closed")
    assert time.monotonic() - switched < 3  # announced, not found by the 5 s check
    for end in (conn, theirs):
        assert "the peer policy no longer allows it" in (end.path.closed_reason or "")
    with pytest.raises(PeerError):
        stream.sendall(b"more")
    record = PeerConnection.objects.get(outcome="connected")
    wait_until(
        lambda: "peer policy" in PeerConnection.objects.get(pk=record.pk).close_reason,
        timeout=5,
        what="the record's close reason",
    )
