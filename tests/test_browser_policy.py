"""The peer policy as an operator uses it: headless Chromium against a real daphne in `rules`
mode, with real agents. A rule created in the admin turns a refused connect into a connected one;
the pair check and the worker's page say who may reach whom; the peer-connections list shows the
refusal and the paths taken. With RENDEZVOUS_SCREENSHOTS=1 it renews the README's pictures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from registry.models import PeerRule, Worker
from tests.support.browser import headless_chromium
from tests.support.processes import ServerProcess, wait_until
from tests.test_browser_admin import browser_available, log_in, save_screenshot, stylesheet_applied
from worker_agent import PolicyDenied, WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["browser_available"]  # the fixture that skips without Chromium, used here too

PASSWORD = "correct horse battery staple"


@pytest.fixture
def operator() -> User:
    return User.objects.create_superuser("operator", "ops@example.com", PASSWORD)


@pytest.fixture
def rules_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(env={"RENDEZVOUS_PEER_POLICY": "rules"}).start()


@pytest.fixture
def fleet(rules_server: ServerProcess) -> Iterator[dict[str, WorkerAgent]]:
    """A CI runner and two GPU boxes, tagged by the operator beforehand; the second GPU box
    takes no UDP, so that a connection to it goes through the service relay."""
    now = timezone.now()
    tags = {"ci-runner-1": "ci", "gpu-box-1": "gpu", "gpu-box-2": "gpu"}
    for worker_id, tag in tags.items():
        Worker.objects.create(id=worker_id, first_seen=now, last_seen=now, tags=f",{tag},")
    agents = {
        worker_id: WorkerAgent(
            rules_server.url,
            worker_id,
            ip_echo_url="",
            peer_udp=worker_id != "gpu-box-2",
            on_peer=(lambda agent, conn: None) if tag == "gpu" else None,
        )
        for worker_id, tag in tags.items()
    }
    try:
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            assert agent.wait_registered(10)
        yield agents
    finally:
        for agent in agents.values():
            agent.stop(timeout=5)


def test_a_rule_added_in_the_admin_lets_the_ci_runner_reach_the_gpu_boxes(
    rules_server: ServerProcess,
    operator: User,
    fleet: dict[str, WorkerAgent],
    tmp_path: Path,
) -> None:
    ci = fleet["ci-runner-1"]
    with pytest.raises(PolicyDenied, match="no peer policy rule lets ci-runner-1 reach gpu-box-1"):
        ci.connect("gpu-box-1", timeout=5)

    with headless_chromium() as browser:
        page = log_in(browser, rules_server, "/admin/registry/peerrule/")
        assert stylesheet_applied(page)
        assert "RENDEZVOUS_PEER_POLICY is rules" in page.inner_text("#content")
        page.click(".object-tools a.addlink")
        page.wait_for_url("**/peerrule/add/")
        page.fill("#id_description", "CI may reach the GPU boxes")
        page.fill("#id_sources", "tag:ci")
        page.fill("#id_destinations", "tag:gpu nobody-yet")
        page.click("input[name=_save]")
        page.wait_for_selector(".messagelist .success")
        row = page.locator("#result_list tr", has_text="CI may reach the GPU boxes")
        assert row.count() == 1
        # A destination no worker has is allowed, and flagged.
        assert "nobody-yet" in row.inner_text() and "no worker" in row.inner_text()
        save_screenshot(page, "admin-peer-rules.png", tmp_path)

        # At once, on this instance: the next connect reads the rule.
        with ci.connect("gpu-box-1", timeout=10) as direct:
            # Relayed first, moved to the direct path once ICE finds it.
            wait_until(lambda: direct.path_kind in ("lan", "direct"), timeout=10, what="direct")
        with ci.connect("gpu-box-2", timeout=10) as relayed:
            assert relayed.path_kind == "relay"
        with pytest.raises(PolicyDenied):  # one way only
            fleet["gpu-box-1"].connect("ci-runner-1", timeout=5)

        page.goto(f"{rules_server.url}/admin/registry/peerrule/check/")
        page.fill("#id_source", "ci-runner-1")
        page.fill("#id_destination", "gpu-box-2")
        page.click("#rv-check-form input[type=submit]")
        result = page.inner_text("#rv-check-result")
        assert "Allowed" in result and "CI may reach the GPU boxes" in result
        page.fill("#id_source", "gpu-box-2")
        page.fill("#id_destination", "ci-runner-1")
        page.click("#rv-check-form input[type=submit]")
        assert "Denied" in page.inner_text("#rv-check-result")

        page.goto(f"{rules_server.url}/admin/registry/worker/gpu-box-1/change/")
        reached_by = page.locator(".field-reachable_from").inner_text()
        assert "ci-runner-1" in reached_by and "gpu-box-2" not in reached_by
        assert "no worker" in page.locator(".field-may_reach").inner_text()

        def listed() -> set[tuple[str, ...]]:
            """(requester, target, outcome, path kind, ended?) of each row of the list."""
            page.goto(f"{rules_server.url}/admin/registry/peerconnection/")
            rows = set()
            for row in page.locator("#result_list tbody tr").all():
                cells = [
                    row.locator(f".field-{name}").inner_text().strip()
                    for name in ("requester", "target", "outcome_display", "path_kind", "ended_at")
                ]
                rows.add((*cells[:4], "ended" if cells[4] != "-" else "open"))
            return rows

        expected = {
            ("ci-runner-1", "gpu-box-1", "refused by the peer policy", "-", "ended"),
            ("gpu-box-1", "ci-runner-1", "refused by the peer policy", "-", "ended"),
            ("ci-runner-1", "gpu-box-2", "connected", "relay", "ended"),
        }
        # Path changes and closes arrive after connect() and close() return: reload until shown.
        wait_until(
            lambda: (
                expected <= (rows := listed())
                and any(
                    r[:3] == ("ci-runner-1", "gpu-box-1", "connected")
                    and r[3] in ("lan", "direct")
                    and r[4] == "ended"
                    for r in rows
                )
            ),
            timeout=10,
            what="the connections listed with their path kinds, ended",
        )
        save_screenshot(page, "admin-peer-connections.png", tmp_path)

        page.click("#changelist-filter a:text-is('relay')")
        page.wait_for_url("**/peerconnection/?path_kind__exact=relay")
        assert page.locator("#result_list tbody tr").count() == 1
    assert PeerRule.objects.get().description == "CI may reach the GPU boxes"


def test_a_malformed_rule_is_refused_by_the_form_with_the_reason(
    rules_server: ServerProcess, operator: User
) -> None:
    with headless_chromium() as browser:
        page = log_in(browser, rules_server, "/admin/registry/peerrule/add/")
        page.fill("#id_sources", "tag:")
        page.fill("#id_destinations", "*")
        page.click("input[name=_save]")
        page.wait_for_selector(".errornote")
        assert "tag:" in page.locator(".field-sources .errorlist").inner_text()
    assert not PeerRule.objects.exists()
