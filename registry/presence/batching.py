"""Coalesce registry writes from many connections into one transaction per batch.

A registration costs a handful of statements and a thread hop whether it is written alone or
with 500 others, so under load each write is grouped with whatever else arrived while the
previous batch was being written. Nothing waits for a timer: a lone write goes out at once, and
batches grow only as fast as the load does (compare Headscale's mapper, which batches updates
for many nodes instead of sending one at a time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from channels.db import database_sync_to_async
from django.db import DataError, IntegrityError

log = logging.getLogger("registry.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_MAX_BATCH = 500


class Coalescer(Generic[Item, Result]):
    """`await submit(item)` from any coroutine; `flush(items)` runs in a database thread and
    returns one result per item, in order. A batch that fails on an item's data (an integrity
    or data error) is written again item by item, so one bad item cannot fail its neighbours;
    any other failure fails the whole batch at once."""

    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._flush = flush
        self.name = name
        self.max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): forget the old one's state
            self._loop, self._pending, self._draining, self._task = loop, [], False, None
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._write(batch)
        finally:
            self._draining = False

    async def _write(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await database_sync_to_async(self._flush)(items)
        except Exception as exc:
            if len(batch) == 1 or not isinstance(exc, (IntegrityError, DataError)):
                # Not about one item (the database is away, the instance was stopped): writing
                # each alone would only repeat the failure once per item.
                for _, future in batch:
                    _settle(future, exc)
                return
            log.warning(
                "%s: a batch of %d failed (%s); writing each alone", self.name, len(batch), exc
            )
            for one in batch:
                await self._write([one])
            return
        self.batches += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result)


def _settle(future: asyncio.Future[Result], outcome: Result | BaseException) -> None:
    if future.done():  # its consumer went away (cancelled) while the batch was written
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
