"""Coalesced registry writes: many connections, few transactions, no item lost or mixed up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
from channels.db import database_sync_to_async
from django.db import IntegrityError, OperationalError

from registry.core import protocol
from registry.models import Connection, Worker, WorkerStatus
from registry.presence import batching, sessions
from registry.presence.batching import Coalescer
from registry.presence.reports import Report
from registry.presence.runtime import InstanceRuntime


@pytest.mark.standalone
@pytest.mark.asyncio
async def test_concurrent_submissions_share_batches_and_each_gets_its_own_result() -> None:
    batches: list[list[int]] = []

    def double(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return [2 * n for n in items]

    coalescer: Coalescer[int, int] = Coalescer(double, name="test")
    results = await asyncio.gather(*(coalescer.submit(n) for n in range(200)))
    assert results == [2 * n for n in range(200)]
    assert len(batches) < 10  # the first goes alone, the rest wait together
    assert sorted(n for batch in batches for n in batch) == list(range(200))


@pytest.mark.standalone
@pytest.mark.asyncio
async def test_one_bad_item_fails_alone_and_its_batch_neighbours_succeed() -> None:
    def flush(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise IntegrityError("unlucky")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, name="test")
    results = await asyncio.gather(
        *(coalescer.submit(n) for n in range(30)), return_exceptions=True
    )
    assert isinstance(results[13], IntegrityError)
    assert [r for i, r in enumerate(results) if i != 13] == [n for n in range(30) if n != 13]


@pytest.mark.standalone
@pytest.mark.asyncio
async def test_a_failure_that_is_not_about_one_item_fails_the_batch_once() -> None:
    calls: list[int] = []

    def flush(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        raise OperationalError("database unreachable")

    coalescer: Coalescer[int, int] = Coalescer(flush, name="test")
    results = await asyncio.gather(
        *(coalescer.submit(n) for n in range(30)), return_exceptions=True
    )
    assert all(isinstance(r, OperationalError) for r in results)
    assert sum(calls) == 30  # no item was written again on its own


@pytest.mark.standalone
@pytest.mark.asyncio
async def test_batches_respect_the_maximum_size() -> None:
    sizes: list[int] = []

    def flush(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, name="test", max_batch=7)
    await asyncio.gather(*(coalescer.submit(n) for n in range(50)))
    assert max(sizes) <= 7 and sum(sizes) == 50


def request(worker_id: str, n: int = 0) -> sessions.RegistrationRequest:
    return sessions.RegistrationRequest(worker_id, f"chan-{worker_id}-{n}", "192.0.2.1", 40000 + n)


@pytest.mark.django_db
def test_a_batch_with_one_id_twice_registers_them_in_order(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    first, second, other = sessions.register_connections(
        [request("twice", 1), request("twice", 2), request("once")], instance_id=instance
    )
    assert second.superseded_connection_id == first.connection_id
    assert second.superseded_channel == "chan-twice-1"
    assert other.superseded_connection_id is None
    worker = Worker.objects.get(id="twice")
    assert worker.current_connection_id == second.connection_id
    assert worker.observed_port == 40002
    assert (
        Connection.objects.get(pk=first.connection_id).close_code == protocol.CloseCode.SUPERSEDED
    )


@pytest.mark.django_db
def test_a_batch_failing_in_a_later_round_writes_nothing(
    runtime: InstanceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: rounds committed one by one, so a batch retried item by item after a later
    # round failed left duplicate (superseded) connection rows. Fault injected in round two.
    instance = runtime.ensure_registered()
    real_round = sessions._register_round
    rounds: list[int] = []

    def failing_second_round(*args, **kwargs):
        rounds.append(1)
        if len(rounds) == 2:
            raise IntegrityError("injected")
        return real_round(*args, **kwargs)

    monkeypatch.setattr(sessions, "_register_round", failing_second_round)
    with pytest.raises(IntegrityError):
        sessions.register_connections(
            [request("a"), request("b"), request("a")], instance_id=instance
        )
    assert len(rounds) == 2
    assert not Connection.objects.exists()
    assert not Worker.objects.exists()


@pytest.mark.django_db
def test_a_batch_of_closes_ends_only_current_registrations(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    a, b_old = sessions.register_connections([request("a"), request("b", 1)], instance_id=instance)
    b_new = sessions.register_connection(
        worker_id="b", channel_name="x", instance_id=instance, observed_ip=None, observed_port=None
    )
    ended = sessions.close_connections(
        [
            sessions.CloseRequest(a.connection_id, 1000, "bye"),
            sessions.CloseRequest(b_old.connection_id, 4000, "late close of a superseded socket"),
        ]
    )
    assert ended == [True, False]
    assert Worker.objects.get(id="a").status == WorkerStatus.DISCONNECTED
    b = Worker.objects.get(id="b")
    assert (b.status, b.current_connection_id) == (WorkerStatus.CONNECTED, b_new.connection_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_many_consumers_registering_at_once_use_few_transactions(
    runtime: InstanceRuntime,
) -> None:
    await database_sync_to_async(runtime.ensure_registered)()
    results = await asyncio.gather(
        *(runtime.registrations.submit(request(f"w{n}")) for n in range(100))
    )
    assert len({r.connection_id for r in results}) == 100
    assert runtime.registrations.batches < 10
    connected = await database_sync_to_async(Worker.objects.connected().count)()
    assert connected == 100


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_many_connections_reporting_at_once_use_few_transactions(
    runtime: InstanceRuntime,
) -> None:
    await database_sync_to_async(runtime.ensure_registered)()
    registered = await asyncio.gather(
        *(runtime.registrations.submit(request(f"w{n}")) for n in range(100))
    )
    reports = [
        Report(r.connection_id or 0, public_ip=f"198.51.100.{n}") for n, r in enumerate(registered)
    ]
    reports += [Report(r.connection_id or 0, agent_info={"n": 1}) for r in registered]
    stored = await asyncio.gather(*(runtime.reports.submit(report) for report in reports))
    assert stored == [True] * 200
    assert runtime.reports.batches < 10
    addresses = await database_sync_to_async(
        lambda: dict(Worker.objects.values_list("id", "public_ip"))
    )()
    assert addresses == {f"w{n}": f"198.51.100.{n}" for n in range(100)}


@pytest.mark.standalone
@pytest.mark.asyncio
@pytest.mark.parametrize("yields", [True, False])
async def test_reports_wait_for_the_registrations_queued_meanwhile(yields: bool) -> None:
    """The one database thread takes batches in the order they come: a batch of reports handed
    over while a registration batch is written went before the next registrations, and every
    handshake in those waited for it. Reports yield: the registrations queued meanwhile go
    first."""
    order: list[str] = []
    gate = threading.Event()

    def register(items: Sequence[int]) -> list[int]:
        if not order:
            gate.wait(5)  # the first registration batch is being written
        order.append(f"registrations {list(items)}")
        return list(items)

    def report(items: Sequence[int]) -> list[int]:
        order.append(f"reports {list(items)}")
        return list(items)

    registrations: Coalescer[int, int] = Coalescer(register, name="registrations")
    reports: Coalescer[int, int] = Coalescer(
        report, name="reports", yields_to=registrations if yields else None
    )
    first = asyncio.ensure_future(registrations.submit(1))
    await asyncio.sleep(0.05)
    reported = asyncio.ensure_future(reports.submit(10))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(registrations.submit(2))
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, second, reported), 5) == [1, 2, 10]
    if yields:
        assert order == ["registrations [1]", "registrations [2]", "reports [10]"]
        assert reports.yielded == 1
    else:  # what it was: the report batch in between
        assert order == ["registrations [1]", "reports [10]", "registrations [2]"]


@pytest.mark.standalone
@pytest.mark.asyncio
async def test_reports_are_not_held_back_longer_than_max_yield(monkeypatch) -> None:
    """A steady stream of registrations (never idle) delays a batch of reports by MAX_YIELD,
    not for ever."""
    monkeypatch.setattr(batching, "MAX_YIELD", 0.2)

    class Streaming(Coalescer[int, int]):
        busy = True  # type: ignore[assignment]

        async def idle(self) -> None:
            await asyncio.Event().wait()

    reports: Coalescer[int, int] = Coalescer(
        list, name="reports", yields_to=Streaming(list, name="registrations")
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reports.submit(10), 5) == 10
    assert reports.yielded == 1 and 0.2 <= loop.time() - started < 1.0
