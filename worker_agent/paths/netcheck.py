"""The NAT report: this host's public UDP endpoint and how its NAT maps it, asked of two STUN
servers from one socket, with aioice's STUN client (RFC 5389 Binding).

Same endpoint from both servers: endpoint-independent mapping (a cone NAT, or none). Different
endpoints: endpoint-dependent ("symmetric"): a peer cannot reach the endpoint a server saw, and
only a relay (TURN or the service) connects it to another symmetric NAT. Fewer than two answers:
unknown. The service shows the report in the admin and the API; the path logic does not need it
(ICE tries what works), but operators do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aioice import stun

from .. import wire
from .portmap.manager import PortMapper

DEFAULT_TIMEOUT = 3.0
RETRANSMISSIONS = 4  # aioice retransmits after 0.5 s, doubling: at most ~3 s in all

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class ServerResult:
    server: Endpoint
    mapped: Endpoint | None = None
    elapsed: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class NatReport:
    mapped: Endpoint | None  # what the first server that answered saw
    mapping: wire.NatMapping
    results: tuple[ServerResult, ...]
    local: Endpoint | None = None
    # The router's port mapping of the report's socket: {"protocol", "external": (ip, port)}.
    port_mapping: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        mapped = self.port_mapping
        return {
            "mapped": _format(self.mapped) if self.mapped else None,
            "mapping": self.mapping.value,
            "local": _format(self.local) if self.local else None,
            "port_mapping": None
            if mapped is None
            else {"protocol": mapped["protocol"], "external": _format(mapped["external"])},
            "results": [
                {
                    "server": _format(r.server),
                    "mapped": _format(r.mapped) if r.mapped else None,
                    "elapsed": None if r.elapsed is None else round(r.elapsed, 4),
                    "error": r.error,
                }
                for r in self.results
            ],
        }


class StunClient(asyncio.DatagramProtocol):
    """Sends aioice transactions from one UDP socket and hands them their responses."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.transactions: dict[bytes, stun.Transaction] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return  # not STUN: nobody else talks to this socket
        transaction = self.transactions.get(message.transaction_id)
        if transaction is not None and message.message_class in (
            stun.Class.RESPONSE,
            stun.Class.ERROR,
        ):
            transaction.response_received(message, (addr[0], addr[1]))

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), addr)

    async def ask(self, server: Endpoint) -> ServerResult:
        started = time.monotonic()
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        try:
            address = await _resolve(server)
            transaction = stun.Transaction(request, address, self, RETRANSMISSIONS)
            self.transactions[request.transaction_id] = transaction
            response, _ = await transaction.run()
        except (stun.TransactionError, OSError) as exc:
            return ServerResult(server, error=str(exc) or type(exc).__name__)
        finally:
            self.transactions.pop(request.transaction_id, None)
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get(
            "MAPPED-ADDRESS"
        )
        if mapped is None:
            return ServerResult(server, error="answer without a mapped address")
        return ServerResult(server, (mapped[0], mapped[1]), time.monotonic() - started)


async def classify_nat(
    servers: Sequence[Endpoint],
    *,
    bind: Endpoint = ("0.0.0.0", 0),
    timeout: float = DEFAULT_TIMEOUT,
    port_mapper: PortMapper | None = None,
) -> NatReport:
    """Ask every server at once from one fresh socket and compare what they saw; with a port
    mapper, also ask the router to map that socket (then delete the mapping)."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(StunClient, local_addr=bind)
    try:
        asked = [asyncio.wait_for(client.ask(server), timeout) for server in servers]
        results: list[ServerResult] = []
        for server, outcome in zip(
            servers, await asyncio.gather(*asked, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException):
                results.append(ServerResult(server, error=f"no answer within {timeout:g}s"))
            else:
                results.append(outcome)
        local = transport.get_extra_info("sockname")
        port_mapping = await _port_mapping(port_mapper, local[1]) if port_mapper else None
    finally:
        transport.close()
    answers = [r.mapped for r in results if r.mapped is not None]
    if len(answers) < 2:
        mapping = wire.NatMapping.UNKNOWN
    elif all(answer == answers[0] for answer in answers):
        mapping = wire.NatMapping.ENDPOINT_INDEPENDENT
    else:
        mapping = wire.NatMapping.ENDPOINT_DEPENDENT
    return NatReport(
        mapped=answers[0] if answers else None,
        mapping=mapping,
        results=tuple(results),
        local=(local[0], local[1]) if local else None,
        port_mapping=port_mapping,
    )


async def _port_mapping(mapper: PortMapper, port: int) -> dict[str, Any] | None:
    """What the router maps for the report's socket, if it maps ports at all."""
    await mapper.probe()
    if mapper.local is None:
        return None
    mapping = await mapper.map(mapper.local, port)
    if mapping is None:
        return None
    await mapper.release(mapping)
    return {"protocol": mapping.protocol, "external": mapping.external}


async def _resolve(server: Endpoint) -> tuple[str, int]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        server[0], server[1], family=socket.AF_INET, type=socket.SOCK_DGRAM
    )
    return infos[0][4][0], infos[0][4][1]


def _format(endpoint: tuple[Any, ...]) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker_agent.paths.netcheck SERVER SERVER`: this host's mapping, as JSON."""
    parser = argparse.ArgumentParser(prog="python -m worker_agent.paths.netcheck")
    parser.add_argument("servers", nargs="+", help="STUN servers, host[:port]")
    parser.add_argument("--bind", default="0.0.0.0:0", help="local address:port to send from")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument(
        "--port-mapping", action="store_true", help="also ask the router for a port mapping"
    )
    args = parser.parse_args(argv)
    servers = [wire.parse_host_port(s) for s in args.servers]
    mapper = PortMapper() if args.port_mapping else None
    report = asyncio.run(
        classify_nat(
            servers,
            bind=wire.parse_host_port(args.bind, 0),
            timeout=args.timeout,
            port_mapper=mapper,
        )
    )
    json.dump(report.as_dict(), sys.stdout)
    sys.stdout.write("\n")
    return 0 if report.mapped is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
