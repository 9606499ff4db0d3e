"""QUIC between two pinned identities over a PeerPath, in one process: two agents' sessions on
one peer loop, their paths joined by an in-memory route (which a test can tamper with). Real
aioquic handshakes and streams; what the real routes add is tests/test_connections_e2e.py."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import aioquic
import pytest

from tests.support import quic_pair
from worker_agent import PeerClosed, wire
from worker_agent.errors import HandshakeFailed, IdentityMismatch, StreamReset
from worker_agent.paths.loop import LoopThread
from worker_agent.secure import pacing, quic

pytestmark = pytest.mark.standalone

ALICE, BOB, MALLORY = quic_pair.ALICE, quic_pair.BOB, quic_pair.MALLORY
Wire, pair, established = quic_pair.Wire, quic_pair.pair, quic_pair.established


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("test-quic")
    yield thread
    thread.stop()


def test_aioquic_still_has_the_private_parts_the_agent_uses() -> None:
    """worker_agent/secure/quic.py relies on these in aioquic 1.7 (pinned in pyproject.toml)."""
    assert aioquic.__version__.startswith("1.7.")
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.tls import Context

    assert hasattr(QuicConnection, "_write_stream_limits") and hasattr(
        QuicConnection, "_initialize"
    )
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    assert hasattr(connection._loss, "_cc") and hasattr(connection._loss._cc, "bytes_in_flight")
    assert connection._loss._pto_count == 0 and callable(connection._loss.reschedule_data)
    from aioquic.quic.recovery import QuicPacketPacer

    assert isinstance(connection._loss._pacer, QuicPacketPacer)
    pacer = QuicPacketPacer(max_datagram_size=1350)
    pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.01)
    assert pacer.bucket_max > 0 and pacer.packet_time is not None
    context = Context(is_client=False)
    assert context._request_client_certificate is False and context._peer_certificate is None
    # pinned.py: PINGs acknowledged at once, the round trip read, reset senders recognised.
    assert hasattr(QuicConnection, "_handle_ping_frame") and hasattr(connection, "_spaces")
    assert connection._ping_pending == []
    assert connection._loss._rtt_initialized is False and connection._loss._rtt_smoothed == 0.0
    from aioquic.quic.stream import QuicStreamSender

    sender = QuicStreamSender(stream_id=0, writable=True)
    assert sender._reset_error_code is None and sender._buffer_stop == sender._buffer_start == 0


def released_at_once(pacer: Any, now: float = 100.0) -> int:
    """Packets a pacer lets out in one call of datagrams_to_send (aioquic asks it before each
    packet, with one `now` for the whole call), its bucket full."""
    pacer.update_bucket(now=now)
    pacer.bucket_time = pacer.bucket_max
    sent = 0
    while pacer.next_send_time(now=now) is None and sent < 100_000:
        pacer.update_after_send(now=now)
        sent += 1
    return sent


def test_a_paced_burst_carries_what_the_loop_timer_can_space() -> None:
    """aioquic's pacer releases 16 packets and asks for a wake-up microseconds later, which
    asyncio's millisecond timers turn into a millisecond: at 100 MB/s a burst must carry
    PACING_BURST's worth (2 ms: about 148 packets of 1,350 bytes), not 16."""
    from aioquic.quic.recovery import QuicPacketPacer

    ours, theirs = pacing.Pacer(max_datagram_size=1350), QuicPacketPacer(max_datagram_size=1350)
    for pacer in (ours, theirs):
        pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.01)  # 100 MB/s
    assert released_at_once(theirs) == 16
    assert released_at_once(ours) == pytest.approx(pacing.PACING_BURST * 100e6 / 1350, abs=2)
    slow, slow_theirs = (
        pacing.Pacer(max_datagram_size=1350),
        QuicPacketPacer(max_datagram_size=1350),
    )
    for pacer in (slow, slow_theirs):  # 270 kB/s: 2 ms is less than a packet, paced as before
        pacer.update_rate(congestion_window=27_000, smoothed_rtt=0.1)
    assert released_at_once(slow) == released_at_once(slow_theirs) == 5


def test_a_connection_paces_with_the_wider_bursts(loop) -> None:
    _, client, server = pair(loop)
    established(loop, client)
    assert isinstance(client.quic._loss._pacer, pacing.Pacer)
    assert isinstance(server.quic._loss._pacer, pacing.Pacer)


