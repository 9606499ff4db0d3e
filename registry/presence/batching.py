"""Coalesce registry writes from many connections into one transaction per batch.

A registration costs a handful of statements and a thread hop whether it is written alone or
with 500 others, so under load each write is grouped with whatever else arrived while the
previous batch was being written. Nothing waits for a timer: a lone write goes out at once, and
batches grow only as fast as the load does (compare Headscale's mapper, which batches updates
for many nodes instead of sending one at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from channels.db import database_sync_to_async
from django.db import DataError, IntegrityError

log = logging.getLogger("registry.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_MAX_BATCH = 500
# How long a coalescer that yields to another (`yields_to`) holds a batch back at most, so that
# a steady stream of the other's writes cannot starve it.
MAX_YIELD = 0.5


class Coalescer(Generic[Item, Result]):
    """`await submit(item)` from any coroutine; `flush(items)` runs in a database thread and
    returns one result per item, in order. A batch that fails on an item's data (an integrity
    or data error) is written again item by item, so one bad item cannot fail its neighbours;
    any other failure fails the whole batch at once.

    Every coalescer's batches run in the one database thread (`database_sync_to_async`), in the
    order they are handed to it. With `yields_to`, this one hands a batch over only once the
    other has nothing pending or being written (at most MAX_YIELD later): a handshake waits for
    its registration, while what connections report can wait a little, and a registration
    batch queued behind a batch of reports waited for all of it."""

    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        yields_to: Coalescer[Any, Any] | None = None,
    ) -> None:
        self._flush = flush
        self.name = name
        self.max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set while nothing is pending or written
        self._yields_to = yields_to
        self.batches = 0
        self.items = 0
        self.yielded = 0  # batches held back for `yields_to`

    @property
    def busy(self) -> bool:
        """Whether a batch is pending or being written (on the running loop)."""
        return self._draining and self._loop is asyncio.get_running_loop()

    async def idle(self) -> None:
        """Wait until nothing is pending or being written."""
        if not self.busy:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        await self._idle.wait()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): forget the old one's state
            self._loop, self._pending, self._draining, self._task = loop, [], False, None
            self._idle = None
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if not self._draining:
            self._draining = True
            if self._idle is not None:
                self._idle.clear()
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._yield()
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._write(batch)
        finally:
            self._draining = False
            if self._idle is not None:
                self._idle.set()

    async def _yield(self) -> None:
        other = self._yields_to
        if other is None or not other.busy:
            return
        self.yielded += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(other.idle(), MAX_YIELD)

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
