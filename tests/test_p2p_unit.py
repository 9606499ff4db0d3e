"""The agent's peer-to-peer layers alone: the relay link's batching and back-pressure, the path's
choice of route and its moves, and one ICE attempt between two aioice connections on this host
(real sockets, signalling handed across in memory)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import aioice
import pytest

from registry.core import protocol
from worker_agent import PeerClosed, wire
from worker_agent.paths import ice
from worker_agent.paths.loop import LoopThread
from worker_agent.paths.path import PeerPath, RelayRoute
from worker_agent.paths.relay import RelayLink

pytestmark = pytest.mark.standalone

INTRO = "ab" * 16
OTHER = "cd" * 16


class Socket:
    """What the relay link writes to: the agent's WebSocket, recorded; it can be made to stall."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = threading.Event()
        self.open.set()
        self.connected = True

    def send_binary(self, frame: bytes) -> bool:
        self.open.wait(10)
        self.frames.append(frame)
        return self.connected


def wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- the relay link ----------------------------------------------------------------------------


def test_datagrams_queued_while_the_socket_is_busy_travel_together_per_peer() -> None:
    socket = Socket()
    link = RelayLink(socket.send_binary)
    try:
        socket.open.clear()  # the writer blocks on its first frame, the rest piles up
        assert link.send(wire.relay_header(INTRO), b"first")
        wait(lambda: link.frames_sent == 0 and not link._queue)
        for n in range(3):
            assert link.send(wire.relay_header(INTRO), b"a%d" % n)
        assert link.send(wire.relay_header(OTHER), b"b0")
        assert link.send(wire.relay_header(INTRO), b"a3")
        socket.open.set()
        wait(lambda: link.datagrams_sent == 6)
    finally:
        link.close()
    unpacked = [wire.parse_relay_frame(frame) for frame in socket.frames]
    assert unpacked == [
        (INTRO, [b"first"]),  # alone: nothing else was waiting
        (INTRO, [b"a0", b"a1", b"a2"]),  # one frame for the three that waited
        (OTHER, [b"b0"]),
        (INTRO, [b"a3"]),  # order kept across peers
    ]
    for frame in socket.frames:
        assert protocol.relay_frame_introduction(frame) in (INTRO, OTHER)


def test_a_batch_never_exceeds_the_frame_limit() -> None:
    socket = Socket()
    link = RelayLink(socket.send_binary, max_queued=10 * wire.RELAY_MAX_FRAME_BYTES)
    try:
        socket.open.clear()
        link.send(wire.relay_header(INTRO), b"x")
        wait(lambda: not link._queue)
        for _ in range(100):
            link.send(wire.relay_header(INTRO), b"y" * 1200)
        socket.open.set()
        wait(lambda: link.datagrams_sent == 101)
    finally:
        link.close()
    sizes = [len(frame) for frame in socket.frames]
    assert max(sizes) <= wire.RELAY_MAX_FRAME_BYTES
    assert sum(len(wire.parse_relay_frame(f)[1]) for f in socket.frames) == 101
    assert len(socket.frames) == 1 + 2  # 100 x 1,202 bytes: frames of 54 and 46


def test_a_full_queue_makes_a_blocking_send_wait_and_a_nonblocking_one_drop() -> None:
    socket = Socket()
    link = RelayLink(socket.send_binary, max_queued=3000)
    try:
        socket.open.clear()
        link.send(wire.relay_header(INTRO), b"z" * 1000)  # taken by the writer, which stalls
        wait(lambda: not link._queue)
        assert link.send(wire.relay_header(INTRO), b"z" * 900)  # 1,002 + 902 of 3,000
        assert not link.send(wire.relay_header(INTRO), b"z" * 1200)  # would pass 3,000: dropped
        assert link.dropped == 1
        started = time.monotonic()
        assert not link.send(wire.relay_header(INTRO), b"z" * 1200, timeout=0.2)
        assert 0.15 < time.monotonic() - started < 1.0
        threading.Timer(0.2, socket.open.set).start()
        assert link.send(wire.relay_header(INTRO), b"z" * 1200, timeout=5)  # room once written
    finally:
        link.close()


# ---- the path ------------------------------------------------------------------------------------


class FakeRoute:
    def __init__(self, kind: wire.PathKind, remote: tuple[str, int] | None = None) -> None:
        self.kind = kind
        self.remote = remote
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


@pytest.fixture
def loop() -> Any:
    thread = LoopThread("test-p2p")
    yield thread
    thread.stop()


def on_loop(loop: LoopThread, function: Any, *args: Any) -> Any:
    async def call() -> Any:
        return function(*args)

    return loop.call(call(), 5)


