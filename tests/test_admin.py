"""The registry in the Django admin: lists, search, filters, read-only facts, live disconnect."""

from __future__ import annotations

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient, Client

from registry import services
from registry.models import Connection, Worker
from registry.routing import websocket_urlpatterns
from registry.runtime import InstanceRuntime


@pytest.fixture
def workers(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    for n, worker_id in enumerate(["alpha", "beta"]):
        services.register_connection(
            worker_id=worker_id,
            channel_name=f"chan{n}",
            instance_id=instance,
            observed_ip=f"192.0.2.{n + 10}",
            observed_port=40000,
        )
    services.close_connection(
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
