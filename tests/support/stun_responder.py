"""The project's STUN responder (registry/peering/stun/) in a thread of the test process, on
loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from registry.peering.stun import responder as server


@contextlib.contextmanager
def running_responder(
    listeners: list[tuple[str, int]] | None = None,
) -> Iterator[server.StunServer]:
    """The responder's asyncio server in a thread, on free loopback ports."""
    listeners = listeners or [("127.0.0.1", 0), ("127.0.0.1", 0)]
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}
    stop: asyncio.Event | None = None

    def on_started(running: server.StunServer) -> None:
        holder["server"] = running
        started.set()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await server.serve(listeners, stop, on_started=on_started)

    def target() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            holder["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    started.wait(10)
    if "server" not in holder:
        raise RuntimeError(f"responder did not start: {holder.get('error')}")
    try:
        yield holder["server"]
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