def test_the_path_sends_on_the_best_live_route_and_falls_back_when_it_goes(loop) -> None:
    closes: list[str] = []
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=closes.append)
    moves: list[tuple[str | None, str | None]] = []
    path.on_change(lambda p, old, new: moves.append((old, new)))
    socket = Socket()
    link = RelayLink(socket.send_binary)
    relay = RelayRoute(link, wire.relay_header(INTRO))
    turn = FakeRoute(wire.PathKind.TURN, ("203.0.113.10", 50000))
    direct = FakeRoute(wire.PathKind.DIRECT, ("203.0.113.2", 4000))
    lan = FakeRoute(wire.PathKind.LAN, ("10.0.1.3", 4000))
    try:
        assert path.kind is None
        on_loop(loop, path.add_route, relay)
        path.send(b"via relay")
        wait(lambda: socket.frames)
        assert wire.parse_relay_frame(socket.frames[0]) == (INTRO, [b"via relay"])
        on_loop(loop, path.add_route, direct)
        on_loop(loop, path.add_route, turn)  # worse than direct: no move
        assert (path.kind, path.remote_address) == ("direct", ("203.0.113.2", 4000))
        path.send(b"via direct")
        wait(lambda: direct.sent)
        on_loop(loop, path.add_route, lan)
        assert path.wait_for_kind("lan", timeout=1)
        on_loop(loop, path.remove_route, lan)
        on_loop(loop, path.remove_route, direct)
        assert path.kind == "turn"
        on_loop(loop, path.remove_route, turn)
        assert (path.kind, path.remote_address) == ("relay", None)
        wait(lambda: len(moves) == 6)
        assert moves == [
            (None, "relay"),
            ("relay", "direct"),
            ("direct", "lan"),
            ("lan", "direct"),
            ("direct", "turn"),
            ("turn", "relay"),
        ]
        assert [kind for _, kind in path.history] == [new for _, new in moves]
        assert path.stats.sent == {"relay": 1, "direct": 1}
    finally:
        link.close()


def test_datagrams_from_any_route_are_read_in_arrival_order_until_the_path_ends(loop) -> None:
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=lambda reason: None)
    on_loop(loop, path.deliver, b"one", wire.PathKind.RELAY)
    on_loop(loop, path.deliver, b"two", wire.PathKind.DIRECT)
    assert [path.recv(timeout=1), path.recv(timeout=1)] == [b"one", b"two"]
    with pytest.raises(TimeoutError):
        path.recv(timeout=0.05)
    on_loop(loop, path.ended, "closed by the peer: bye")
    for _ in range(2):  # every later call too
        with pytest.raises(PeerClosed, match="closed by the peer: bye"):
            path.recv(timeout=1)
    with pytest.raises(PeerClosed):
        path.send(b"after the end")
    assert path.stats.received == {"relay": 1, "direct": 1}


def test_a_datagram_over_the_limit_is_refused_before_it_is_sent(loop) -> None:
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=lambda reason: None)
    on_loop(loop, path.add_route, FakeRoute(wire.PathKind.LAN))
    with pytest.raises(ValueError, match="65517"):
        path.send(b"x" * (wire.MAX_DATAGRAM_BYTES + 1))


def test_closing_the_path_asks_the_session_to_end_it(loop) -> None:
    closes: list[str] = []
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=closes.append)
    path.close("done here")
    wait(lambda: closes == ["done here"])


# ---- a route that stops reaching the peer (paths/liveness.py) ----------------------------------


def watched_path(loop: LoopThread) -> tuple[PeerPath, list[Any]]:
    """A path on a relay and a direct route; what the path gave up, in `failed`."""
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=lambda reason: None)
    failed: list[Any] = []
    path.on_route_failed = failed.append
    on_loop(loop, path.add_route, FakeRoute(wire.PathKind.RELAY))
    on_loop(loop, path.add_route, FakeRoute(wire.PathKind.DIRECT, ("203.0.113.2", 4000)))
    return path, failed


def test_a_direct_route_silent_while_the_peer_sends_on_the_relay_is_given_up(loop) -> None:
    """The peer moved off the route: this side's sends on it are not arriving either."""
    path, failed = watched_path(loop)
    direct = path.best_route
    path.watch.look(100.0)  # starts watching: a new best route has its full second
    on_loop(loop, path.deliver, b"via relay", wire.PathKind.RELAY)
    path.watch.look(100.9)
    assert path.kind == "direct" and failed == []  # not a second yet
    path.watch.look(101.1)
    assert path.kind == "relay" and failed == [direct]
    assert "direct" not in path.routes()


