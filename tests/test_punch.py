"""UDP hole punching on loopback: two real sockets punching at once, forged and reflected
probes, garbage, the start time, and the PeerPath handed to the host program."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_agent.punch import (
    DATAGRAM_LENGTH,
    MAGIC,
    Drop,
    Introduction,
    Kind,
    PeerPath,
    PunchTimeout,
    build_datagram,
    parse_datagram,
    punch,
    sender_tag,
)

pytestmark = pytest.mark.standalone

KEY = bytes(range(32))
A_ID = "worker-a"
B_ID = "worker-b"
FAST = {"timeout": 3.0, "interval": 0.02}
# Failing punches: short enough to keep the file fast, long enough for dozens of probes.
SHORT = {"timeout": 0.4, "interval": 0.02}

Endpoint = tuple[str, int]
Answer = Callable[[bytes], list[bytes]]


@pytest.fixture
def udp() -> Iterator[Callable[[], socket.socket]]:
    """Bound loopback UDP sockets, all closed at teardown."""
    sockets: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        return sock

    yield make
    for sock in sockets:
        sock.close()


def address(sock: socket.socket) -> Endpoint:
    return sock.getsockname()


def closed_port() -> Endpoint:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    endpoint = sock.getsockname()
    sock.close()
    return endpoint


def introduce(
    a: socket.socket,
    b: socket.socket,
    *,
    a_told: list[Endpoint] | None = None,
    b_told: list[Endpoint] | None = None,
    start_at: float | None = None,
) -> tuple[Introduction, Introduction]:
    """The two introductions the service would send, A's and B's."""
    introduction_id = uuid.uuid4().hex
    start = time.time() if start_at is None else start_at
    told_a = tuple(a_told if a_told is not None else [address(b)])
    told_b = tuple(b_told if b_told is not None else [address(a)])
    return (
        Introduction(introduction_id, A_ID, B_ID, told_a, KEY, start),
        Introduction(introduction_id, B_ID, A_ID, told_b, KEY, start),
    )


def punch_both(
    a: socket.socket, b: socket.socket, intros: tuple[Introduction, Introduction], **options: float
) -> tuple[PeerPath, PeerPath]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        a_future = pool.submit(punch, a, intros[0], **options)
        b_future = pool.submit(punch, b, intros[1], **options)
        return a_future.result(timeout=10), b_future.result(timeout=10)


def datagram(
    intro: Introduction, kind: Kind, *, sender: str, key: bytes, sequence: int = 0
) -> bytes:
    return build_datagram(
        kind,
        introduction_id=intro.introduction_id,
        sender_id=sender,
        sequence=sequence,
        key=key,
    )


@contextlib.contextmanager
def responder(sock: socket.socket, answer: Answer) -> Iterator[None]:
    """Answer every datagram `sock` receives with `answer(data)`, from a thread."""
    stop = threading.Event()
    sock.settimeout(0.01)

    def run() -> None:
        while not stop.is_set():
            try:
                data, source = sock.recvfrom(2048)
            except TimeoutError:
                continue
            for reply in answer(data):
                sock.sendto(reply, source)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def drain(sock: socket.socket) -> list[bytes]:
    received = []
    while True:
        try:
            received.append(sock.recv(2048, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return received


def is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


# ---- wire format -------------------------------------------------------------------------------


def test_a_datagram_has_the_documented_layout_and_stays_small() -> None:
    introduction_id = uuid.uuid4().hex
    data = build_datagram(
        Kind.ACK, introduction_id=introduction_id, sender_id=A_ID, sequence=0x01020304, key=KEY
    )

    assert len(data) == DATAGRAM_LENGTH == 49 < 80
    assert data[:4] == MAGIC == b"RZP1"
    assert data[4] == 2
    assert data[5:21] == bytes.fromhex(introduction_id)
    assert data[21:29] == hashlib.sha256(A_ID.encode()).digest()[:8] == sender_tag(A_ID)
    assert data[29:33] == bytes([1, 2, 3, 4])
    assert data[33:] == hmac.new(KEY, data[:33], hashlib.sha256).digest()[:16]
    parsed = parse_datagram(data, introduction_id=introduction_id, key=KEY)
    assert parsed == (Kind.ACK, sender_tag(A_ID), 0x01020304)


@given(st.binary(max_size=2 * DATAGRAM_LENGTH))
def test_parsing_arbitrary_bytes_never_raises(data: bytes) -> None:
    assert parse_datagram(data, introduction_id="0" * 32, key=KEY) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("introduction_id", "0" * 31),
        ("introduction_id", "A" * 32),
        ("my_id", "-starts-with-a-dash"),
        ("peer_id", A_ID),
        ("peer_endpoints", (("peer.example", 4000),)),
        ("peer_endpoints", (("127.0.0.1", 0),)),
        ("key", bytes(31)),
    ],
)
def test_an_introduction_with_a_bad_field_is_refused(field: str, value: object) -> None:
    fields: dict[str, object] = {
        "introduction_id": uuid.uuid4().hex,
        "my_id": A_ID,
        "peer_id": B_ID,
        "peer_endpoints": (("127.0.0.1", 4000),),
        "key": KEY,
        "start_at": 0.0,
    }
    fields[field] = value
    with pytest.raises(ValueError):
        Introduction(**fields)  # type: ignore[arg-type]


def test_an_introductions_repr_does_not_show_the_key() -> None:
    intro = Introduction(uuid.uuid4().hex, A_ID, B_ID, (), KEY, 0.0)
    assert KEY.hex() not in repr(intro) and repr(KEY) not in repr(intro)


# ---- punching ----------------------------------------------------------------------------------


def test_two_workers_punch_a_path_and_exchange_data_both_ways(udp) -> None:
    a, b = udp(), udp()
    a_path, b_path = punch_both(a, b, introduce(a, b), **FAST)

    assert (a_path.peer_id, a_path.peer_address) == (B_ID, address(b))
    assert (b_path.peer_id, b_path.peer_address) == (A_ID, address(a))
    assert a_path.local_address == address(a)
    a_path.send(b"ping")
    assert b_path.recv(timeout=2) == b"ping"
    b_path.send(b"pong")
    assert a_path.recv(timeout=2) == b"pong"
    with a_path, b_path:
        pass
    assert a.fileno() == -1 and b.fileno() == -1


def test_the_peers_real_address_is_learned_when_one_side_is_told_a_wrong_port(udp) -> None:
    a, b, sink = udp(), udp(), udp()
    a_path, b_path = punch_both(a, b, introduce(a, b, a_told=[address(sink)]), **FAST)

    assert a_path.peer_address == address(b)
    assert b_path.peer_address == address(a)
    b_path.send(b"over the learned path")
    assert a_path.recv(timeout=2) == b"over the learned path"


def test_an_unreachable_candidate_beside_the_right_one_still_establishes(udp) -> None:
    a, b = udp(), udp()
    dead = closed_port()
    intros = introduce(a, b, a_told=[dead, address(b)], b_told=[dead, address(a)])
    a_path, b_path = punch_both(a, b, intros, **FAST)

    assert a_path.peer_address == address(b)
    a_path.send(b"after the dead candidate")
    assert b_path.recv(timeout=2) == b"after the dead candidate"


def test_an_ipv6_candidate_on_an_ipv4_socket_is_skipped_not_fatal(udp) -> None:
    a, b = udp(), udp()
    a_path, _ = punch_both(a, b, introduce(a, b, a_told=[("::1", 9), address(b)]), **FAST)
    assert a_path.peer_address == address(b)


def test_a_stranger_without_the_key_cannot_establish_and_the_timeout_says_what_was_dropped(
    udp,
) -> None:
    a, stranger = udp(), udp()
    a_intro, _ = introduce(a, stranger)
    wrong_key = os.urandom(32)

    def forge(_: bytes) -> list[bytes]:
        return [
            datagram(a_intro, kind, sender=B_ID, key=wrong_key) for kind in (Kind.PROBE, Kind.ACK)
        ]

    started = time.monotonic()
    with responder(stranger, forge), pytest.raises(PunchTimeout) as failure:
        punch(a, a_intro, **SHORT)

    assert time.monotonic() - started < SHORT["timeout"] + 1
    assert failure.value.dropped.get(Drop.BAD_MAC, 0) > 0
    assert failure.value.probes_received == 0
    message = str(failure.value)
    assert f"no probe from {B_ID} arrived" in message
    assert "dropped" in message and "bad MAC" in message
    assert f"{failure.value.probes_sent} probes to {address(stranger)[0]}" in message


def test_a_reflected_copy_of_our_own_probe_does_not_establish(udp) -> None:
    a, mirror = udp(), udp()
    a_intro, _ = introduce(a, mirror)

    with responder(mirror, lambda data: [data]), pytest.raises(PunchTimeout) as failure:
        punch(a, a_intro, **SHORT)

    assert failure.value.dropped.get(Drop.REFLECTED, 0) > 0
    assert failure.value.probes_received == 0


def test_garbage_datagrams_are_counted_as_dropped_and_never_raise(udp) -> None:
    a, sink, sender = udp(), udp(), udp()
    a_intro, _ = introduce(a, sink)
    valid = datagram(a_intro, Kind.PROBE, sender=B_ID, key=KEY)
    other_introduction = build_datagram(
        Kind.PROBE, introduction_id=uuid.uuid4().hex, sender_id=B_ID, sequence=0, key=KEY
    )
    malformed = [
        b"",
        os.urandom(DATAGRAM_LENGTH),
        os.urandom(500),
        MAGIC,
        MAGIC + bytes(10),
        valid[:-1],
        valid + b"x",
        valid[:4] + bytes([3]) + valid[5:],
    ]
    for garbage in [*malformed, other_introduction, valid[:-1] + bytes([valid[-1] ^ 1])]:
        sender.sendto(garbage, address(a))

    with pytest.raises(PunchTimeout) as failure:
        punch(a, a_intro, **SHORT)

    assert failure.value.dropped == {
        Drop.MALFORMED: len(malformed),
        Drop.OTHER_INTRODUCTION: 1,
        Drop.BAD_MAC: 1,
    }


def test_garbage_queued_before_the_start_does_not_stop_a_punch(udp) -> None:
    a, b, sender = udp(), udp(), udp()
    for _ in range(20):
        sender.sendto(os.urandom(DATAGRAM_LENGTH), address(a))
    a_path, _ = punch_both(a, b, introduce(a, b), **FAST)
    assert a_path.peer_address == address(b)


def test_a_failed_punch_leaves_the_socket_open_and_unconnected(udp) -> None:
    a, sink = udp(), udp()
    with pytest.raises(PunchTimeout):
        punch(a, introduce(a, sink)[0], **SHORT)
    assert a.fileno() != -1
    assert not is_connected(a)


def test_nothing_is_sent_before_start_at(udp) -> None:
    a, listener = udp(), udp()
    start_at = time.time() + 0.3
    a_intro, _ = introduce(a, listener, start_at=start_at)

    with ThreadPoolExecutor(max_workers=1) as pool:
        attempt = pool.submit(punch, a, a_intro, timeout=0.1, interval=0.02)
        listener.settimeout(2)
        first, _ = listener.recvfrom(2048)
        arrived = time.time()
        with pytest.raises(PunchTimeout):
            attempt.result(timeout=5)

    assert arrived >= start_at
    probe = parse_datagram(first, introduction_id=a_intro.introduction_id, key=KEY)
    assert probe is not None and probe.kind is Kind.PROBE and probe.sender_tag == sender_tag(A_ID)


def test_a_start_at_in_the_past_starts_at_once(udp) -> None:
    a, b = udp(), udp()
    started = time.monotonic()
    punch_both(a, b, introduce(a, b, start_at=time.time() - 1), **FAST)
    assert time.monotonic() - started < 1


def test_a_window_that_ended_before_the_call_fails_at_once_and_says_why(udp) -> None:
    a, listener = udp(), udp()
    started = time.monotonic()
    with pytest.raises(PunchTimeout) as failure:
        punch(a, introduce(a, listener, start_at=time.time() - 10)[0], timeout=1)
    assert time.monotonic() - started < 0.5
    assert failure.value.probes_sent == 0
    assert "already ended" in str(failure.value)


# ---- the path handed to the host program -------------------------------------------------------


def test_peer_path_recv_drops_late_control_datagrams_and_returns_the_next_data(udp) -> None:
    a, b = udp(), udp()
    intros = introduce(a, b)
    a_path, b_path = punch_both(a, b, intros, **FAST)
    b_intro = intros[1]

    with a_path, b_path:
        b.send(datagram(b_intro, Kind.PROBE, sender=B_ID, key=KEY, sequence=41))
        b.send(datagram(b_intro, Kind.ACK, sender=B_ID, key=KEY, sequence=42))
        b.send(b"data")
        assert a_path.recv(timeout=2) == b"data"


def test_peer_path_recv_answers_a_late_probe_with_an_ack(udp) -> None:
    a, b = udp(), udp()
    intros = introduce(a, b)
    a_path, b_path = punch_both(a, b, intros, **FAST)

    with a_path, b_path:
        drain(b)  # ACKs and probes from the punch itself
        b.send(datagram(intros[1], Kind.PROBE, sender=B_ID, key=KEY, sequence=0xDEADBEEF))
        b.send(b"data")
        a_path.recv(timeout=2)
        b.settimeout(2)
        answer = parse_datagram(b.recv(2048), introduction_id=intros[0].introduction_id, key=KEY)

    assert answer == (Kind.ACK, sender_tag(A_ID), 0xDEADBEEF)


def test_peer_path_recv_times_out_when_nothing_arrives(udp) -> None:
    a, b = udp(), udp()
    a_path, b_path = punch_both(a, b, introduce(a, b), **FAST)

    with a_path, b_path:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            a_path.recv(timeout=0.1)
        assert 0.1 <= time.monotonic() - started < 1


def test_peer_path_refuses_to_send_data_that_would_pass_for_a_control_datagram(udp) -> None:
    a, b = udp(), udp()
    a_path, b_path = punch_both(a, b, introduce(a, b), **FAST)

    with a_path, b_path:
        with pytest.raises(ValueError):
            a_path.send(MAGIC + bytes(DATAGRAM_LENGTH - len(MAGIC)))
        a_path.send(MAGIC + b"but longer than a control datagram" * 3)
        assert b_path.recv(timeout=2).startswith(MAGIC)


# ---- the agent's peering (worker_agent/peering.py), without a service ---------------------------


def test_an_agent_answers_at_most_a_few_introductions_at_once_and_refuses_the_rest() -> None:
    import json as json_module
    import threading

    from worker_agent import peering

    sent: list[dict] = []
    release = threading.Event()
    agent = peering.Peering("b", lambda frame: sent.append(json_module.loads(frame)) or True)
    agent.on_peer = lambda path: None
    agent._answer_one = lambda request: release.wait(5)  # stuck answering
    for n in range(peering.MAX_ANSWERING + 2):
        request = {"type": "introduction_request", "introduction_id": f"{n:032x}", "peer_id": "a"}
        assert agent.handle(request)
    agent.handle({"type": "introduction_request", "introduction_id": f"{0:032x}", "peer_id": "a"})
    rejects = [m for m in sent if m["type"] == "introduction_reject"]
    assert len(rejects) == 2 and all("busy" in m["reason"] for m in rejects)  # duplicate ignored
    release.set()


def test_a_start_time_far_ahead_of_this_clock_is_capped() -> None:
    from worker_agent import peering

    agent = peering.Peering("a", lambda frame: True)
    now = time.time()
    assert agent._start_at(now + 0.5) == now + 0.5
    assert agent._start_at(now + 3600) <= time.time() + peering.MAX_START_WAIT
