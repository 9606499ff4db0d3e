"""`manage.py workers`: the registry as a table or as the API's JSON, with the API's filters."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from registry.presence import reports, sessions
from registry.presence.runtime import InstanceRuntime

pytestmark = pytest.mark.django_db


@pytest.fixture
def registry_with_workers(runtime: InstanceRuntime) -> str:
    instance = runtime.ensure_registered()
    ids = {}
    for n, worker_id in enumerate(["c-1", "c-2", "d-1"]):
        ids[worker_id] = sessions.register_connection(
            worker_id=worker_id,
            channel_name=f"chan{n}",
            instance_id=instance,
            observed_ip="2001:db8::5" if worker_id == "c-2" else f"192.0.2.{n + 1}",
            observed_port=40000 + n,
        ).connection_id
    reports.report_public_ip(connection_id=ids["c-1"], ip="198.51.100.7")
    sessions.close_connection(connection_id=ids["d-1"], code=1000, reason="bye")
    return instance


def workers(*args: str) -> str:
    out = StringIO()
    call_command("workers", *args, stdout=out)
    return out.getvalue()


def test_the_table_shows_one_row_per_worker_with_address_public_ip_and_instance(
    registry_with_workers: str,
) -> None:
    header, c1, c2, d1, footer = workers().splitlines()
    assert header.split() == [
        "ID",
        "STATUS",
        "OBSERVED",
        "ADDRESS",
        "PUBLIC",
        "IP",
        "LAST",
        "SEEN",
        "INSTANCE",
    ]
    assert c1.split()[:4] == ["c-1", "connected", "192.0.2.1:40000", "198.51.100.7"]
    assert c1.split()[-1] == registry_with_workers
    assert c2.split()[:4] == ["c-2", "connected", "[2001:db8::5]:40001", "-"]
    assert d1.split()[:2] == ["d-1", "disconnected"]
    assert d1.split()[-1] == "-"  # no current connection, so no instance
    assert footer == "3 workers; page 1 of 1 (100 a page)"


def test_the_status_filter_and_pages_work_as_in_the_api(registry_with_workers: str) -> None:
    rows = workers("--status", "connected", "--page-size", "1", "--page", "2").splitlines()
    assert [row.split()[0] for row in rows[1:-1]] == ["c-2"]
    assert rows[-1] == "2 connected workers; page 2 of 2 (1 a page)"


def test_json_is_the_apis_shape_for_the_same_filters(
    client: Client, registry_with_workers: str
) -> None:
    printed = json.loads(workers("--json", "--status", "disconnected"))
    api = client.get("/api/workers/?status=disconnected").json()
    assert printed == {key: api[key] for key in printed}
    assert set(api) - set(printed) == {"next", "previous"}
    assert [w["id"] for w in printed["results"]] == ["d-1"]


def test_an_empty_registry_says_so() -> None:
    assert workers() == "0 workers; page 1 of 1 (100 a page)\n"


@pytest.mark.parametrize(
    "args",
    [("--status", "lost"), ("--page", "0"), ("--page-size", "x"), ("--page", "9")],
)
def test_bad_filters_are_refused(registry_with_workers: str, args: tuple[str, ...]) -> None:
    with pytest.raises(CommandError):
        workers(*args)
