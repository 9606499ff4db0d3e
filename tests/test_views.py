"""The JSON views: shapes, filters, pagination, and JSON errors (never HTML)."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from registry.presence import reports, sessions
from registry.presence.runtime import InstanceRuntime

pytestmark = pytest.mark.django_db


@pytest.fixture
def registry_with_workers(runtime: InstanceRuntime) -> dict[str, int]:
    instance = runtime.ensure_registered()
    ids = {}
    for n, worker_id in enumerate(["c-1", "c-2", "d-1"]):
        registration = sessions.register_connection(
            worker_id=worker_id,
            channel_name=f"chan{n}",
            instance_id=instance,
            observed_ip=f"192.0.2.{n + 1}",
            observed_port=40000 + n,
        )
        ids[worker_id] = registration.connection_id
    reports.report_public_ip(connection_id=ids["c-2"], ip="198.51.100.7")
    sessions.close_connection(connection_id=ids["d-1"], code=1000, reason="bye")
    return ids


def test_root_keeps_the_proof_of_concepts_message_key(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert "/ws/register/" in response.json()["message"]


def test_debug_list_workers_has_exactly_the_proof_of_concepts_shape(
    client: Client, registry_with_workers: dict[str, int]
) -> None:
    assert client.get("/debug/list_workers").json() == {
        "connected_workers_count": 2,
        "workers": {
            "c-1": {
                "public_ip": "192.0.2.1",
                "public_port": 40000,
                "connected": True,
                "raw_state": 1,
            },
            "c-2": {
                "public_ip": "198.51.100.7",
                "public_port": 40001,
                "connected": True,
                "raw_state": 1,
            },
        },
    }


def test_worker_list_filters_by_status_in_a_stable_order(
    client: Client, registry_with_workers: dict[str, int]
) -> None:
    body = client.get("/api/workers/", {"status": "connected"}).json()
    assert body["count"] == 2
    assert [w["id"] for w in body["results"]] == ["c-1", "c-2"]
    assert body["results"][1]["public_ip"] == "198.51.100.7"
    offline = client.get("/api/workers/", {"status": "disconnected"}).json()
    assert [w["id"] for w in offline["results"]] == ["d-1"]


def test_worker_list_paginates(client: Client, registry_with_workers: dict[str, int]) -> None:
    first = client.get("/api/workers/", {"page_size": 2}).json()
    assert [w["id"] for w in first["results"]] == ["c-1", "c-2"]
    assert (first["count"], first["num_pages"], first["previous"]) == (3, 2, None)
    second = client.get(first["next"]).json()
    assert [w["id"] for w in second["results"]] == ["d-1"]
    assert second["next"] is None


@pytest.mark.parametrize(
    "query",
    [
        {"status": "sleeping"},
        {"page": "0"},
        {"page": "x"},
        {"page_size": "-1"},
        {"page": "\u00b2"},  # str.isdigit() takes it, int() does not (issue 19)
        {"page_size": "\u0661\u0662"},  # Arabic-Indic 12: digits, not ASCII ones
    ],
)
def test_worker_list_bad_query_is_a_json_400(client: Client, query: dict[str, str]) -> None:
    response = client.get("/api/workers/", query)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "error" in response.json()


def test_worker_list_past_the_last_page_is_a_json_404(client: Client) -> None:
    response = client.get("/api/workers/", {"page": "5"})
    assert response.status_code == 404 and "error" in response.json()


def test_worker_detail_has_recent_connections(
    client: Client, registry_with_workers: dict[str, int]
) -> None:
    body = client.get("/api/workers/d-1/").json()
    assert body["status"] == "disconnected"
    [connection] = body["recent_connections"]
    assert (connection["close_code"], connection["close_reason"]) == (1000, "bye")


def test_unknown_worker_is_a_json_404(client: Client) -> None:
    response = client.get("/api/workers/nobody/")
    assert response.status_code == 404
    assert response.json()["error"] == "no worker 'nobody'"


def test_unknown_path_is_a_json_404(client: Client) -> None:
    response = client.get("/no/such/thing")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "path", ["/", "/debug/list_workers", "/api/workers/", "/healthz", "/readyz"]
)
def test_wrong_method_is_a_json_405(path: str) -> None:
    # CSRF checks on, as for a real client (the test client turns them off by default).
    response = Client(enforce_csrf_checks=True).post(path)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["status"] == 405


def test_a_csrf_failure_is_json() -> None:
    response = Client(enforce_csrf_checks=True).post("/admin/login/", {"username": "x"})
    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"


def test_healthz_answers_while_the_process_lives(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db(transaction=True)  # database_sync_to_async closes connections
def test_readyz_checks_database_and_channel_layer(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "channel_layer": "ok"}


@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_when_the_channel_layer_is_unreachable(client: Client) -> None:
    unreachable = {
        "default": {
            "BACKEND": "registry.ops.layers.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
        }
    }
    with override_settings(CHANNEL_LAYERS=unreachable):
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["channel_layer"].startswith("error")
