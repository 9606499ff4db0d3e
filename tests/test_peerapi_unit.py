"""The peer API's parts alone: file names a receiver accepts, what an exposure lets through, the
stream header and the router over real QUIC in one process (tests/support/quic_pair.py), the
control socket's file and protocol, what the command line prints. End to end with daphne and
running agents: tests/test_cli_e2e.py; across real NAT: tests/test_cli_nat_e2e.py."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import quic_pair
from worker_agent import PeerError, render
from worker_agent.connection import PeerConnection
from worker_agent.control import protocol
from worker_agent.control.client import Exchange, NoAgent
from worker_agent.control.socketfile import ControlSocket, SocketFileError, default_path
from worker_agent.paths.loop import LoopThread
from worker_agent.peerapi import header
from worker_agent.peerapi.errors import BadName, NotExposed, NotServed
from worker_agent.peerapi.exposure import Exposures, parse_endpoint, parse_exposures
from worker_agent.peerapi.files import PARTIAL_DIR, check_name, check_offer, collect, inside
from worker_agent.peerapi.forward import serve_forward
from worker_agent.peerapi.router import Router

pytestmark = pytest.mark.standalone


# ---- names a receiver accepts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("", "not a file name"),
        ("a\\..\\b", "backslash"),
        ("evil\nname", "control"),
        ("nul\x00byte", "control"),
        (f"{PARTIAL_DIR}/x", "partial"),
        ("x" * 256, "longer than 255"),
        (17, "not a file name"),
    ],
)
def test_a_name_that_could_leave_the_receiving_folder_is_refused(name: object, why: str) -> None:
    with pytest.raises(BadName, match=why):
        check_name(name)


@pytest.mark.parametrize("name", ["a.bin", "data/sub/x.csv", "..hidden", "a b/ümlaut", "x.part"])
def test_ordinary_relative_names_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ([{"name": "a", "size": 1}, {"name": "a", "size": 2}], "twice"),
        ([{"name": "a", "size": -1}], "whole number"),
        ([{"name": "a", "size": True}], "whole number"),
        ([{"name": "a", "size": "1"}], "whole number"),
        (["a"], "object"),
    ],
)
def test_an_offer_with_a_name_twice_or_a_bad_size_is_refused(files: list, why: str) -> None:
    with pytest.raises(BadName, match=why):
        check_offer(files, [])


def test_a_link_in_the_receiving_folder_cannot_lead_a_file_outside(tmp_path: Path) -> None:
    root, outside = tmp_path / "inbox", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(BadName, match="outside"):
        inside(root, "sub/x.bin")
    (root / "file-link").symlink_to(outside / "target")
    with pytest.raises(BadName, match="symbolic link"):
        inside(root, "file-link")
    assert inside(root, "new/deeper/x.bin") == root / "new/deeper/x.bin"


def test_a_folder_is_offered_with_relative_names_and_links_are_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "empty").mkdir()
    (data / "a.bin").write_bytes(b"a" * 10)
    (data / "sub" / "b.txt").write_text("b")
    (data / "link").symlink_to("/etc/passwd")
    files, dirs, skipped = collect([str(data), str(tmp_path / "data" / "a.bin")[:-5] + "a.bin"])
    names = [f.name for f in files]
    assert names[:2] == ["data/a.bin", "data/sub/b.txt"] and names[2] == "a.bin"
    assert dirs == ["data/empty"] and skipped == [str(data / "link")]
    with pytest.raises(FileNotFoundError):
        collect([str(tmp_path / "missing")])


# ---- what an exposure lets through -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("8888", ("127.0.0.1", 8888)),
        ("localhost:22", ("127.0.0.1", 22)),
        ("LOCALHOST:22", ("127.0.0.1", 22)),
        ("10.0.0.5:5432", ("10.0.0.5", 5432)),
        ("[::1]:8080", ("::1", 8080)),
        ("db.Internal:5432", ("db.internal", 5432)),
    ],
)
def test_host_and_port_are_read_with_localhost_meaning_127_0_0_1(text: str, endpoint) -> None:
    assert parse_endpoint(text) == endpoint


@pytest.mark.parametrize("text", ["0", "65536", "http", "::1:22", "host:", ":22", "[::1]22"])
def test_a_bad_host_and_port_says_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("]", r"\]")):
        parse_endpoint(text)


def test_an_exposure_lets_through_that_host_and_port_and_nothing_else() -> None:
    exposures = Exposures(["8888", "10.0.0.5:5432"])
    assert exposures.allows(("127.0.0.1", 8888)) and exposures.allows(("localhost", 8888))
    assert exposures.allows(("10.0.0.5", 5432))
    for other in [("0.0.0.0", 8888), ("127.0.0.1", 8889), ("10.0.0.5", 22), ("10.0.0.6", 5432)]:
        assert not exposures.allows(other), other
    handle = exposures.add(("127.0.0.1", 22))
    assert exposures.allows(("127.0.0.1", 22))
    exposures.remove(handle)
    assert not exposures.allows(("127.0.0.1", 22))
    assert exposures.listed() == ["10.0.0.5:5432", "127.0.0.1:8888"]


def test_rendezvous_expose_is_checked_entry_by_entry() -> None:
    assert parse_exposures(" 8888, 127.0.0.1:5432 ,") == ["8888", "127.0.0.1:5432"]
    with pytest.raises(ValueError, match="'99999'"):
        parse_exposures("8888,99999")


# ---- the header and the router over real QUIC ---------------------------------------------------


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("test-peerapi")
    yield thread
    thread.stop()


def connected(loop: LoopThread) -> tuple[PeerConnection, PeerConnection]:
    connections, client, server = quic_pair.pair(loop)
    quic_pair.established(loop, client)
    quic_pair.established(loop, server)
    return connections.client, connections.server


def serve(router: Router, connection: PeerConnection, **kwargs: object) -> None:
    threading.Thread(target=router.serve, args=(connection,), kwargs=kwargs, daemon=True).start()


def test_streams_of_the_host_program_reach_its_on_peer_at_once_and_whole(loop) -> None:
    """A stream that does not start with the header's first byte is handed on without a wait,
    its first bytes put back; the peer API's own stream beside it is answered by its kind."""
    client, server = connected(loop)
    seen: queue.Queue[bytes] = queue.Queue()

    def host_on_peer(connection: PeerConnection) -> None:
        stream = connection.accept_stream(timeout=10)
        seen.put(stream.recv_exactly(14, timeout=10))
        stream.sendall(b"hello yourself")
        stream.shutdown_write()

    exposures = Exposures()
    router = Router("bob", {"forward": lambda r: serve_forward(r, exposures, "bob")})
    serve(router, server, incoming=True, fallback=host_on_peer)
    started = time.monotonic()
    plain = client.open_stream()
    plain.sendall(b"GET / HTTP/1.1")
    assert seen.get(timeout=5) == b"GET / HTTP/1.1"
    assert plain.recv_exactly(14, timeout=5) == b"hello yourself"
    assert time.monotonic() - started < 1.0  # not the peek timeout
    ours = client.open_stream()
    ours.sendall(header.request_bytes({"kind": "forward", "host": "127.0.0.1", "port": 9}))
    refusal = r"alice refused: 127\.0\.0\.1:9 is not exposed"
    with pytest.raises(NotExposed, match=refusal) as refused:
        header.read_reply(ours, "alice")
    assert refused.value.code == "NOT_EXPOSED"


