"""One request to the gateway's port-mapping server over UDP, retransmitted until an answer
that matches it arrives or the deadline passes.

NAT-PMP (RFC 6886 section 3.1) and PCP (RFC 6887 section 8.1.1) both retransmit with a doubling
interval; both tell the client to accept answers only from the gateway it asked. Their own
schedules are slow (NAT-PMP 250 ms doubling to 64 s, PCP from 3 s) because they assume nothing
else is waiting; here an ICE attempt waits, so the interval starts at 100 ms and the caller's
deadline (a few hundred milliseconds) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

SERVER_PORT = 5351  # NAT-PMP and PCP servers both listen here (RFC 6886 3.1, RFC 6887 19.1)
FIRST_RETRANSMISSION = 0.1

T = TypeVar("T")


class PortMapError(Exception):
    """The gateway did not make, keep or delete a mapping; the message says why."""


class _Client(asyncio.DatagramProtocol):
    def __init__(self, gateway: str, parse: Callable[[bytes], T]) -> None:
        self._gateway = gateway
        self._parse = parse
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ignored: list[str] = []  # why answers were not taken, for the error

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.answer.done():
            return
        if (addr[0], addr[1]) != (self._gateway, SERVER_PORT):
            self.ignored.append(f"an answer from {addr[0]}:{addr[1]}, not the gateway")
            return
        try:
            self.answer.set_result(self._parse(data))
        except PortMapError as exc:
            self.ignored.append(str(exc))

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(PortMapError(f"the gateway is not listening: {exc}"))


async def exchange(
    gateway: str,
    request: bytes,
    parse: Callable[[bytes], T],
    *,
    timeout: float,
    source: str = "0.0.0.0",
) -> T:
    """Send `request` to the gateway's port 5351 until `parse` takes an answer; PortMapError
    when none does within `timeout` (naming what was ignored, a hostile gateway's garbage)."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        lambda: _Client(gateway, parse), local_addr=(source, 0)
    )
    try:
        deadline = loop.time() + timeout
        interval = FIRST_RETRANSMISSION
        while True:
            transport.sendto(request, (gateway, SERVER_PORT))
            wait = min(interval, deadline - loop.time())
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(client.answer), wait)
            interval *= 2
        why = f"; ignored: {client.ignored[-1]}" if client.ignored else ""
        raise PortMapError(f"no answer from {gateway}:{SERVER_PORT} within {timeout:g}s{why}")
    finally:
        transport.close()
        if client.answer.done() and not client.answer.cancelled():
            client.answer.exception()  # retrieved: never "exception was never retrieved"