def test_a_direct_route_silent_while_an_answer_is_owed_is_given_up(loop) -> None:
    path, failed = watched_path(loop)
    path.expecting = lambda: True  # QUIC: packets in flight, unacknowledged
    path.watch.look(100.0)
    path.watch.look(101.1)
    assert path.kind == "relay" and len(failed) == 1


def test_a_quiet_route_with_nothing_owed_and_nothing_elsewhere_is_kept(loop) -> None:
    """An idle connection is not a broken one."""
    path, failed = watched_path(loop)
    path.expecting = lambda: False
    path.watch.look(100.0)
    path.watch.look(130.0)
    assert path.kind == "direct" and failed == []


def test_datagrams_on_the_route_restart_its_second(loop) -> None:
    path, failed = watched_path(loop)
    path.expecting = lambda: True
    path.watch.look(100.0)
    for at in (100.8, 101.6, 102.4):
        on_loop(loop, path.deliver, b"ack", wire.PathKind.DIRECT)
        path.watch.look(at)
    path.watch.look(103.0)
    assert path.kind == "direct" and failed == []
    path.watch.look(103.5)
    assert path.kind == "relay" and len(failed) == 1


def test_the_relay_is_never_given_up_for_silence(loop) -> None:
    path = PeerPath(peer_id="b", introduction_id=INTRO, loop=loop, on_close=lambda reason: None)
    failed: list[Any] = []
    path.on_route_failed = failed.append
    path.expecting = lambda: True
    on_loop(loop, path.add_route, FakeRoute(wire.PathKind.RELAY))
    path.watch.look(100.0)
    path.watch.look(160.0)
    assert path.kind == "relay" and failed == []


CANDIDATE = "6815297761 1 udp 2130706431 192.0.2.2 37929 typ host"


# ---- one ICE attempt ---------------------------------------------------------------------------


def test_aioice_still_keeps_what_the_agent_reads_where_it_reads_it() -> None:
    """worker_agent/paths/ice.py reads aioice's private `_nominated`, `_check_list`, each pair's
    `remote_nominated`, and the socket protocol under a TURN transport; pyproject pins aioice."""
    assert aioice.__version__.startswith("0.13.")

    async def check() -> None:
        connection = aioice.Connection(ice_controlling=False)
        assert connection._nominated == {} and connection._check_list == []
        assert hasattr(aioice.Connection, "data_received")  # what ice._Connection overrides
        protocol = aioice.ice.StunProtocol(connection)
        pair = aioice.ice.CandidatePair(protocol, aioice.Candidate.from_sdp(CANDIDATE))
        assert pair.remote_nominated is False
        inner = object()
        transport = aioice.turn.TurnTransport(inner)  # type: ignore[arg-type]
        assert transport._TurnTransport__inner_protocol is inner  # type: ignore[attr-defined]

    asyncio.run(check())


async def _attempts(
    policy: wire.IcePolicy = wire.IcePolicy.ALL, timeout: float = 5.0
) -> tuple[ice.IceAttempt, ice.IceAttempt, list[bytes], list[bytes]]:
    """Two attempts on this host, each one's signal handed to the other."""
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    sides: dict[str, ice.IceAttempt] = {}

    def signal_to(name: str) -> Any:
        def signal(frame: str) -> bool:
            message = wire.parse_server_message(frame)
            asyncio.get_running_loop().create_task(sides[name].remote_candidates(message))
            return True

        return signal

    sides["b"] = ice.IceAttempt(
        introduction_id=INTRO,
        attempt=0,
        policy=policy,
        controlling=False,
        signal=signal_to("a"),
        datagram=lambda attempt, data: got_b.append(data),
    )
    sides["a"] = ice.IceAttempt(
        introduction_id=INTRO,
        attempt=0,
        policy=policy,
        controlling=True,
        signal=signal_to("b"),
        datagram=lambda attempt, data: got_a.append(data),
    )
    results = await asyncio.gather(sides["a"].run(timeout), sides["b"].run(timeout))
    assert results == [True, True], (sides["a"].failure, sides["b"].failure)
    return sides["a"], sides["b"], got_a, got_b


