"""Encrypted peer connections with real daphne and real agents on loopback: the README's example
as written, 8 MB over one stream through the service relay and over the LAN with matching
digests, a transfer in flight while the route moves from the relay to the LAN underneath, a peer
that restarts as itself, an identity an operator resets, and an identity that is not the bound
one. Across real NAT (direct, TURN, the relay): tests/test_paths_e2e.py. Pinning against an
impostor, both ways: tests/test_quic.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.models import PeerConnection as PeerConnectionRecord
from registry.models import Worker
from registry.security import enrolment, identities
from tests.support.processes import REPO, ServerProcess, wait_until
from worker_agent import NoPath, PeerConnection, PeerError, PeerStream, WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)


def digests(accepted: queue.Queue[str]) -> Callable[[WorkerAgent, PeerConnection], None]:
    """An on_peer that answers each stream with the SHA-256 of what arrived on it."""

    def serve(agent: WorkerAgent, conn: PeerConnection) -> None:
        accepted.put(conn.peer_fingerprint or "")
        while True:
            try:
                stream = conn.accept_stream(timeout=60)
            except Exception:
                return
            digest = hashlib.sha256()
            while data := stream.recv(1 << 20, timeout=60):
                digest.update(data)
            stream.sendall(digest.hexdigest().encode())
            stream.shutdown_write()

    return serve


def send_and_check(conn: PeerConnection, size: int) -> bool:
    payload = os.urandom(size)
    stream = conn.open_stream()
    stream.sendall(payload, timeout=120)
    stream.shutdown_write()
    return stream.recv_exactly(64, timeout=120).decode() == hashlib.sha256(payload).hexdigest()


def test_the_readme_example_runs_as_written(server: ServerProcess) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Peer-to-peer") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    example = code.group(1).replace("http://127.0.0.1:8000", server.url)
    result = subprocess.run(
        [sys.executable, "-c", example], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "b'echo:ping' relay" in result.stdout or "b'echo:ping' lan" in result.stdout


def test_the_file_example_of_peer_connections_md_runs_as_written(
    server: ServerProcess, tmp_path: Path
) -> None:
    doc = (REPO / "docs" / "peer-connections.md").read_text()
    receive, send = re.findall(r"```python\n(.*?)```", doc, re.S)[:2]
    for name, code in (("receive.py", receive), ("send.py", send)):
        (tmp_path / name).write_text(code.replace("http://127.0.0.1:8000", server.url))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    original = tmp_path / "model.bin"
    original.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    receiver = subprocess.Popen(
        [sys.executable, str(tmp_path / "receive.py"), str(inbox)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: Worker.objects.filter(id="file-inbox", status="connected").exists(),
            timeout=20,
            what="receive.py registered",
        )
        result = subprocess.run(
            [sys.executable, str(tmp_path / "send.py"), "file-inbox", str(original)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "sent" in result.stdout and "to file-inbox over" in result.stdout
        assert (inbox / "model.bin").read_bytes() == original.read_bytes()
    finally:
        receiver.kill()
        output = receiver.communicate(timeout=10)[0]
    assert "received" in output and "model.bin" in output, output


@pytest.mark.parametrize("udp", [False, True], ids=["service relay", "lan"])
def test_eight_megabytes_arrive_whole_over_one_encrypted_stream(
    server: ServerProcess, agents: Callable[..., WorkerAgent], udp: bool
) -> None:
    accepted: queue.Queue[str] = queue.Queue()
    b = agents(server.url, "b", on_peer=digests(accepted), peer_udp=udp)
    a = agents(server.url, "a", peer_udp=udp)
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect("b", timeout=10) as conn:
        assert conn.peer_fingerprint == b.identity.fingerprint  # pinned, and proven
        assert accepted.get(timeout=10) == a.identity.fingerprint  # both ways
        if udp:
            assert conn.path.wait_for_kind("lan", timeout=10)
        assert send_and_check(conn, 8 * 1024 * 1024)
        assert conn.path_kind == ("lan" if udp else "relay")
        conn.send_datagram(b"unreliable, encrypted")
    record = Worker.objects.get(id="b")
    assert record.certificate_fingerprint == b.identity.fingerprint


def test_closing_a_connection_ends_it_at_the_service_and_at_the_peer(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    answered: queue.Queue[PeerConnection] = queue.Queue()
    b = agents(server.url, "b", on_peer=lambda agent, conn: answered.put(conn), peer_udp=False)
    a = agents(server.url, "a", peer_udp=False)
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect("b", timeout=10) as conn:
        theirs = answered.get(timeout=10)
        conn.send_datagram(b"hello")
        assert theirs.recv_datagram(timeout=5) == b"hello"
    wait_until(lambda: theirs.closed, timeout=5, what="the peer's end closed")
    # The service heard it from the agent (not when a worker went offline, much later): the
    # record is ended, and nothing more is relayed for the pair.
    record = wait_until(
        lambda: PeerConnectionRecord.objects.filter(closed_at__isnull=False).first(),
        timeout=5,
        what="the record of the connection ended",
    )
    assert record.close_reason == "closed"
    assert record.relayed_bytes > 0
    assert a.status()["state"] == "registered" and b.status()["state"] == "registered"


def test_an_agent_that_stops_ends_its_connections_at_the_peer_at_once(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    """A stopping agent says goodbye before its WebSocket closes: the peer's connection ends
    with the close (code CLOSED), instead of waiting for a resume that will not come."""
    answered: queue.Queue[PeerConnection] = queue.Queue()
    b = agents(server.url, "b", on_peer=lambda agent, conn: answered.put(conn), peer_udp=False)
    a = agents(server.url, "a", peer_udp=False)
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    a.connect("b", timeout=10)
    theirs = answered.get(timeout=10)
    stopped = time.monotonic()
    assert a.stop(timeout=10)
    wait_until(lambda: theirs.closed, timeout=5, what="the peer's end closed")
    assert time.monotonic() - stopped < 5.0
    assert "the agent stopped" in (theirs.closed_reason or ""), theirs.closed_reason


def test_with_the_relay_off_the_handshake_waits_for_the_udp_path_and_runs_on_it(
    server_factory: Callable[..., ServerProcess], agents: Callable[..., WorkerAgent]
) -> None:
    server = server_factory(env={"RENDEZVOUS_RELAY": "off"}).start()
    b = agents(server.url, "b", on_peer=digests(queue.Queue()))
    a = agents(server.url, "a")
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect("b", timeout=10) as conn:
        assert conn.path_kind == "lan"
        assert conn.path.stats.sent.get("relay", 0) == 0  # not one packet through the service
        assert conn.handshake_seconds is not None and conn.handshake_seconds < 1.0  # no resend
        assert send_and_check(conn, 1024 * 1024)
    # A worker without UDP has no route at all: told at once, not after the timeout.
    c = agents(server.url, "c", peer_udp=False)
    c.start()
    assert c.wait_registered(10)
    started = time.monotonic()
    with pytest.raises(NoPath, match="does not relay"):
        c.connect("b", timeout=10)
    assert time.monotonic() - started < 5


def test_many_streams_at_once_and_datagrams_both_ways(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    def serve(agent: WorkerAgent, conn: PeerConnection) -> None:
        def digest_of(stream: PeerStream) -> None:
            digest = hashlib.sha256()
            while data := stream.recv(1 << 16, timeout=60):
                digest.update(data)
            stream.sendall(digest.hexdigest().encode())
            stream.shutdown_write()

        def echo_datagrams() -> None:
            with contextlib.suppress(PeerError, TimeoutError):
                while True:
                    conn.send_datagram(b"echo:" + conn.recv_datagram(timeout=60))

        threading.Thread(target=echo_datagrams, daemon=True).start()
        with contextlib.suppress(PeerError, TimeoutError):
            while True:  # each stream in a thread of its own: they run at the same time
                stream = conn.accept_stream(timeout=60)
                threading.Thread(target=digest_of, args=(stream,), daemon=True).start()

    b = agents(server.url, "b", on_peer=serve)
    a = agents(server.url, "a")
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect("b", timeout=10) as conn:
        payloads = [os.urandom(200_000 + n) for n in range(16)]
        streams = [conn.open_stream() for _ in payloads]
        assert len({s.stream_id for s in streams}) == 16

        def send(stream: PeerStream, payload: bytes) -> None:
            for offset in range(0, len(payload), 10_000):  # interleaved with the others
                stream.sendall(payload[offset : offset + 10_000])
            stream.shutdown_write()

        senders = [
            threading.Thread(target=send, args=pair) for pair in zip(streams, payloads, strict=True)
        ]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(60)
        answers = [s.recv_exactly(64, timeout=60).decode() for s in streams]
        assert answers == [hashlib.sha256(p).hexdigest() for p in payloads]
        echoed = set()
        for n in range(20):  # unreliable: some may be lost, most must come back
            conn.send_datagram(b"d%d" % n)
            with contextlib.suppress(TimeoutError):
                echoed.add(conn.recv_datagram(timeout=2))
        assert len(echoed) >= 15 and echoed <= {b"echo:d%d" % n for n in range(20)}


def test_a_transfer_in_flight_survives_the_route_moving_under_it(
    server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    accepted: queue.Queue[str] = queue.Queue()
    b = agents(server.url, "b", on_peer=digests(accepted))
    a = agents(server.url, "a")
    b.start()
    a.start()
    assert a.wait_registered(10) and b.wait_registered(10)
    with a.connect("b", timeout=10) as conn:
        assert conn.path_kind == "relay"  # the handshake ran through the service
        moves: list[tuple[str | None, str | None]] = []
        conn.on_path_change(lambda path, old, new: moves.append((old, new)))
        finished = threading.Event()
        outcome: list[bool] = []
        threading.Thread(
            target=lambda: (outcome.append(send_and_check(conn, 16 * 1024 * 1024)), finished.set())
        ).start()
        assert finished.wait(120)
        assert outcome == [True]
        assert ("relay", "lan") in moves and conn.path_kind == "lan"
        assert conn.path.stats.sent.get("relay", 0) > 0 and conn.path.stats.sent.get("lan", 0) > 0


def test_a_peer_that_restarts_comes_back_with_the_same_identity(
    server: ServerProcess, agents: Callable[..., WorkerAgent], tmp_path: Path
) -> None:
    file = tmp_path / "b.json"
    first = agents(server.url, "b", on_peer=digests(queue.Queue()), credential_file=file)
    first.start()
    a = agents(server.url, "a")
    a.start()
    assert first.wait_registered(10) and a.wait_registered(10)
    with a.connect("b") as conn:
        pinned = conn.peer_fingerprint
    assert json.loads(file.read_text())["private_key"].startswith("-----BEGIN PRIVATE KEY")
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    assert first.stop(5)
    second = agents(server.url, "b", on_peer=digests(queue.Queue()), credential_file=file)
    second.start()
    assert second.wait_registered(10)
    with a.connect("b") as conn:  # a new connection, the same identity
        assert conn.peer_fingerprint == pinned == second.identity.fingerprint
        assert send_and_check(conn, 100_000)


def new_key() -> str:
    from datetime import timedelta

    return enrolment.create_enrolment_key(name="t", expires_in=timedelta(days=1), reusable=True)[1]


def test_secured_mode_pins_the_enrolled_identity_until_an_operator_resets_it(
    server_factory: Callable[..., ServerProcess],
    agents: Callable[..., WorkerAgent],
    tmp_path: Path,
) -> None:
    server = server_factory(env={"RENDEZVOUS_SECURITY_MODE": "secured"}).start()
    key = new_key()
    file = tmp_path / "b.json"
    b = agents(
        server.url, "b", enrolment_key=key, credential_file=file, on_peer=digests(queue.Queue())
    )
    a = agents(server.url, "a", enrolment_key=key)
    b.start()
    a.start()
    assert b.wait_registered(15) and a.wait_registered(15)
    enrolled = b.identity.fingerprint
    assert Worker.objects.get(id="b").certificate_fingerprint == enrolled
    assert b.stop(5)
    # The worker loses its key pair (a fresh disk, say) but keeps its credential: another
    # certificate under a bound id is refused, with the reason.
    stored = json.loads(file.read_text())
    file.write_text(json.dumps({**stored, "private_key": "", "certificate": ""}))
    stranger = agents(server.url, "b", credential_file=file, on_peer=digests(queue.Queue()))
    stranger.start()
    assert stranger.wait_finished(15) and stranger.state == "refused"
    assert "not the identity bound" in (stranger.status()["final_reason"] or "")
    assert Worker.objects.get(id="b").certificate_fingerprint == enrolled
    # An operator resets the identity: the next certificate presented is bound and pinned.
    assert identities.reset(["b"]) == 1
    renewed = agents(server.url, "b", credential_file=file, on_peer=digests(queue.Queue()))
    renewed.start()
    assert renewed.wait_registered(15)
    assert renewed.identity.fingerprint != enrolled
    wait_until(
        lambda: Worker.objects.get(id="b").certificate_fingerprint == renewed.identity.fingerprint,
        timeout=10,
        what="the new identity to be bound",
    )
    with a.connect("b", timeout=10) as conn:
        assert conn.peer_fingerprint == renewed.identity.fingerprint
        assert send_and_check(conn, 100_000)
