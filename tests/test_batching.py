"""Coalesced registry writes: many connections, few transactions, no item lost or mixed up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from channels.db import database_sync_to_async

from registry import protocol, services
from registry.batching import Coalescer
from registry.models import Connection, Worker, WorkerStatus
from registry.runtime import InstanceRuntime


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
            raise ValueError("unlucky")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(flush, name="test")
    results = await asyncio.gather(
        *(coalescer.submit(n) for n in range(30)), return_exceptions=True
    )
    assert isinstance(results[13], ValueError)
    assert [r for i, r in enumerate(results) if i != 13] == [n for n in range(30) if n != 13]


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


def request(worker_id: str, n: int = 0) -> services.RegistrationRequest:
    return services.RegistrationRequest(worker_id, f"chan-{worker_id}-{n}", "192.0.2.1", 40000 + n)


@pytest.mark.django_db
def test_a_batch_with_one_id_twice_registers_them_in_order(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    first, second, other = services.register_connections(
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
def test_a_batch_of_closes_ends_only_current_registrations(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    a, b_old = services.register_connections([request("a"), request("b", 1)], instance_id=instance)
    b_new = services.register_connection(
        worker_id="b", channel_name="x", instance_id=instance, observed_ip=None, observed_port=None
    )
    ended = services.close_connections(
        [
            services.CloseRequest(a.connection_id, 1000, "bye"),
            services.CloseRequest(b_old.connection_id, 4000, "late close of a superseded socket"),
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