def test_a_peer_api_stream_on_a_connection_this_side_opened_is_refused(loop) -> None:
    """The peer policy says who may reach whom, one way: the peer that was reached cannot turn
    round and use the peer API of the side that reached it."""
    client, server = connected(loop)
    router = Router("alice", {"pipe": lambda r: r.accept()})
    serve(router, client, incoming=False)  # alice opened this connection
    stream = server.open_stream()
    stream.sendall(header.request_bytes({"kind": "pipe"}))
    with pytest.raises(NotServed, match="serves peer-API streams only on connections a peer"):
        header.read_reply(stream, "bob")


def test_an_unknown_kind_a_bad_version_and_a_non_answer_are_told_apart(loop) -> None:
    client, server = connected(loop)
    serve(Router("bob", {}), server, incoming=True)
    stream = client.open_stream()
    stream.sendall(header.request_bytes({"kind": "teleport"}))
    with pytest.raises(NotServed, match="does not serve 'teleport'"):
        header.read_reply(stream, "bob")
    old = client.open_stream()
    old.sendall(header.MAGIC + bytes([9]) + header.encode({"kind": "pipe"}))
    with pytest.raises(Exception, match="version 9") as refused:
        header.read_reply(old, "bob")
    assert refused.value.code == "UNSUPPORTED_VERSION"  # type: ignore[attr-defined]