def test_a_route_move_starts_congestion_control_afresh_and_keeps_what_is_in_flight(loop) -> None:
    """RFC 9000, 9.4: a new network path gets a new congestion controller. aioquic cannot see
    the route move under it, so the session does it: a window CUBIC shrank on the relay's
    losses must not hold the direct path back."""
    connections, client, _ = pair(loop)
    established(loop, client)
    assert client.quic is not None
    recovery = client.quic._loss

    async def reset_now() -> tuple[Any, Any, int, tuple[int, int | None, int]]:
        """In one step of the loop: nothing acknowledged or lost in between. The fresh
        controller's values are read here, where they are made: once this step ends, ACKs
        still arriving grow its window (slow start)."""
        shrunk = recovery._cc
        shrunk.congestion_window, shrunk.ssthresh = 2 * 1350, 2 * 1350  # as after losses
        in_flight = shrunk.bytes_in_flight
        client._route_moved(client.path, "relay", "direct")
        fresh = recovery._cc
        return (
            shrunk,
            fresh,
            in_flight,
            (
                fresh.congestion_window,
                fresh.ssthresh,
                fresh.bytes_in_flight,
            ),
        )

    shrunk, fresh, in_flight, (window, ssthresh, fresh_in_flight) = loop.call(reset_now(), 5)
    assert fresh is not shrunk
    assert window == 10 * 1350 and ssthresh is None  # slow start again
    assert fresh_in_flight == in_flight

    class Direct(Wire):
        kind = wire.PathKind.DIRECT

    direct = Direct(loop)
    direct.peer = connections.to_server.peer

    async def move() -> None:  # the real thing: the path's best route changes
        client.path.add_route(direct)
        client.path.remove_route(connections.to_server)  # LAN gone: the direct route is best
        await asyncio.sleep(0.05)  # the path's callbacks run on the loop

    loop.call(move(), 5)
    assert client.path.kind == "direct" and recovery._cc is not fresh
    stream = connections.client.open_stream()
    stream.sendall(b"still flowing" * 1000)
    stream.shutdown_write()
    received = connections.server.accept_stream(timeout=5).recv_exactly(13000, timeout=5)
    assert received == b"still flowing" * 1000


def test_a_route_that_stops_reaching_the_peer_is_left_and_the_stream_carries_on(loop) -> None:
    """A NAT rebinding, in memory: mid-stream the LAN route drops everything both ways. Each
    side gives it up after a second of silence (paths/liveness.py), QUIC probes on the relay
    at once, and every byte arrives; the longest stall is seconds, not the idle timeout."""
    connections, client, server = pair(loop)
    established(loop, client)

    class Relay(Wire):
        kind = wire.PathKind.RELAY

    relays = [Relay(loop), Relay(loop)]
    relays[0].peer, relays[1].peer = connections.to_server.peer, connections.to_client.peer

    async def add_relays() -> None:
        client.path.add_route(relays[0])
        server.path.add_route(relays[1])

    loop.call(add_relays(), 5)
    assert client.path.kind == server.path.kind == "lan"
    cut = threading.Event()

    def drop_once_cut(data: bytes) -> bytes | None:
        return None if cut.is_set() else data

    connections.to_server.tamper = connections.to_client.tamper = drop_once_cut
    payload = os.urandom(16 * 1024 * 1024)
    arrivals: list[float] = []
    received: dict[str, str] = {}

    def serve() -> None:
        stream = connections.server.accept_stream(timeout=10)
        digest = hashlib.sha256()
        total = 0
        while data := stream.recv(64 * 1024, timeout=30):
            digest.update(data)
            arrivals.append(time.monotonic())
            total += len(data)
            if total >= 4 * 1024 * 1024:
                cut.set()  # a quarter in: the LAN route goes dark
        received["digest"] = digest.hexdigest()

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    stream = connections.client.open_stream()
    stream.sendall(payload, timeout=60)
    stream.shutdown_write()
    server_thread.join(60)
    assert cut.is_set() and received["digest"] == hashlib.sha256(payload).hexdigest()
    assert client.path.kind == server.path.kind == "relay"
    assert [kind for _, kind in client.path.history] == ["lan", "relay"]
    stall = max(b - a for a, b in itertools.pairwise(arrivals))
    assert 0.9 < stall < 5.0, stall  # at least the second of silence, at most a few


