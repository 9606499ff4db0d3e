"""Hard-NAT ("birthday") probing: a direct path between an endpoint-dependent ("symmetric") NAT
and an endpoint-independent one that filters by address and port, which ICE cannot punch.

Only when the service says so in the introduction (`hard_nat`: `easy` or `hard`; it decides from
the two workers' NAT reports, and only with RENDEZVOUS_HARD_NAT_PROBING=on). The easy side opens
one socket, learns its public endpoint from STUN (the same for every destination) and sends it
through the service (`ice_candidates`, policy `probe`, its ufrag the attempt's token). The hard
side opens SOCKETS sockets and sends one datagram from each to that endpoint: its NAT maps each
to a new random public port (the easy NAT drops them, having sent nothing there yet), and it
answers with its public address. The easy side then sends PROBES probes to random ports of that
address, in ROUNDS: a probe that hits one of the hard side's mapped ports passes its NAT (it is
the reply the mapping expects) and reaches that socket, which acknowledges it; the easy NAT
passes the acknowledgement (it answers the probe). With 256 sockets and 256 probes against some
64,500 ports about 64% of attempts hit. At most SOCKETS + PROBES * ROUNDS datagrams and TIMEOUT
seconds; on a miss the path stays on what ICE found (or the relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

from aioice import stun

from .. import wire

logger = logging.getLogger("worker_agent.p2p")

SOCKETS = 256
PROBES = 256
ROUNDS = 2
ROUND_GAP = 0.3  # seconds between two rounds of probes
TIMEOUT = 3.0
# QUIC never sends a datagram whose first byte is 0 (its fixed bit, 0x40, is always set).
PROBE = b"\x00rdv-probe "
ACK = b"\x00rdv-ack "
LOWEST_PORT = 1024

Endpoint = tuple[str, int]
Signal = Callable[[str], bool]
Deliver = Callable[[bytes], None]


class _Socket(asyncio.DatagramProtocol):
    """One UDP socket: STUN answers to `stun_answer`, everything else to `received`."""

    def __init__(self, received: Callable[[_Socket, bytes, Endpoint], None]) -> None:
        self.received = received
        self.transport: asyncio.DatagramTransport | None = None
        self.stun_waiting: dict[bytes, asyncio.Future[Endpoint]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.stun_waiting and not data.startswith((PROBE, ACK)) and self._stun_answer(data):
            return
        self.received(self, data, (addr[0], addr[1]))

    def _stun_answer(self, data: bytes) -> bool:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return False
        future = self.stun_waiting.pop(message.transaction_id, None)
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        if future is None or not mapped:
            return False
        if not future.done():
            future.set_result((mapped[0], mapped[1]))
        return True

    async def public_endpoint(self, server: Endpoint, timeout: float = 1.0) -> Endpoint:
        assert self.transport is not None
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        future: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
        self.stun_waiting[request.transaction_id] = future
        for _ in range(3):
            self.transport.sendto(bytes(request), server)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(future), timeout / 3)
        raise TimeoutError("the STUN server did not answer")


class ProbedRoute:
    """The pair of sockets a probe found, as a route of the path (`kind` direct)."""

    kind = wire.PathKind.DIRECT

    def __init__(self, socket: _Socket, remote: Endpoint) -> None:
        self.socket = socket
        self.remote: Endpoint | None = remote

    def send(self, data: bytes) -> None:
        if self.socket.transport is not None and self.remote is not None:
            self.socket.transport.sendto(data, self.remote)

    def send_many(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.send(data)

    def close(self) -> None:
        if self.socket.transport is not None:
            self.socket.transport.close()


class HardNatProbe:
    """One side's probing for one introduction, on the peer loop."""

    def __init__(
        self,
        *,
        role: str,
        introduction_id: str,
        signal: Signal,
        stun_server: Endpoint,
        deliver: Deliver,
    ) -> None:
        self.role = role
        self.introduction_id = introduction_id
        self._signal = signal
        self._stun_server = stun_server
        self._deliver = deliver
        self._sockets: list[_Socket] = []
        self._token = b""
        self._peer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._found: asyncio.Future[ProbedRoute] = asyncio.get_running_loop().create_future()
        self.route: ProbedRoute | None = None
        self.sent = 0  # datagrams sent to the peer's NAT, probes and mappings

    def remote(self, message: dict[str, Any]) -> bool:
        """The peer's half (`ice_candidates`, policy probe); True the first time."""
        if self._peer.done():
            return False
        self._peer.set_result(message)
        return True

    async def run(self) -> ProbedRoute | None:
        """The route a probe found within TIMEOUT, or None (logged either way)."""
        try:
            route = await asyncio.wait_for(
                self._easy() if self.role == "easy" else self._hard(), TIMEOUT
            )
        except (TimeoutError, OSError, ValueError, KeyError, IndexError) as exc:
            self.close()
            logger.info(
                "introduction=%s hard-NAT probing (%s side) found nothing after %d datagrams: %s",
                self.introduction_id,
                self.role,
                self.sent,
                str(exc) or type(exc).__name__,
            )
            return None
        logger.info(
            "introduction=%s hard-NAT probing (%s side) hit %s after %d datagrams",
            self.introduction_id,
            self.role,
            route.remote,
            self.sent,
        )
        return route

    async def _easy(self) -> ProbedRoute:
        (socket,) = await self._open(1)
        public = await socket.public_endpoint(self._stun_server)
        ufrag = secrets.token_hex(8)
        self._token = ufrag.encode()
        self._announce(ufrag, public)
        answer = await self._peer
        host, _ = _endpoint(answer)
        for round_ in range(ROUNDS):
            if round_:
                await asyncio.sleep(ROUND_GAP)
            if self._found.done():
                break
            for port in random.sample(range(LOWEST_PORT, 65536), PROBES):
                socket.transport.sendto(PROBE + self._token, (host, port))  # type: ignore[union-attr]
                self.sent += 1
        return await self._found

    async def _hard(self) -> ProbedRoute:
        offer = await self._peer
        self._token = str(offer["ufrag"]).encode()
        easy = _endpoint(offer)
        sockets = await self._open(SOCKETS)
        for socket in sockets:  # one mapping each on this side's NAT, towards the easy side
            socket.transport.sendto(PROBE + self._token, easy)  # type: ignore[union-attr]
            self.sent += 1
        public = await sockets[0].public_endpoint(self._stun_server)
        self._announce(secrets.token_hex(8), public)
        return await self._found

    def _announce(self, ufrag: str, public: Endpoint) -> None:
        host, port = public
        self._signal(
            wire.ice_candidates(
                introduction_id=self.introduction_id,
                attempt=0,
                policy=wire.IcePolicy.PROBE,
                ufrag=ufrag,
                pwd=secrets.token_hex(12),
                candidates=[f"1 1 udp 1 {host} {port} typ srflx"],
                done=True,
            )
        )

    async def _open(self, count: int) -> list[_Socket]:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _, socket = await loop.create_datagram_endpoint(
                lambda: _Socket(self._received), local_addr=("0.0.0.0", 0)
            )
            self._sockets.append(socket)
        return list(self._sockets)

    def _received(self, socket: _Socket, data: bytes, addr: Endpoint) -> None:
        route = self.route
        if route is not None and socket is route.socket:
            if not data.startswith((PROBE, ACK)):
                self._deliver(data)
            return
        if not self._token or self._found.done():
            return
        if data == PROBE + self._token and self.role == "hard":
            for _ in range(2):  # the easy side learns of the hit only from this
                socket.transport.sendto(ACK + self._token, addr)  # type: ignore[union-attr]
        elif not (data == ACK + self._token and self.role == "easy"):
            return  # not ours: a stranger's datagram
        self.route = ProbedRoute(socket, addr)
        for other in self._sockets:
            if other is not socket and other.transport is not None:
                other.transport.close()
        self._sockets = [socket]
        self._found.set_result(self.route)

    def close(self) -> None:
        for socket in self._sockets:
            if socket.transport is not None:
                socket.transport.close()
        self._sockets = []


def _endpoint(message: dict[str, Any]) -> Endpoint:
    """The one candidate of a probe message: `foundation component udp priority ip port typ`."""
    bits = str(message["candidates"][0]).split()
    return bits[4], int(bits[5])