def test_a_peer_whose_program_takes_the_stream_does_not_serve_the_peer_api(loop) -> None:
    client, server = connected(loop)

    def echo(connection: PeerConnection) -> None:
        with contextlib.suppress(PeerError):  # the test may end first
            stream = connection.accept_stream(timeout=10)
            stream.sendall(stream.recv(timeout=10))
            stream.shutdown_write()

    threading.Thread(target=echo, args=(server,), daemon=True).start()  # no router there
    stream = client.open_stream()
    stream.sendall(header.request_bytes({"kind": "pipe"}))
    with pytest.raises(NotServed, match="does not serve the peer API"):
        header.read_reply(stream, "bob", timeout=5)


# ---- the control socket ---------------------------------------------------------------------


def test_the_control_socket_is_0600_and_a_second_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    first = ControlSocket(path)
    first.open()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
        with pytest.raises(SocketFileError, match=f"another agent already serves {path}"):
            ControlSocket(path).open()
        assert path.exists()  # the refused one left the first one's socket alone
    finally:
        first.close()
    assert not path.exists()


def test_a_socket_left_by_a_dead_agent_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    fresh = ControlSocket(path)
    fresh.open()
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))  # the new one listens there
        probe.close()
    finally:
        fresh.close()


@pytest.mark.parametrize("what", ["file", "others-folder", "others-socket"])
def test_a_path_that_is_not_safe_to_serve_is_refused(tmp_path: Path, what: str) -> None:
    path = tmp_path / "agent.sock"
    if what == "file":
        path.write_text("not a socket")
        match = "is not a socket"
    elif what == "others-folder":
        tmp_path.chmod(0o777)  # writable by anyone, not sticky
        match = "writable by others"
    else:
        if os.getuid() != 0:
            pytest.skip("giving a file to another user needs root")
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        other.close()
        os.chown(path, 65534, 65534)
        match = "belongs to another user"
    try:
        with pytest.raises(SocketFileError, match=match):
            ControlSocket(path).open()
    finally:
        tmp_path.chmod(0o700)
    if what == "file":
        assert path.read_text() == "not a socket"  # nothing lost


def test_the_socket_is_found_beside_the_credential_file_or_where_it_is_told(tmp_path) -> None:
    credential = str(tmp_path / "identity.json")
    assert default_path({"RENDEZVOUS_CREDENTIAL_FILE": credential}) == tmp_path / "identity.sock"
    assert (
        default_path({"RENDEZVOUS_CREDENTIAL_FILE": credential}, 1) == tmp_path / "identity-2.sock"
    )
    told = {"RENDEZVOUS_CONTROL_SOCKET": "/run/x.sock", "RENDEZVOUS_CREDENTIAL_FILE": credential}
    assert default_path(told) == Path("/run/x.sock")
    assert default_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/rendezvous-worker.sock"
    )
    assert default_path({}).name == "control.sock"
    assert default_path({}).parent.name == f"rendezvous-worker-{os.getuid()}"


def test_a_command_with_no_agent_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(NoAgent, match=f"nothing serves {tmp_path / 'none.sock'}") as missing:
        Exchange(tmp_path / "none.sock", "status")
    assert missing.value.code == "NO_AGENT"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b'{"v": 2, "op": "status"}', "UNSUPPORTED_VERSION"),
        (b'{"v": 1, "op": "format_disk"}', "BAD_REQUEST"),
        (b"status", "BAD_REQUEST"),
        (b"[1]", "BAD_REQUEST"),
    ],
)
def test_a_request_of_another_version_or_kind_is_refused_with_its_code(line: bytes, code) -> None:
    with pytest.raises(protocol.ControlError) as refused:
        protocol.parse_request(line)
    assert refused.value.code == code


# ---- what the command line prints -------------------------------------------------------------


def test_a_pong_says_the_path_the_address_and_the_round_trip() -> None:
    relay = {"event": "pong", "peer": "gpu-1", "kind": "relay", "address": None, "ms": 3.14}
    direct = {**relay, "kind": "direct", "address": ["203.0.113.7", 40123], "ms": 0.62}
    assert render.pong(relay) == "pong from gpu-1 via relay in 3.1 ms"
    assert render.pong(direct) == "pong from gpu-1 via direct 203.0.113.7:40123 in 0.6 ms"
    lost = {"event": "timeout", "peer": "gpu-1", "after": 2.0}
    assert render.pong(lost) == "timeout: no pong from gpu-1 within 2 s"


def test_progress_shows_rate_and_eta() -> None:
    import io

    out = io.StringIO()
    progress = render.Progress(out, 100 * 1024 * 1024, terminal=True)
    now = time.monotonic()
    progress._samples.extend([(now - 2, 0), (now, 20 * 1024 * 1024)])
    line = progress.line(20 * 1024 * 1024, now)
    assert line.startswith(" 20.0% [####") and "10.5 MB/s" in line and "ETA 8s" in line
