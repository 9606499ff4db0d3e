"""The registry in the Django admin: lists, search, filters, read-only facts, live disconnect,
an overview, a bounded history, a fixed query count, and assets a real server serves."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from datetime import timedelta

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.utils import timezone

from registry.models import Connection, Worker
from registry.presence import sessions
from registry.presence.runtime import InstanceRuntime
from registry.presence.selectors import RECENT_CONNECTIONS
from registry.routing import websocket_urlpatterns
from tests.support.processes import ServerProcess


@pytest.fixture
def workers(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    for n, worker_id in enumerate(["alpha", "beta"]):
        sessions.register_connection(
            worker_id=worker_id,
            channel_name=f"chan{n}",
            instance_id=instance,
            observed_ip=f"192.0.2.{n + 10}",
            observed_port=40000,
        )
    sessions.close_connection(
        connection_id=Worker.objects.get(id="beta").current_connection_id, code=1000, reason="bye"
    )


@pytest.mark.django_db
def test_worker_list_shows_status_addresses_and_last_seen(
    admin_client: Client, workers: None
) -> None:
    page = admin_client.get("/admin/registry/worker/").content.decode()
    for text in ["alpha", "beta", "192.0.2.10", "connected", "disconnected", "Last seen"]:
        assert text in page


@pytest.mark.django_db
def test_worker_search_by_address(admin_client: Client, workers: None) -> None:
    page = admin_client.get("/admin/registry/worker/", {"q": "192.0.2.11"}).content.decode()
    assert "beta" in page and ">alpha<" not in page


@pytest.mark.django_db
def test_worker_filter_by_status(admin_client: Client, workers: None) -> None:
    page = admin_client.get(
        "/admin/registry/worker/", {"status__exact": "connected"}
    ).content.decode()
    assert ">alpha<" in page and ">beta<" not in page


@pytest.mark.django_db
def test_observed_fields_are_read_only_and_history_is_inline(
    admin_client: Client, workers: None
) -> None:
    page = admin_client.get("/admin/registry/worker/beta/change/").content.decode()
    assert 'name="observed_ip"' not in page
    assert 'name="status"' not in page
    assert "192.0.2.11" in page
    assert "bye" in page  # the inline connection history


@pytest.mark.django_db
def test_posting_observed_fields_changes_nothing(admin_client: Client, workers: None) -> None:
    admin_client.post(
        "/admin/registry/worker/alpha/change/",
        {"observed_ip": "10.9.9.9", "status": "disconnected"},
    )
    worker = Worker.objects.get(id="alpha")
    assert (worker.observed_ip, worker.status) == ("192.0.2.10", "connected")


@pytest.mark.django_db
def test_connection_list_links_to_workers(admin_client: Client, workers: None) -> None:
    page = admin_client.get("/admin/registry/connection/").content.decode()
    assert "alpha" in page and "bye" in page
    assert Connection.objects.count() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_disconnect_action_closes_the_live_socket() -> None:
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/register/live-one")
    comm.scope["client"] = ("192.0.2.50", 41000)
    assert (await comm.connect())[0]
    await comm.receive_json_from()
    admin = await User.objects.acreate(username="op", is_staff=True, is_superuser=True)
    client = AsyncClient()
    await client.aforce_login(admin)
    response = await client.post(
        "/admin/registry/worker/",
        {"action": "disconnect_selected", "_selected_action": ["live-one"]},
        follow=True,
    )
    assert "Disconnect sent to 1 worker" in response.content.decode()
    closing = await comm.receive_json_from()
    assert closing["code"] == 4001
    assert await comm.receive_output() == {"type": "websocket.close", "code": 4001}
    await comm.disconnect(code=4001)
    assert (await Worker.objects.aget(id="live-one")).status == "disconnected"


@pytest.fixture
def fleet(runtime: InstanceRuntime) -> Callable[[int], None]:
    """`n` workers, each with a superseded and a current connection; every third disconnected."""
    instance = runtime.ensure_registered()

    def make(n: int) -> None:
        requests = [
            sessions.RegistrationRequest(f"w{i:03}", f"chan{i}", f"192.0.2.{i % 250}", 40000 + i)
            for i in range(n)
        ]
        sessions.register_connections(requests, instance_id=instance)
        sessions.register_connections(requests, instance_id=instance)
        ids = Worker.objects.order_by("id").values_list("current_connection_id", flat=True)
        sessions.close_connections(
            [sessions.CloseRequest(connection_id, 1000, "bye") for connection_id in ids[::3]]
        )

    return make


def page_with_constant_queries(
    client: Client,
    url: str,
    fleet: Callable[[int], None],
    assert_max_queries: Callable[..., object],
    budget: int = 8,
) -> str:
    """Load `url` with 5 workers, then with 50: a few queries, and the same number both times
    (no N+1). Returns the larger page."""
    fleet(5)
    with assert_max_queries(budget) as few:
        assert client.get(url).status_code == 200
    fleet(50)
    with assert_max_queries(len(few)) as many:  # type: ignore[arg-type]
        page = client.get(url).content.decode()
    assert len(many) == len(few)  # type: ignore[arg-type]
    return page


@pytest.mark.django_db
def test_worker_list_costs_the_same_few_queries_for_5_or_50_workers(
    admin_client: Client,
    fleet: Callable[[int], None],
    django_assert_max_num_queries: Callable[..., object],
) -> None:
    # One more than the connection list: the overview's tile of peer connections by path.
    page = page_with_constant_queries(
        admin_client, "/admin/registry/worker/", fleet, django_assert_max_num_queries, budget=9
    )
    assert page.count('class="rv-badge') == 50


@pytest.mark.django_db
def test_connection_list_costs_the_same_few_queries_for_10_or_100_connections(
    admin_client: Client,
    fleet: Callable[[int], None],
    django_assert_max_num_queries: Callable[..., object],
) -> None:
    page = page_with_constant_queries(
        admin_client, "/admin/registry/connection/", fleet, django_assert_max_num_queries
    )
    assert page.count("/admin/registry/worker/w0") == 100


@pytest.mark.django_db
def test_overview_counts_connected_recent_and_per_instance(
    admin_client: Client, fleet: Callable[[int], None], runtime: InstanceRuntime
) -> None:
    fleet(9)  # w000, w003, w006 disconnected
    Worker.objects.filter(id="w000").update(last_seen=timezone.now() - timedelta(hours=2))
    response = admin_client.get("/admin/registry/worker/")
    overview = response.context["overview"]
    assert (overview.total, overview.connected, overview.seen_recently) == (9, 6, 8)
    [share] = overview.by_instance
    assert (share.instance_id, share.connected) == (runtime.instance_id, 6)
    page = response.content.decode()
    assert "connected now" in page and "seen in the last hour" in page
    assert f"?instance={runtime.instance_id}" in page


@pytest.mark.django_db
def test_overview_links_filter_the_list(admin_client: Client, fleet: Callable[[int], None]) -> None:
    fleet(6)
    Worker.objects.filter(id="w001").update(last_seen=timezone.now() - timedelta(hours=2))
    recent = admin_client.get("/admin/registry/worker/", {"seen": "1h"}).content.decode()
    assert ">w002<" in recent and ">w001<" not in recent
    instance = Worker.objects.get(id="w001").current_connection.instance_id
    held = admin_client.get("/admin/registry/worker/", {"instance": instance}).content.decode()
    assert ">w001<" in held and ">w000<" not in held  # w000 is disconnected


@pytest.mark.django_db
def test_status_is_a_badge_and_last_seen_is_relative(admin_client: Client, workers: None) -> None:
    Worker.objects.filter(id="beta").update(last_seen=timezone.now() - timedelta(minutes=5))
    page = admin_client.get("/admin/registry/worker/").content.decode()
    assert re.search(r'class="rv-badge rv-badge-connected"[^>]*>connected<', page)
    assert re.search(r'class="rv-badge rv-badge-disconnected"[^>]*>disconnected<', page)
    assert "5\xa0minutes ago" in page


@pytest.mark.django_db
def test_connected_workers_come_first_most_recent_first(
    admin_client: Client, fleet: Callable[[int], None]
) -> None:
    fleet(4)  # w000 and w003 disconnected
    Worker.objects.filter(id="w002").update(last_seen=timezone.now() + timedelta(seconds=5))
    page = admin_client.get("/admin/registry/worker/").content.decode()
    order = re.findall(r">(w00\d)</a></th>", page)
    assert order[:2] == ["w002", "w001"] and set(order[2:]) == {"w000", "w003"}


@pytest.mark.django_db
def test_worker_links_to_its_connections_and_a_connection_to_its_worker(
    admin_client: Client, workers: None
) -> None:
    listing = admin_client.get("/admin/registry/worker/").content.decode()
    assert "/admin/registry/connection/?worker__id__exact=beta" in listing
    history = admin_client.get(
        "/admin/registry/connection/", {"worker__id__exact": "beta"}
    ).content.decode()
    assert 'href="/admin/registry/worker/beta/change/"' in history
    assert "/admin/registry/worker/alpha/change/" not in history
    connection = Connection.objects.get(worker_id="alpha")
    detail = admin_client.get(f"/admin/registry/connection/{connection.pk}/change/")
    assert 'href="/admin/registry/worker/alpha/change/"' in detail.content.decode()


@pytest.mark.django_db
def test_inline_history_shows_only_the_latest_connections_and_links_to_all(
    admin_client: Client, runtime: InstanceRuntime
) -> None:
    instance = runtime.ensure_registered()
    start = timezone.now() - timedelta(hours=1)
    for n in range(RECENT_CONNECTIONS + 5):
        sessions.register_connection(
            worker_id="flapper",
            channel_name=f"chan{n}",
            instance_id=instance,
            observed_ip="192.0.2.7",
            observed_port=n + 1,
            now=start + timedelta(minutes=n),
        )
    page = admin_client.get("/admin/registry/worker/flapper/change/").content.decode()
    assert page.count('class="form-row has_original') == RECENT_CONNECTIONS
    assert f"all {RECENT_CONNECTIONS + 5} connection(s)" in page
    assert "/admin/registry/connection/?worker__id__exact=flapper" in page


def test_a_real_server_serves_the_admin_stylesheet(server: ServerProcess) -> None:
    with urllib.request.urlopen(f"{server.url}/static/admin/css/base.css", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/css")
        assert b"--primary" in response.read()


@pytest.mark.django_db
def test_worker_page_offers_disconnect_only_while_connected_and_no_save(
    admin_client: Client, workers: None
) -> None:
    live = admin_client.get("/admin/registry/worker/alpha/change/").content.decode()
    assert 'action="/admin/registry/worker/alpha/disconnect/"' in live
    assert 'name="_save"' not in live and 'name="_continue"' not in live
    gone = admin_client.get("/admin/registry/worker/beta/change/").content.decode()
    assert "/disconnect/" not in gone


@pytest.mark.django_db
def test_disconnect_button_on_a_disconnected_worker_warns_and_changes_nothing(
    admin_client: Client, workers: None
) -> None:
    assert admin_client.get("/admin/registry/worker/beta/disconnect/").status_code == 405
    response = admin_client.post("/admin/registry/worker/beta/disconnect/", follow=True)
    assert response.redirect_chain[-1][0] == "/admin/registry/worker/beta/change/"
    assert "Worker beta was not connected." in response.content.decode()
    assert Connection.objects.get(worker_id="beta").close_code == 1000


@pytest.mark.django_db
def test_nat_mapping_shows_in_the_list_the_overview_and_the_worker_page(
    admin_client: Client, workers: None
) -> None:
    Worker.objects.filter(id="alpha").update(
        nat_mapping="endpoint-dependent", udp_ip="198.51.100.9", udp_port=50123
    )
    page = admin_client.get("/admin/registry/worker/").content.decode()
    tile = page[page.index('id="rv-by-nat"') :]
    assert "endpoint-dependent" in tile[: tile.index("</div>\n  </div>")]
    filtered = admin_client.get(
        "/admin/registry/worker/", {"nat_mapping__exact": "endpoint-dependent"}
    ).content.decode()
    assert ">alpha<" in filtered and ">beta<" not in filtered
    detail = admin_client.get("/admin/registry/worker/alpha/change/").content.decode()
    assert "198.51.100.9:50123" in detail
    assert "Port mapping (router)" in detail and "198.20.0.1:41000 (pcp)" not in detail
    Worker.objects.filter(id="alpha").update(
        port_mapping_protocol="pcp", port_mapping_ip="198.20.0.1", port_mapping_port=41000
    )
    detail = admin_client.get("/admin/registry/worker/alpha/change/").content.decode()
    assert "198.20.0.1:41000 (pcp)" in detail
