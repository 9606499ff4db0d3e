"""A Channels WebSocket consumer that is lean and fair between connections.

Channels' loop wraps every message in a task and an `asyncio.wait` (three turns of the event loop
before a frame is handled, and their CPU for every frame), and its dispatch hops to the database
thread for every event. This base takes one frame a turn from daphne's queue itself, yields to
every other connection while it has more waiting (round robin between sockets), and dispatches
without the hop: one worker at its relay budget cannot keep another's frames waiting behind its
own (docs/performance.md, relay fairness).
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer


class FairConsumer(AsyncWebsocketConsumer):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' loop, without the task and the asyncio.wait it wraps every message in (three
        turns of the event loop before a frame is handled, and their CPU for every frame), and
        fair between connections: each takes one frame a turn (round robin). A connection with
        more frames waiting in its queue (daphne's, one per socket) lets every other connection
        take its turn before its next frame, so one at its relay budget cannot keep another's
        frames waiting behind its own (docs/performance.md, relay fairness)."""
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        queue = getattr(receive, "__self__", None)  # daphne's receive is its queue's `get`
        waiting = queue.qsize if hasattr(queue, "qsize") else lambda: 1
        try:
            while True:
                await self.dispatch(await receive())
                if waiting():
                    await asyncio.sleep(0)  # the other connections' turns first
        except StopConsumer:
            pass

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its per-event `aclose_old_connections`, a hop to the
        database thread for every frame and every disconnect (docs/performance.md). This
        consumer reaches the database only through database_sync_to_async and the coalescers,
        which close stale connections in the thread that owns them."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        # Channels' version ends with the same database-thread hop as its dispatch (no groups
        # to leave here either).
        await self.disconnect(message["code"])
        raise StopConsumer()
