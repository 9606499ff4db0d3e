"""Two agents' QUIC sessions in one process, on one peer loop, their paths joined by an
in-memory route a test can tamper with: real aioquic handshakes and streams without a service
(tests/test_quic.py, tests/test_peerapi_unit.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from worker_agent import wire
from worker_agent.connection import PeerConnection
from worker_agent.paths.loop import LoopThread
from worker_agent.paths.path import PeerPath
from worker_agent.secure import identity
from worker_agent.secure.quic import QuicSession

INTRO = "ab" * 16
ALICE, BOB, MALLORY = identity.create("alice"), identity.create("bob"), identity.create("mallory")


class Wire:
    """A route that hands each datagram to the other path on the loop; `tamper` may drop or
    replace it."""

    kind = wire.PathKind.LAN
    remote = ("192.0.2.9", 4000)

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.peer: PeerPath | None = None
        self.tamper: Any = None
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sent += 1
        if self.tamper is not None:
            data = self.tamper(data)
            if data is None:
                return
        assert self.peer is not None
        self.loop.loop.call_soon(self.peer.deliver, data, self.kind)

    def send_many(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.send(data)


@dataclass
class Pair:
    loop: LoopThread
    client: PeerConnection
    server: PeerConnection
    to_server: Wire
    to_client: Wire


def pair(
    loop: LoopThread,
    *,
    client_is: identity.WorkerIdentity = ALICE,
    server_is: identity.WorkerIdentity = BOB,
    client_pins: identity.WorkerIdentity = BOB,
    server_pins: identity.WorkerIdentity = ALICE,
) -> tuple[Pair, QuicSession, QuicSession]:
    paths = [
        PeerPath(peer_id=peer, introduction_id=INTRO, loop=loop, on_close=lambda reason: None)
        for peer in ("bob", "alice")
    ]
    wires = [Wire(loop), Wire(loop)]
    wires[0].peer, wires[1].peer = paths[1], paths[0]

    async def start() -> tuple[QuicSession, QuicSession]:
        paths[0].add_route(wires[0])
        paths[1].add_route(wires[1])
        client = QuicSession(
            path=paths[0], own=client_is, peer_certificate=client_pins.certificate, client=True
        )
        server = QuicSession(
            path=paths[1], own=server_is, peer_certificate=server_pins.certificate, client=False
        )
        server.start()
        client.start()
        return client, server

    client, server = loop.call(start(), 5)
    connections = Pair(
        loop,
        PeerConnection(session=client, loop=loop, path=paths[0]),
        PeerConnection(session=server, loop=loop, path=paths[1]),
        wires[0],
        wires[1],
    )
    return connections, client, server


def established(loop: LoopThread, session: QuicSession, timeout: float = 5) -> None:
    async def wait() -> None:
        await asyncio.wait_for(asyncio.shield(session.handshake), timeout)

    loop.call(wait(), timeout + 1)
