"""The admin as an operator sees it: headless Chromium against a real daphne, with live workers
registered by real agents. With RENDEZVOUS_SCREENSHOTS=1 it renews the screenshots the README
shows (docs/screenshots/)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.contrib.auth.models import User

from tests.support.backing import require_or_skip
from tests.support.browser import headless_chromium, missing_browser
from tests.support.processes import REPO, ServerProcess, wait_until
from worker_agent import Backoff, WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)

SCREENSHOTS = REPO / "docs" / "screenshots"
PASSWORD = "correct horse battery staple"
LIVE_WORKERS = ("gpu-node-01", "gpu-node-02", "edge-cam-7")

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture(autouse=True)
def browser_available() -> None:
    reason = missing_browser()
    require_or_skip(reason is None, reason or "")


@pytest.fixture
def operator() -> User:
    return User.objects.create_superuser("operator", "ops@example.com", PASSWORD)


@pytest.fixture
def live_agents(server: ServerProcess) -> Iterator[dict[str, WorkerAgent]]:
    """Real agents in threads, registered before the test looks; stopped at teardown."""
    agents = {
        worker_id: WorkerAgent(
            server.url, worker_id, ip_echo_url="", backoff=Backoff(base=5.0, cap=10.0)
        )
        for worker_id in LIVE_WORKERS
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


def log_in(browser: Browser, server: ServerProcess, next_path: str) -> Page:
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.goto(f"{server.url}/admin/login/?next={next_path}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{server.url}{next_path}")
    return page


def save_screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Into the test's tmp dir; into docs/screenshots/ (the README's pictures) only on request
    (RENDEZVOUS_SCREENSHOTS=1), so that an ordinary test run leaves the checkout clean."""
    page.screenshot(path=tmp_path / name, full_page=True)
    assert (tmp_path / name).stat().st_size > 10_000  # a real page, not an empty one
    if os.environ.get("RENDEZVOUS_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, SCREENSHOTS / name)


def stylesheet_applied(page: Page) -> bool:
    """Bare HTML has a white, unstyled header; the admin's stylesheet gives #header a colour."""
    colour = page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor")
    return colour not in ("rgba(0, 0, 0, 0)", "transparent")


def test_operator_logs_in_and_sees_live_workers_and_a_workers_page(
    server: ServerProcess,
    operator: User,
    live_agents: dict[str, WorkerAgent],
    tmp_path: Path,
) -> None:
    with headless_chromium() as browser:
        page = log_in(browser, server, "/admin/registry/worker/")
        assert stylesheet_applied(page)
        assert page.inner_text("#rv-connected .rv-number").strip() == str(len(LIVE_WORKERS))
        for worker_id in LIVE_WORKERS:
            row = page.locator("#result_list tr", has_text=worker_id)
            assert row.locator(".rv-badge-connected").inner_text() == "connected"
            assert row.locator(".field-last_seen_ago").inner_text() == "just now"
        save_screenshot(page, "admin-workers.png", tmp_path)

        page.click(f"#result_list a:text-is('{LIVE_WORKERS[0]}')")
        page.wait_for_url(f"**/admin/registry/worker/{LIVE_WORKERS[0]}/change/")
        assert page.locator(".rv-badge-connected").count() == 1
        assert page.locator(".inline-group tbody tr.has_original").count() == 1
        assert page.get_by_text("all 1 connection(s)").is_visible()
        save_screenshot(page, "admin-worker.png", tmp_path)


def test_disconnect_from_a_workers_page_closes_its_agent_with_4001(
    server: ServerProcess,
    operator: User,
    live_agents: dict[str, WorkerAgent],
) -> None:
    target = LIVE_WORKERS[1]
    with headless_chromium() as browser:
        page = log_in(browser, server, f"/admin/registry/worker/{target}/change/")
        page.click("button.rv-disconnect")
        page.wait_for_selector(".messagelist .success")
        assert page.inner_text(".messagelist .success") == f"Disconnect sent to worker {target}."
        wait_until(
            lambda: live_agents[target].status()["last_close_code"] == 4001,
            timeout=10,
            what="close code 4001",
        )
        page.reload()
        # The agent may already be back (4001 allows reconnecting, after a backoff): the page
        # shows the ended connection in the history either way.
        history = page.locator(".inline-group").inner_text()
        assert "4001" in history and "disconnected by an operator" in history
    assert all(
        live_agents[other].status()["last_close_code"] is None
        for other in LIVE_WORKERS
        if other != target
    )


def test_disconnect_action_on_the_worker_list_closes_the_selected_agent_with_4001(
    server: ServerProcess,
    operator: User,
    live_agents: dict[str, WorkerAgent],
) -> None:
    target = LIVE_WORKERS[2]
    with headless_chromium() as browser:
        page = log_in(browser, server, "/admin/registry/worker/")
        page.check(f"input.action-select[value='{target}']")
        page.select_option("select[name=action]", "disconnect_selected")
        page.click("button[name=index]")
        page.wait_for_selector(".messagelist .success")
        assert "Disconnect sent to 1 worker(s)." in page.inner_text(".messagelist")
    wait_until(
        lambda: live_agents[target].status()["last_close_code"] == 4001,
        timeout=10,
        what="close code 4001",
    )
