"""The peer policy for operators: rules in the admin (refused when malformed, flagged when they
name what the registry does not know), the pair check in the admin and on the command line,
who can reach a worker on its page, the banner of allow-all, the recorded peer connections in
the admin and as JSON, and the worker page's labels."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.core.management import call_command
from django.test import Client, override_settings
from django.utils import timezone

from registry.models import PeerConnection, PeerRule, Worker
from registry.peering import reach
from registry.peering.records import purge_peer_connections
from registry.peering.rules import load
from registry.presence import sessions
from registry.presence.runtime import InstanceRuntime

pytestmark = pytest.mark.django_db


@pytest.fixture
def rules_mode(settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "PEER_POLICY": "rules"}


@pytest.fixture
def fleet(runtime: InstanceRuntime) -> None:
    """ci-1 and ci-2 tagged ci, gpu-1 tagged gpu, laptop-3 untagged; gpu-1 connected."""
    now = timezone.now()
    for worker_id, tags in (
        ("ci-1", ",ci,"),
        ("ci-2", ",ci,"),
        ("gpu-1", ",gpu,"),
        ("laptop-3", ""),
    ):
        Worker.objects.create(id=worker_id, first_seen=now, last_seen=now, tags=tags)
    instance = runtime.ensure_registered()
    sessions.register_connection(
        worker_id="gpu-1",
        channel_name="chan",
        instance_id=instance,
        observed_ip="192.0.2.7",
        observed_port=40000,
    )
    Worker.objects.filter(id="gpu-1").update(
        agent_info={"agent": "rendezvous-worker-agent", "hostname": "gpu-box", "pid": 7},
        nat_mapping="endpoint-independent",
    )


def add_rule_form(client: Client, **fields: str) -> str:
    data = {"description": "", "sources": "", "destinations": "", "enabled": "on", **fields}
    return client.post("/admin/registry/peerrule/add/", data, follow=True).content.decode()


def test_a_malformed_rule_is_refused_by_the_form_with_what_is_wrong(admin_client: Client) -> None:
    page = add_rule_form(admin_client, sources="ci runner/1", destinations="")
    assert "is neither a worker id" in page
    assert "name at least one worker id" in page
    assert not PeerRule.objects.exists()


def test_a_rule_naming_unknown_tags_or_ids_is_saved_and_flagged(
    admin_client: Client, fleet: None
) -> None:
    page = add_rule_form(admin_client, sources="tag:ci", destinations="tag:gpux nobody-9")
    assert PeerRule.objects.count() == 1
    assert "no worker carries tag:gpux" in page and "no worker nobody-9 in the registry" in page
    listing = admin_client.get("/admin/registry/peerrule/").content.decode()
    assert "no worker carries tag:gpux" in listing
    assert "RENDEZVOUS_PEER_POLICY is allow-all" in listing  # and not enforced: say so


def test_the_pair_check_names_the_rule_or_says_why_not(
    admin_client: Client, fleet: None, rules_mode: None
) -> None:
    rule = PeerRule.objects.create(
        sources="tag:ci", destinations="tag:gpu", description="CI may reach GPU boxes"
    )
    allowed = admin_client.get(
        "/admin/registry/peerrule/check/", {"source": "ci-1", "destination": "gpu-1"}
    ).content.decode()
    assert "Allowed" in allowed and f"rule #{rule.pk} (CI may reach GPU boxes)" in allowed
    denied = admin_client.get(
        "/admin/registry/peerrule/check/", {"source": "gpu-1", "destination": "ci-1"}
    ).content.decode()
    assert "Denied" in denied and "no peer policy rule lets gpu-1 reach ci-1" in denied
    unknown = admin_client.get(
        "/admin/registry/peerrule/check/", {"source": "ghost", "destination": "gpu-1"}
    ).content.decode()
    assert "No worker ghost in the registry" in unknown
    bad = admin_client.get(
        "/admin/registry/peerrule/check/", {"source": "a/b", "destination": "gpu-1"}
    ).content.decode()
    assert "not a worker id" in bad


def test_the_command_line_check_answers_and_exits_accordingly(
    fleet: None, rules_mode: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = PeerRule.objects.create(sources="tag:ci", destinations="gpu-1")
    call_command("peer_policy", "check", "ci-2", "gpu-1")
    assert capsys.readouterr().out.strip() == f"allowed: ci-2 may reach gpu-1 (rule #{rule.pk})"
    with pytest.raises(SystemExit) as exited:
        call_command("peer_policy", "check", "ci-1", "ci-2")
    assert exited.value.code == 1
    assert capsys.readouterr().out.strip() == "denied: no peer policy rule lets ci-1 reach ci-2"
    call_command("peer_policy", "show")
    assert f"#{rule.pk}: tag:ci -> gpu-1" in capsys.readouterr().out


def test_under_allow_all_the_checks_also_say_what_the_rules_would(
    admin_client: Client, fleet: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = PeerRule.objects.create(sources="tag:ci", destinations="tag:gpu")
    page = admin_client.get(
        "/admin/registry/peerrule/check/", {"source": "gpu-1", "destination": "ci-1"}
    ).content.decode()
    assert "RENDEZVOUS_PEER_POLICY is allow-all" in page  # allowed now, by the mode
    assert "Once RENDEZVOUS_PEER_POLICY is <strong>rules</strong>" in page
    assert "no peer policy rule lets gpu-1 reach ci-1" in page  # and denied by the rules
    call_command("peer_policy", "check", "gpu-1", "ci-1")
    assert "allow-all" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        call_command("peer_policy", "check", "--rules", "gpu-1", "ci-1")
    assert exited.value.code == 1
    call_command("peer_policy", "check", "--rules", "ci-1", "gpu-1")
    assert capsys.readouterr().out.strip().endswith(f"(rule #{rule.pk})")
    call_command("peer_policy", "show", "--rules")
    assert f"#{rule.pk}: tag:ci -> tag:gpu" in capsys.readouterr().out


def test_a_worker_page_lists_who_it_may_reach_and_who_may_reach_it(
    admin_client: Client, fleet: None, rules_mode: None
) -> None:
    PeerRule.objects.create(sources="tag:ci", destinations="tag:gpu")
    PeerRule.objects.create(sources="laptop-3", destinations="*", enabled=False)
    page = admin_client.get("/admin/registry/worker/gpu-1/change/").content.decode()
    reach = page[page.index("May reach (peer policy)") :]
    reached = page[page.index("May be reached by (peer policy)") :]
    assert "no worker (no enabled rule allows it)" in reach[:600]
    assert ">ci-1<" in reached[:800] and ">ci-2<" in reached[:800]
    assert "laptop-3" not in reached[:800]  # its rule is switched off


def test_the_worker_page_reads_as_a_page_to_view(admin_client: Client, fleet: None) -> None:
    page = admin_client.get("/admin/registry/worker/gpu-1/change/").content.decode()
    assert "<h1>View worker</h1>" in page and "Change worker" not in page
    for label in ("Public IP", "NAT mapping", "Observed IP", "UDP endpoint"):
        assert f">{label}" in page or f"{label}:" in page
    assert "Public ip" not in page and "Nat mapping" not in page
    pre = page[page.index('<pre class="rv-agent-info"') :]
    assert "&quot;hostname&quot;: &quot;gpu-box&quot;,\n" in pre  # one key per line


def test_the_worker_list_warns_while_anyone_may_reach_anyone(
    admin_client: Client, fleet: None, settings
) -> None:
    assert "Peer policy: allow-all." in admin_client.get("/admin/registry/worker/").content.decode()
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "PEER_POLICY": "rules"}
    assert (
        "Peer policy: allow-all."
        not in admin_client.get("/admin/registry/worker/").content.decode()
    )


@pytest.fixture
def records() -> None:
    now = timezone.now()
    PeerConnection.objects.create(
        id="a" * 32, requester_id="ci-1", target_id="gpu-1", requested_at=now,
        outcome="connected", path_kind="direct", setup_ms=40, decided_by="rule #1",
    )  # fmt: skip
    PeerConnection.objects.create(
        id="b" * 32, requester_id="laptop-3", target_id="gpu-1",
        requested_at=now - timedelta(hours=2), outcome="refused", failure_code="POLICY_DENIED",
        detail="no peer policy rule lets laptop-3 reach gpu-1", closed_at=now,
    )  # fmt: skip
    PeerConnection.objects.create(
        id="c" * 32, requester_id="ci-2", target_id="ci-1", requested_at=now,
        outcome="refused", failure_code="PEER_REFUSED", closed_at=now,
    )  # fmt: skip


def rows(response: Any) -> str:
    """The result table of an admin list page (not its filters)."""
    page = response.content.decode()
    start = page.index('id="result_list"')
    return page[start : page.index("</table>", start)]


def test_the_peer_connections_list_filters_and_says_who_refused(
    admin_client: Client, records: None
) -> None:
    page = admin_client.get("/admin/registry/peerconnection/").content.decode()
    assert "refused by the peer policy" in page and "refused by ci-1" in page
    for_gpu = rows(admin_client.get("/admin/registry/peerconnection/", {"worker": "gpu-1"}))
    assert "laptop-3" in for_gpu and "ci-2" not in for_gpu
    direct = rows(
        admin_client.get("/admin/registry/peerconnection/", {"path_kind__exact": "direct"})
    )
    assert "ci-1" in direct and "laptop-3" not in direct


def test_the_peer_connections_api_pages_and_filters(client: Client, records: None) -> None:
    everything = client.get("/api/peer-connections/").json()
    assert everything["count"] == 3
    assert everything["results"][-1]["id"] == "b" * 32  # newest first
    refused = client.get("/api/peer-connections/", {"outcome": "refused", "worker": "gpu-1"}).json()
    assert [r["detail"] for r in refused["results"]] == [
        "no peer policy rule lets laptop-3 reach gpu-1"
    ]
    since = (timezone.now() - timedelta(hours=1)).isoformat()
    recent = client.get("/api/peer-connections/", {"since": since, "path_kind": "direct"}).json()
    assert [(r["requester_id"], r["setup_ms"]) for r in recent["results"]] == [("ci-1", 40)]
    for query, message in (
        ({"outcome": "maybe"}, "'outcome' must be one of"),
        ({"path_kind": "carrier-pigeon"}, "'path_kind' must be one of"),
        ({"since": "yesterday"}, "'since' must be an ISO 8601 time"),
        ({"worker": "a/b"}, "'worker' must be a worker id"),
    ):
        response = client.get("/api/peer-connections/", query)
        assert response.status_code == 400 and message in response.json()["error"]


def test_the_peer_connections_api_needs_a_token_in_secured_mode(
    client: Client, records: None, settings
) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "SECURITY_MODE": "secured"}
    response = client.get("/api/peer-connections/")
    assert response.status_code == 401 and json.loads(response.content)["status"] == 401


def test_ended_records_are_kept_for_the_retention_only(records: None) -> None:
    later = timezone.now() + timedelta(days=31)
    assert purge_peer_connections(older_than=timedelta(days=30), now=later) == 2
    assert list(PeerConnection.objects.values_list("id", flat=True)) == ["a" * 32]  # still open


@pytest.mark.parametrize("days", [0.0, -1.0, float("inf"), float("nan")])
def test_a_retention_that_would_delete_everything_or_break_housekeeping_is_refused(
    days: float,
) -> None:
    with override_settings(
        RENDEZVOUS={**settings.RENDEZVOUS, "PEER_CONNECTION_RETENTION_DAYS": days}
    ):
        errors = {problem.id for problem in run_checks() if problem.id.startswith("rendezvous.E")}
    assert errors == {"rendezvous.E008"}


def test_who_may_reach_whom_is_one_query_each_way_and_agrees_with_the_decisions(
    fleet: None, rules_mode: None, django_assert_max_num_queries
) -> None:
    PeerRule.objects.create(sources="tag:ci laptop-3", destinations="tag:gpu ci-2")
    PeerRule.objects.create(sources="gpu-1", destinations="*")
    rules = load()
    everyone = [reach.subject(w) for w in ("ci-1", "ci-2", "gpu-1", "laptop-3")]
    for me in everyone:
        others = [o for o in everyone if o != me]
        with django_assert_max_num_queries(3):  # the rules, the page of ids, the count
            ids, count = reach.worker_reach(me.worker_id, me.tags, outward=True, limit=2)
        expected = [o.worker_id for o in others if rules.allows(me, o)]
        assert (ids, count) == (expected[:2], len(expected))
        ids, count = reach.worker_reach(me.worker_id, me.tags, outward=False, limit=50)
        assert ids == [o.worker_id for o in others if rules.allows(o, me)]


def test_the_rule_list_finds_every_rows_warnings_in_a_few_queries(
    admin_client: Client, fleet: None, django_assert_max_num_queries
) -> None:
    for n in range(40):
        PeerRule.objects.create(sources=f"tag:ci ghost-{n}", destinations=f"tag:gone-{n} gpu-1")
    with django_assert_max_num_queries(12):  # session, user, count, page, two for the warnings
        page = admin_client.get("/admin/registry/peerrule/").content.decode()
    assert page.count("no worker ghost-") == 40
    assert "no worker carries tag:gone-39" in page and "no worker gpu-1" not in page