def test_both_sides_prove_the_identities_they_were_introduced_with(loop) -> None:
    connections, client, server = pair(loop)
    established(loop, client)
    established(loop, server)
    assert connections.client.peer_fingerprint == BOB.fingerprint
    assert connections.server.peer_fingerprint == ALICE.fingerprint
    assert client.handshake_seconds is not None and client.handshake_seconds < 1


def test_eight_megabytes_arrive_whole_over_one_stream_both_ways(loop) -> None:
    connections, client, _ = pair(loop)
    established(loop, client)
    payload = os.urandom(8 * 1024 * 1024)
    received: dict[str, Any] = {}

    def serve() -> None:
        stream = connections.server.accept_stream(timeout=10)
        digest = hashlib.sha256()
        while data := stream.recv(1 << 20, timeout=30):
            digest.update(data)
        stream.sendall(digest.hexdigest().encode())
        stream.shutdown_write()
        received["digest"] = digest.hexdigest()

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    stream = connections.client.open_stream()
    stream.sendall(payload)
    stream.shutdown_write()
    reply = stream.recv_exactly(64, timeout=30)
    assert stream.recv(timeout=5) == b""  # and then the end of the stream
    server_thread.join(10)
    assert reply.decode() == received["digest"] == hashlib.sha256(payload).hexdigest()


