"""The service's STUN responder (RFC 5389 Binding over UDP), so nobody needs a third party's.

A worker learns its public UDP endpoint by sending a Binding request from the socket it will
punch from; the answer's XOR-MAPPED-ADDRESS is where the NAT mapped that socket. Listening on two
ports (or two addresses) lets a worker ask twice and see whether the mapping changes with the
destination, the check Tailscale's netcheck makes. The messages themselves are messages.py.

No Django here: the management command `runstun`, `python -m registry.peering.stun` and the
network namespace tests all run the same code. A datagram that is not a well-formed Binding
request is dropped and counted by reason; nothing a sender puts in a datagram can stop the
responder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from registry.peering.stun.messages import (
    SOFTWARE,
    DropReason,
    MalformedDatagram,
    build_binding_error,
    build_binding_success,
    parse_binding_request,
    unknown_required_attributes,
)

logger = logging.getLogger("registry.stun")

DEFAULT_PORT = 3478
# Every address, IPv4 and IPv6: one dual-stack socket (IPv4 clients arrive as ::ffff:a.b.c.d and
# are answered as IPv4), or IPv4 alone where the host has no IPv6.
ALL_ADDRESSES = "::"


@dataclass
class StunStats:
    """What the responder did, for logs and tests. Only the event loop's thread writes here."""

    answered: int = 0
    rejected: int = 0  # answered with 420 Unknown Attribute
    send_errors: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))

    def drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        dropped = {reason.value: self.dropped.get(reason.value, 0) for reason in DropReason}
        return {
            "answered": self.answered,
            "rejected": self.rejected,
            "send_errors": self.send_errors,
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in self.snapshot()["dropped"].items() if v)
        return (
            f"answered={self.answered} rejected={self.rejected} send_errors={self.send_errors} "
            f"dropped={sum(self.dropped.values())}" + (f" ({dropped})" if dropped else "")
        )


def handle_datagram(
    data: bytes, client: tuple[Any, ...], stats: StunStats, *, software: str | None = SOFTWARE
) -> bytes | None:
    """The reply to one datagram from `client`, or None to drop it. Counts either way; never
    raises, so a hostile datagram cannot take the listener down."""
    try:
        request = parse_binding_request(data)
        unknown = unknown_required_attributes(request)
        if unknown:
            stats.rejected += 1
            return build_binding_error(
                request.transaction_id,
                420,
                "Unknown Attribute",
                unknown_attributes=unknown,
                software=software,
            )
        response = build_binding_success(
            request.transaction_id, (client[0], client[1]), software=software
        )
    except MalformedDatagram as exc:
        stats.drop(exc.reason)
        logger.debug("dropped a datagram from %s: %s", _format_endpoint(client), exc)
        return None
    except Exception:
        stats.drop(DropReason.INTERNAL_ERROR)
        logger.exception("STUN responder failed on a datagram from %s", _format_endpoint(client))
        return None
    stats.answered += 1
    return response


class StunResponderProtocol(asyncio.DatagramProtocol):
    """One UDP listener: each datagram in, at most one reply out, to where it came from."""

    def __init__(self, stats: StunStats, *, software: str | None = SOFTWARE) -> None:
        self.stats = stats
        self.software = software
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = handle_datagram(data, addr, self.stats, software=self.software)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply (the client went away): counted, not fatal.
        self.stats.send_errors += 1
        logger.debug("STUN responder send error: %s", exc)


class StunServer:
    """The responder on one or more UDP listeners that share one set of counters."""

    def __init__(
        self, listeners: Sequence[tuple[str, int]], *, software: str | None = SOFTWARE
    ) -> None:
        if not listeners:
            raise ValueError("a STUN server needs at least one listener")
        self.listeners = list(listeners)
        self.software = software
        self.stats = StunStats()
        self.addresses: list[tuple[str, int]] = []
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; returns the bound (host, port)s, port 0 resolved."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.listeners:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: StunResponderProtocol(self.stats, software=self.software),
                    sock=_bound_socket(host, port),
                )
                self._transports.append(transport)
                bound = transport.get_extra_info("sockname")
                self.addresses.append((bound[0], bound[1]))
        except BaseException:
            self.close()
            raise
        return list(self.addresses)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()

    def describe(self) -> str:
        return " and ".join(f"udp {_format_endpoint(a)}" for a in self.addresses)


def _bound_socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to `host`: `::` is dual stack (IPV6_V6ONLY off, whatever the system's
    default), and falls back to 0.0.0.0 where IPv6 is unavailable."""
    if host == ALL_ADDRESSES:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            logger.warning("no IPv6 on this host: the STUN responder answers over IPv4 only")
            return _bound_socket("0.0.0.0", port)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family=0, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0] if infos else (family, 0, 0, "", (host, port))
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def listeners_from(
    host: str, port: int, second_port: int | None = None, second_host: str | None = None
) -> list[tuple[str, int]]:
    """One listener, or two when a second port or address is given (the second differs)."""
    listeners = [(host, port)]
    if second_port is not None or second_host is not None:
        second = (second_host or host, port if second_port is None else second_port)
        if second == listeners[0]:
            raise ValueError(f"the second listener {second} is the first one again")
        listeners.append(second)
    return listeners


async def serve(
    listeners: Sequence[tuple[str, int]],
    stop: asyncio.Event,
    *,
    software: str | None = SOFTWARE,
    on_started: Callable[[StunServer], None] | None = None,
) -> StunStats:
    """Answer until `stop` is set; logs one line at start and the counters at the end."""
    server = StunServer(listeners, software=software)
    await server.start()
    logger.info("STUN responder on %s", server.describe())
    if on_started is not None:
        on_started(server)
    try:
        await stop.wait()
    finally:
        server.close()
        logger.info("STUN responder stopped: %s", server.stats.summary())
    return server.stats


def run(
    listeners: Sequence[tuple[str, int]],
    *,
    software: str | None = SOFTWARE,
    on_started: Callable[[StunServer], None] | None = None,
) -> StunStats:
    """Blocking: serve until SIGTERM or SIGINT (as Docker, systemd and Ctrl-C stop it)."""

    async def main() -> StunStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        return await serve(listeners, stop, software=software, on_started=on_started)

    return asyncio.run(main())


def _format_endpoint(endpoint: tuple[Any, ...]) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m registry.peering.stun`: the responder without Django (tests, network
    namespaces)."""
    parser = argparse.ArgumentParser(prog="python -m registry.peering.stun", description=__doc__)
    parser.add_argument("--host", default=ALL_ADDRESSES)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--second-port", type=int, default=None)
    parser.add_argument("--second-host", default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout,
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        listeners = listeners_from(args.host, args.port, args.second_port, args.second_host)
    except ValueError as exc:
        parser.error(str(exc))
    run(listeners)
    return 0