def test_two_attempts_on_one_host_meet_on_a_lan_pair_and_carry_datagrams() -> None:
    async def scenario() -> None:
        a, b, got_a, got_b = await _attempts()
        try:
            assert a.kind == b.kind == wire.PathKind.LAN
            assert a.remote == b.local and b.remote == a.local
            a.send(b"ping")
            b.send(b"pong")
            for _ in range(100):
                if got_a and got_b:
                    break
                await asyncio.sleep(0.01)
            assert (got_a, got_b) == ([b"pong"], [b"ping"])
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_burst_goes_out_in_segmented_sends_and_arrives_whole_and_in_order() -> None:
    """Runs of one size leave in one sendmsg() each (GSO); the peer reads every datagram as
    it was, in order, whatever the runs were."""
    burst = [bytes([n]) * 1350 for n in range(100)] + [b"short", b"x" * 1350, b"y" * 1350]

    async def scenario() -> None:
        a, b, _, got_b = await _attempts()
        try:
            drain = a._drain
            assert drain is not None and drain.gso
            sent_segmented: list[int] = []
            original = drain.send_segmented
            drain.send_segmented = lambda run, address: (  # type: ignore[method-assign]
                sent_segmented.append(len(run)) or original(run, address)
            )
            a.send_many(burst)
            for _ in range(200):
                if len(got_b) == len(burst):
                    break
                await asyncio.sleep(0.01)
            assert got_b == burst
            assert sent_segmented == [48, 48, 5, 2] and drain.gso  # the kernel took them
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_burst_is_cut_into_runs_one_segmented_send_can_carry() -> None:
    runs = ice._runs([b"a" * 10] * 3 + [b"b" * 4, b"c" * 10, b"d" * 12, b"e" * 12])
    assert [[len(d) for d in run] for run in runs] == [[10, 10, 10, 4], [10], [12, 12]]
    many = ice._runs([b"z" * 1100] * 70)
    assert [len(run) for run in many] == [59, 11]  # GSO_MAX_BYTES (65,000) before 64 segments
    assert [len(run) for run in ice._runs([b"q"] * 70)] == [64, 6]  # at most 64 segments
    assert ice._runs([]) == []


def test_an_attempt_whose_peer_never_answers_fails_within_its_timeout() -> None:
    async def scenario() -> None:
        attempt = ice.IceAttempt(
            introduction_id=INTRO,
            attempt=0,
            policy=wire.IcePolicy.ALL,
            controlling=True,
            signal=lambda frame: True,  # sent, and never answered
            datagram=lambda attempt, data: None,
        )
        started = time.monotonic()
        assert not await attempt.run(timeout=0.5)
        assert time.monotonic() - started < 1.5
        assert attempt.failure == "no working candidate pair within 0.5s"
        assert attempt.closed.is_set()

    asyncio.run(scenario())


def test_a_turn_attempt_without_a_turn_server_fails_at_once_and_says_so() -> None:
    async def scenario() -> None:
        attempt = ice.IceAttempt(
            introduction_id=INTRO,
            attempt=0,
            policy=wire.IcePolicy.RELAY,
            controlling=True,
            signal=lambda frame: True,
            datagram=lambda attempt, data: None,
        )
        assert not await attempt.run(timeout=2)
        assert "no local candidates" in (attempt.failure or "")

    asyncio.run(scenario())


# ---- what a host pair is called ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "remote", "kind"),
    [
        ("10.0.1.2", "10.0.1.3", "lan"),  # one home network
        ("192.168.1.5", "10.8.0.2", "lan"),  # private both: one organisation's routed network
        ("fd00::2", "fd00:1::7", "lan"),  # unique local addresses
        ("fe80::1", "fe80::2", "lan"),  # one link
        ("2001:db8:1::2", "2001:db8:2::2", "direct"),  # global IPv6 on two networks
        ("203.0.113.5", "198.51.100.7", "direct"),  # two hosts without NAT on the internet
        ("10.0.1.2", "203.0.113.7", "direct"),
        ("10.0.1.2", "2001:db8::1", "direct"),
    ],
)
def test_a_host_pair_is_lan_only_on_one_private_network_or_link(
    local: str, remote: str, kind: str
) -> None:
    from worker_agent.paths.kinds import host_pair_kind

    assert host_pair_kind(local, remote) == kind


def test_a_global_address_on_this_hosts_own_link_is_lan() -> None:
    """The peer's address inside the prefix of the local interface: the same link."""
    from worker_agent.paths import kinds

    public = [
        (address, network)
        for address, network in kinds._interface_networks().items()
        if not kinds.is_private(kinds._address(address))
    ]
    if not public:
        pytest.skip("this host has no public-looking address to stand on")
    address, network = public[0]
    neighbour = next(str(h) for h in network.hosts() if str(h) != address)
    assert kinds.host_pair_kind(address, neighbour) == "lan"
    outside = network.broadcast_address + 256
    assert kinds.host_pair_kind(address, str(outside)) == "direct"