def test_many_concurrent_streams_each_carry_their_own_bytes(loop) -> None:
    connections, client, _ = pair(loop)
    established(loop, client)
    count = 64
    echoed: dict[int, bytes] = {}

    def echo() -> None:
        for _ in range(count):
            stream = connections.server.accept_stream(timeout=10)
            threading.Thread(target=lambda s=stream: (s.sendall(s.recv_exactly(20_000)),
                                                        s.shutdown_write())).start()  # fmt: skip

    threading.Thread(target=echo, daemon=True).start()

    def talk(n: int) -> None:
        stream = connections.client.open_stream()
        body = bytes([n]) * 20_000
        stream.sendall(body)
        echoed[n] = stream.recv_exactly(20_000, timeout=20)

    workers = [threading.Thread(target=talk, args=(n,)) for n in range(count)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert echoed == {n: bytes([n]) * 20_000 for n in range(count)}


def test_datagrams_go_both_ways_and_oversized_ones_are_refused(loop) -> None:
    connections, client, server = pair(loop)
    established(loop, client)
    established(loop, server)
    connections.client.send_datagram(b"ping")
    assert connections.server.recv_datagram(timeout=5) == b"ping"
    connections.server.send_datagram(b"pong" * 300)
    assert connections.client.recv_datagram(timeout=5) == b"pong" * 300
    with pytest.raises(ValueError, match="1200"):
        connections.client.send_datagram(b"x" * 1201)


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_peer_presenting_another_certificate_is_refused(loop, side: str) -> None:
    """Mallory sits where Bob (or Alice) should be: the other side refuses, whichever it is."""
    if side == "server":  # Alice expects Bob; Mallory answers
        connections, client, server = pair(loop, server_is=MALLORY)
        refusing, refused = client, server
    else:  # Bob expects Alice; Mallory calls
        connections, client, server = pair(loop, client_is=MALLORY, server_pins=ALICE)
        refusing, refused = server, client
    with pytest.raises(IdentityMismatch, match="identity"):
        established(loop, refusing)
    assert refusing.peer_fingerprint is None
    # The impostor's side ends too: refused mid-handshake (its client checks the pin) or closed
    # by the refusing server with the identity close code right after.
    deadline = time.monotonic() + 5
    while not (connections.client.closed and connections.server.closed):
        assert time.monotonic() < deadline, "the connection stayed open"
        time.sleep(0.02)
    assert "certificate" in (refused.closed_reason or "").lower() or isinstance(
        refused.handshake.exception(), IdentityMismatch | HandshakeFailed
    )
    with pytest.raises(PeerClosed):
        connections.server.accept_stream(timeout=1)


def test_garbage_on_the_path_is_ignored_and_the_connection_carries_on(loop) -> None:
    connections, client, _ = pair(loop)
    established(loop, client)
    originals: list[bytes] = []

    def garble(data: bytes) -> bytes:
        originals.append(data)
        return os.urandom(len(data)) if len(originals) % 3 == 0 else data  # a third garbled

    connections.to_server.tamper = garble
    for n in range(30):  # injected junk, too, of every size
        loop.call_soon(connections.server.path.deliver, os.urandom(n * 40), wire.PathKind.LAN)
    stream = connections.client.open_stream()
    payload = os.urandom(300_000)
    stream.sendall(payload)
    stream.shutdown_write()
    incoming = connections.server.accept_stream(timeout=10)
    got = b""
    while data := incoming.recv(1 << 20, timeout=30):
        got += data
    assert got == payload  # retransmitted around the garbage
    assert len(originals) > 0 and not connections.server.closed


def test_a_reader_that_does_not_read_holds_the_sender_back(loop) -> None:
    """Bounded memory: what arrives ahead of the reader is at most the stream window, and the
    sender waits (its sendall times out) rather than buffering without end."""
    connections, client, _ = pair(loop)
    established(loop, client)
    stream = connections.client.open_stream()
    with pytest.raises(TimeoutError):
        stream.sendall(os.urandom(32 * 1024 * 1024), timeout=3)
    incoming = connections.server.accept_stream(timeout=5)
    buffered = incoming._buffer.buffered
    assert quic.STREAM_WINDOW // 2 <= buffered <= quic.STREAM_WINDOW, buffered


def test_a_flood_of_streams_is_held_to_quic_stream_limit(loop) -> None:
    """A peer opening streams without end: the ones beyond the limit wait for the reader."""
    connections, client, server = pair(loop)
    established(loop, client)

    async def flood() -> int:
        for _ in range(1000):
            stream_id = client.open_stream()
            client.quic.send_stream_data(stream_id, b"x", end_stream=False)
        client.transmit()
        await asyncio.sleep(0.5)
        return server.incoming.qsize()

    arrived = loop.call(flood(), 10)
    assert 0 < arrived <= 128  # aioquic's default limit of open streams
    assert not connections.server.closed and not connections.client.closed


def test_a_ping_is_answered_at_once_and_says_the_route_it_came_back_on(loop) -> None:
    """The peer acknowledges a PING in the same turn of its loop, not after aioquic's ACK delay
    of a millisecond (pinned.py): on an in-memory route the round trip is a fraction of it."""
    connections, client, server = pair(loop)
    established(loop, client)
    established(loop, server)
    pongs = [connections.client.ping(timeout=5) for _ in range(20)]
    assert all(pong.kind == "lan" for pong in pongs)
    assert all(pong.address == Wire.remote for pong in pongs)
    assert sorted(p.seconds for p in pongs)[10] < 0.001, [p.seconds for p in pongs]
    assert connections.client.rtt is not None and connections.client.rtt < 0.01
    snapshot = connections.client.snapshot()
    assert snapshot["kind"] == "lan" and snapshot["bytes_sent"] > 0
    assert snapshot["bytes_received"] > 0 and snapshot["rtt_ms"] is not None
    assert snapshot["ping_ms"] == round(1000 * pongs[-1].seconds, 3)
    assert snapshot["history"][0][1] == "lan"


def test_a_ping_on_a_closed_connection_raises_peer_closed(loop) -> None:
    connections, client, _ = pair(loop)
    established(loop, client)
    loop.call_soon(client.close, "done")
    with pytest.raises(PeerClosed):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            connections.client.ping(timeout=1)
            time.sleep(0.01)


def test_a_reset_stream_ends_reads_and_writes_on_both_sides(loop) -> None:
    """`PeerStream.reset()`: the peer's reads raise, and so do its writes (STOP_SENDING),
    instead of waiting for acknowledgements that will never come."""
    connections, client, _ = pair(loop)
    established(loop, client)
    stream = connections.client.open_stream()
    stream.sendall(b"hello")
    incoming = connections.server.accept_stream(timeout=5)
    assert incoming.recv(timeout=5) == b"hello"
    incoming.sendall(b"answer")
    assert stream.recv(timeout=5) == b"answer"
    stream.reset(7)
    with pytest.raises(StreamReset, match="code 7"):
        while incoming.recv(timeout=5):
            pass
    with pytest.raises(StreamReset):
        for _ in range(100):  # the peer's STOP_SENDING arrives within a round trip
            incoming.sendall(b"x" * 65536, timeout=5)
    with pytest.raises(StreamReset):
        stream.recv(timeout=5)
    other = connections.client.open_stream()  # the connection itself is unharmed
    other.sendall(b"still here")
    assert connections.server.accept_stream(timeout=5).recv(timeout=5) == b"still here"
