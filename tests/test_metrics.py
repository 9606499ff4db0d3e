"""Prometheus metrics: they move when a worker connects, talks, misbehaves and leaves, and
`/metrics` serves them in the text format (with the registry's numbers read at scrape time)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from registry.presence import instances
from registry.presence.runtime import InstanceRuntime
from registry.routing import websocket_urlpatterns
from tests.support.processes import ServerProcess, wait_until

application = URLRouter(websocket_urlpatterns)


def sample(name: str, **labels: str) -> float:
    """This process's value of one series (0 when it has never been touched)."""
    labels = {"instance_name": settings.RENDEZVOUS["INSTANCE_NAME"], **labels}
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def connected(worker_id: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, f"/ws/register/{worker_id}")
    comm.scope["client"] = ("203.0.113.5", 40000)
    accepted, _ = await comm.connect()
    assert accepted
    assert (await comm.receive_json_from())["type"] == "welcome"
    return comm


def scrape(client: Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """`/metrics` parsed: metric sample name -> labels -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
class TestConsumerMetrics:
    async def test_a_connection_raises_the_gauge_and_counts_a_registration(self) -> None:
        held, registrations = (
            sample("rendezvous_connected_workers"),
            sample("rendezvous_registrations_total"),
        )
        comm = await connected("m1")
        assert sample("rendezvous_connected_workers") == held + 1
        assert sample("rendezvous_registrations_total") == registrations + 1
        await comm.disconnect()

    async def test_a_close_lowers_the_gauge_and_is_counted_by_its_code(self) -> None:
        comm = await connected("m1")
        held = sample("rendezvous_connected_workers")
        closes = sample("rendezvous_closes_total", code="1000")
        await comm.disconnect(code=1000)
        assert sample("rendezvous_connected_workers") == held - 1
        assert sample("rendezvous_closes_total", code="1000") == closes + 1

    async def test_a_superseded_connection_is_counted_as_4000(self) -> None:
        old = await connected("m1")
        closes = sample("rendezvous_closes_total", code="4000")
        new = await connected("m1")
        assert (await old.receive_json_from())["code"] == 4000
        await old.receive_output()  # the close itself
        await old.disconnect(code=4000)
        assert sample("rendezvous_closes_total", code="4000") == closes + 1
        await new.disconnect()

    async def test_a_bad_frame_counts_a_protocol_error_by_code_and_a_message_each_way(
        self,
    ) -> None:
        comm = await connected("m1")
        errors = sample("rendezvous_protocol_errors_total", code="INVALID_JSON")
        received = sample("rendezvous_messages_received_total")
        sent = sample("rendezvous_messages_sent_total")
        await comm.send_to(text_data="not json")
        assert (await comm.receive_json_from())["code"] == "INVALID_JSON"
        assert sample("rendezvous_protocol_errors_total", code="INVALID_JSON") == errors + 1
        assert sample("rendezvous_messages_received_total") == received + 1
        assert sample("rendezvous_messages_sent_total") == sent + 1
        await comm.disconnect()

    async def test_the_time_between_two_heartbeats_is_observed_once(self) -> None:
        comm = await connected("m1")
        observed = sample("rendezvous_heartbeat_interval_seconds_count")
        for _ in range(2):
            await comm.send_to(text_data=json.dumps({"type": "heartbeat"}))
            assert (await comm.receive_json_from())["type"] == "heartbeat_ack"
        assert sample("rendezvous_heartbeat_interval_seconds_count") == observed + 1
        await comm.disconnect()

    async def test_the_scrape_counts_the_registry_from_the_database(self) -> None:
        comm = await connected("m1")
        samples = await database_sync_to_async(scrape)(Client())
        assert samples["rendezvous_registry_up"][()] == 1
        assert samples["rendezvous_registry_workers"][(("status", "connected"),)] == 1
        assert samples["rendezvous_registry_workers"][(("status", "disconnected"),)] == 0
        name = settings.RENDEZVOUS["INSTANCE_NAME"]
        held = samples["rendezvous_connected_workers"][(("instance_name", name),)]
        assert held == sample("rendezvous_connected_workers")
        await comm.disconnect()


@pytest.mark.django_db
def test_metrics_are_prometheus_text(client: Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE rendezvous_registrations_total counter" in response.content


@pytest.mark.django_db
def test_each_running_instance_shows_its_heartbeat_age(
    client: Client, runtime: InstanceRuntime
) -> None:
    instance_id = runtime.ensure_registered()
    instances.heartbeat_instance(instance_id=instance_id)
    ages = scrape(client)["rendezvous_registry_instance_heartbeat_age_seconds"]
    key = (("instance_id", instance_id), ("instance_name", runtime.name))
    assert 0 <= ages[key] < 5


def test_metrics_refuse_other_methods_with_a_json_405() -> None:
    response = Client(enforce_csrf_checks=True).post("/metrics")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["status"] == 405


def scrape_url(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_in_multiprocess_mode_any_process_serves_every_processs_series(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    first, second = server_factory(env=env).start(), server_factory(env=env).start()
    first_name = first.env["RENDEZVOUS_INSTANCE_NAME"]

    async def hold_a_worker_on_the_first() -> None:
        async with websockets.connect(f"{first.ws_url}/ws/register/mp-1") as ws:
            await ws.recv()  # welcome
            held = await asyncio.to_thread(scrape_url, second.url)
            assert held["rendezvous_connected_workers"][(("instance_name", first_name),)] == 1
            assert held["rendezvous_registrations_total"][(("instance_name", first_name),)] == 1

    asyncio.run(hold_a_worker_on_the_first())
    wait_until(
        lambda: (
            scrape_url(second.url)["rendezvous_connected_workers"][(("instance_name", first_name),)]
            == 0
        ),
        timeout=10,
        what="the first instance's gauge back at 0",
    )
