"""`rendezvous-worker` on the command line, end to end: a real daphne, agents as the command
runs them (child processes, each with its control socket), and each command as a user types
it. Open mode unless a test says otherwise; across real NAT: tests/test_cli_nat_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from registry.models import PeerConnection
from tests.support.cli_agents import Agent, Lines
from tests.support.processes import REPO, ServerProcess, free_port, wait_until
from worker_agent import WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)

Fleet = Callable[..., Agent]


@pytest.fixture
def fleet(server: ServerProcess, tmp_path: Path) -> Iterator[Fleet]:
    started: list[Agent] = []

    def start(worker_id: str, *, url: str | None = None, **env: str) -> Agent:
        agent = Agent(url or server.url, worker_id, tmp_path, **env).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


class DigestServer:
    """A TCP server that answers each connection, once the client has half-closed it, with the
    SHA-256 of what it sent: a forward that lost the half-close, or a byte, fails it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    @staticmethod
    def _one(client: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := client.recv(1 << 16):
            digest.update(data)
        client.sendall(digest.hexdigest().encode())
        client.close()

    def close(self) -> None:
        self.sock.close()


def through(port: int, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(1 << 16), b"")).decode()


def failure(result: subprocess.CompletedProcess[str], code: str) -> str:
    """A command's one-line failure with `code`, exit 1."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rendezvous-worker: "), result.stderr
    assert lines[0].endswith(f"({code})"), lines[0]
    return lines[0]


def still_running(command: subprocess.Popen[str]) -> bool:
    """True while `command` runs; its exit status and output if it ended (for a wait_until
    predicate: a command that failed says why at once instead of a timeout later)."""
    if command.poll() is None:
        return True
    out, err = command.communicate()
    raise AssertionError(f"the command ended with {command.returncode}:\n{out}{err}")


def tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_file()
        else "dir"
        for path in sorted(root.rglob("*"))
    }


# ---- the agent and its socket --------------------------------------------------------------------


def test_a_command_with_no_agent_running_says_so_in_one_line_and_exits_1(tmp_path) -> None:
    for command in (["status"], ["ping", "gpu-1"], ["send", "gpu-1", str(tmp_path)]):
        result = subprocess.run(
            [sys.executable, "-m", "worker_agent", *command],
            cwd=REPO,
            env={"PATH": os.environ["PATH"], "RENDEZVOUS_CONTROL_SOCKET": str(tmp_path / "x")},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "no agent is running: nothing serves" in failure(result, "NO_AGENT")


def test_one_agent_per_socket_and_the_socket_a_killed_agent_left_is_replaced(
    fleet: Fleet, tmp_path: Path
) -> None:
    first = fleet("solo")
    second = Agent(first.env["RENDEZVOUS_SERVICE_URL"], "solo-2", tmp_path)
    second.env["RENDEZVOUS_CONTROL_SOCKET"] = str(first.socket)
    second.start(registered=False)
    assert second.process is not None and second.process.wait(30) == 1
    assert f"another agent already serves {first.socket}" in second.log()
    assert first.status()["worker"]["worker_id"] == "solo"  # still the first one's
    first.stop(signal.SIGKILL)
    assert first.socket.exists()  # left behind
    first.start()  # the same socket, replaced
    assert first.status()["worker"]["registered"]


def test_count_n_agents_each_serve_a_socket_of_their_own(
    server: ServerProcess, tmp_path: Path
) -> None:
    fleet = Agent(server.url, "fleet", tmp_path)
    fleet.argv = ["--count", "2"]
    fleet.start()  # registered: asked through the first agent's socket
    try:
        assert fleet.status()["worker"]["worker_id"] == "fleet-1"
        second = Agent(server.url, "fleet-2", tmp_path)  # its socket: fleet-2.sock
        assert second.status()["worker"]["worker_id"] == "fleet-2"
    finally:
        fleet.stop()
    assert not fleet.socket.exists() and not second.socket.exists()


# ---- ping, status, peers -------------------------------------------------------------------------


def test_ping_says_each_pongs_path_until_direct_and_reuses_the_connection(fleet: Fleet) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    result = laptop.command("ping", "gpu-1", "--until-direct", "--interval", "0.2")
    lines = result.stdout.strip().splitlines()
    # The first pong comes back through the relay, unless the LAN path was quicker to come up
    # than the first ping to go out (the connection starts on the relay either way: history).
    pong = r"pong from gpu-1 via (relay|lan [\d.]+:\d+) in \d+\.\d ms"
    assert all(re.fullmatch(pong, line) for line in lines), lines
    assert re.fullmatch(r"pong from gpu-1 via lan [\d.]+:\d+ in \d+\.\d ms", lines[-1]), lines
    again = laptop.command("ping", "gpu-1", "--count", "2", "--interval", "0.1").stdout
    assert again.count("via lan") == 2  # the same connection, already on its LAN path
    record = PeerConnection.objects.get()  # one introduction for both: what the admin lists
    assert (record.requester_id, record.target_id, record.outcome) == (
        "laptop-3", "gpu-1", "connected",
    )  # fmt: skip
    status = laptop.status()
    [connection] = status["connections"]
    assert connection["peer_id"] == "gpu-1" and connection["kind"] == "lan"
    assert [kind for _, kind in connection["history"]][:2] == ["relay", "lan"]
    assert connection["use"] == "commands" and connection["opened_by"] == "laptop-3"
    assert connection["bytes_sent"] > 0 and connection["bytes_received"] > 0
    assert connection["rtt_ms"] is not None and connection["opened_at"] > 0
    assert gpu.status()["connections"][0]["use"] == "served"
    text = laptop.command("status").stdout
    assert "worker     laptop-3 (registered" in text
    assert re.search(r"gpu-1\s+lan\s+[\d.]+:\d+\s+\d+s\s", text), text


def test_ping_says_why_a_peer_cannot_be_reached(
    fleet: Fleet, server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    laptop = fleet("laptop-3")
    shy = agents(server.url, "shy")  # a program's agent without on_peer: it refuses
    shy.start()
    assert shy.wait_registered(10)
    offline = failure(laptop.command("ping", "nobody", check=False), "PEER_UNAVAILABLE")
    assert "nobody is not connected" in offline
    refused = failure(laptop.command("ping", "shy", check=False), "PEER_REFUSED")
    assert "does not accept peer connections" in refused


def test_peers_lists_the_workers_this_one_may_reach_online_or_not(fleet: Fleet) -> None:
    gone = fleet("old-box")
    gone.stop()
    fleet("gpu-1")
    laptop = fleet("laptop-3")
    wait_until(
        lambda: (
            {
                p["worker_id"]: p["online"]
                for p in json.loads(laptop.command("peers", "--json").stdout)["peers"]
            }
            == {"gpu-1": True, "old-box": False}
        ),
        timeout=15,
        what="old-box offline, gpu-1 online",
    )
    text = laptop.command("peers").stdout
    assert re.search(r"old-box\s+no \(last seen \d{4}-\d\d-\d\d \d\d:\d\d\)", text), text
    assert re.search(r"gpu-1\s+yes", text), text


# ---- forward and expose --------------------------------------------------------------------------


def test_forward_carries_many_connections_at_once_each_half_closed(fleet: Fleet) -> None:
    echo = DigestServer()
    closer = socket.create_server(("127.0.0.1", 0))  # accepts, then closes at once
    exposed = f"{echo.port},127.0.0.1:{closer.getsockname()[1]}"
    fleet("gpu-1", RENDEZVOUS_EXPOSE=exposed)
    laptop = fleet("laptop-3")
    local, local_closer = free_port(), free_port()
    with (
        laptop.running("forward", str(local), f"gpu-1:{echo.port}") as forward,
        laptop.running("forward", f"127.0.0.1:{local_closer}",
                       f"gpu-1:localhost:{closer.getsockname()[1]}") as forward_closer,
    ):  # fmt: skip
        out = Lines(forward.stdout)
        assert f"forwarding 127.0.0.1:{local} -> gpu-1 127.0.0.1:{echo.port}" in out.until(
            "forwarding"
        )
        Lines(forward_closer.stdout).until("forwarding")
        payloads = [os.urandom(1024 * 1024 + n) for n in range(8)]
        answers: dict[int, str] = {}
        clients = [
            threading.Thread(target=lambda n=n: answers.__setitem__(n, through(local, payloads[n])))
            for n in range(8)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        assert answers == {n: hashlib.sha256(p).hexdigest() for n, p in enumerate(payloads)}
        # The exposed side ends its TCP connection: the local one ends too, not left waiting.
        threading.Thread(target=lambda: closer.accept()[0].close(), daemon=True).start()
        with socket.create_connection(("127.0.0.1", local_closer), timeout=10) as client:
            client.settimeout(10)
            assert client.recv(10) == b""
        out.until("closed, 1.0 MiB sent")
    assert forward.returncode == 0  # Ctrl-C ends a forward: its normal end
    echo.close()
    closer.close()


def test_a_forward_to_what_is_not_exposed_is_refused_and_logged_on_both_sides(
    fleet: Fleet,
) -> None:
    echo = DigestServer()
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    refused = failure(
        laptop.command("forward", str(free_port()), f"gpu-1:{echo.port}", check=False),
        "NOT_EXPOSED",
    )
    assert f"gpu-1 refused: 127.0.0.1:{echo.port} is not exposed" in refused
    assert "refused a forward stream from laptop-3" in gpu.log()
    assert "command forward failed" in laptop.log() and "NOT_EXPOSED" in laptop.log()
    local = free_port()
    with gpu.running("expose", str(echo.port)) as exposing:
        Lines(exposing.stdout).until(f"exposing 127.0.0.1:{echo.port}")
        with laptop.running("forward", str(local), f"gpu-1:{echo.port}") as forward:
            Lines(forward.stdout).until("forwarding")
            assert through(local, b"now it is") == hashlib.sha256(b"now it is").hexdigest()
            assert gpu.status()["exposed"] == [f"127.0.0.1:{echo.port}"]
    assert gpu.status()["exposed"] == []  # withdrawn with the command
    failure(laptop.command("forward", str(local), f"gpu-1:{echo.port}", check=False), "NOT_EXPOSED")
    echo.close()


def test_a_forward_from_a_port_in_use_fails_at_once(fleet: Fleet) -> None:
    fleet("gpu-1", RENDEZVOUS_EXPOSE="9")
    laptop = fleet("laptop-3")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = failure(
            laptop.command("forward", str(port), "gpu-1:9", check=False), "PORT_IN_USE"
        )
    assert f"127.0.0.1:{port} is in use" in in_use
    bad = laptop.command("forward", "99999", "gpu-1:9", check=False)
    assert bad.returncode == 1 and "the port must be a number from 1 to 65535" in bad.stderr


# ---- pipe ----------------------------------------------------------------------------------------


def test_tar_through_a_pipe_arrives_whole(fleet: Fleet, tmp_path: Path) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    failure(laptop.command("pipe", "gpu-1", input="", check=False), "NO_LISTENER")
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (source / "note.txt").write_text("tar through a pipe\n")
    target.mkdir()
    accept = subprocess.Popen(
        f"{sys.executable} -m worker_agent pipe --accept --from laptop-3 < /dev/null | tar x",
        shell=True, cwd=target, env=gpu.command_env(), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert accept.stderr is not None
    Lines(accept.stderr).until("waiting for a pipe from laptop-3")
    send = subprocess.run(
        f"tar c -C {source} . | {sys.executable} -m worker_agent pipe gpu-1",
        shell=True, cwd=REPO, env=laptop.command_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert send.returncode == 0, send.stderr
    assert accept.wait(30) == 0
    assert tree(target) == tree(source)


# ---- send and receive ----------------------------------------------------------------------------


def test_a_folder_is_sent_and_received_checked_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    data = tmp_path / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "empty").mkdir()
    (data / "model.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (data / "sub" / "deeper" / "notes.txt").write_text("hello")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    refused = failure(laptop.command("send", "gpu-1", str(data), check=False), "NOT_RECEIVING")
    assert "gpu-1 refused: not receiving files" in refused and not any(inbox.iterdir())
    with gpu.running("receive", "--dir", str(inbox), "--from", "laptop-3") as receiving:
        Lines(receiving.stdout).until("waiting for files from laptop-3")
        sent = laptop.command("send", "gpu-1", str(data)).stdout
        assert receiving.wait(30) == 0
    assert "sent data/model.bin, SHA-256 checked" in sent
    assert re.search(r"sent 2 files \(6\.0 MiB; 6\.0 MiB over the wire\) to gpu-1", sent), sent
    assert tree(inbox / "data") == tree(data)
    assert not (inbox / ".rendezvous-partial").exists()


def test_a_file_with_other_contents_is_replaced_only_with_overwrite(
    fleet: Fleet, tmp_path: Path
) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    inbox, file = tmp_path / "inbox", tmp_path / "report.csv"
    inbox.mkdir()
    file.write_text("version 1\n")

    def send(*receive: str) -> subprocess.CompletedProcess[str]:
        with gpu.running("receive", "--dir", str(inbox), *receive) as receiving:
            Lines(receiving.stdout).until("waiting for files")
            return laptop.command("send", "gpu-1", str(file), check=False)

    assert send().returncode == 0
    assert "the peer has it already" in send().stdout  # same contents: nothing to do
    file.write_text("version 2\n")
    exists = failure(send(), "EXISTS")
    assert "report.csv exists on gpu-1 with other contents: nothing was sent" in exists
    assert (inbox / "report.csv").read_text() == "version 1\n"  # nothing lost
    assert send("--overwrite").returncode == 0
    assert (inbox / "report.csv").read_text() == "version 2\n"


def test_names_that_would_leave_the_receiving_folder_are_refused_whole(
    fleet: Fleet, server: ServerProcess, agents: Callable[..., WorkerAgent], tmp_path: Path
) -> None:
    """A hostile peer's offer, made by hand through the peer API: refused before a byte."""
    from worker_agent.peerapi.errors import BadName

    gpu = fleet("gpu-1")
    hostile = agents(server.url, "hostile", peer_api=True)
    hostile.start()
    assert hostile.wait_registered(10) and hostile.peer_api is not None
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with gpu.running("receive", "--dir", str(inbox)) as receiving:
        lines = Lines(receiving.stdout)
        lines.until("waiting for files")
        offer = {"kind": "files", "files": [{"name": "ok.txt", "size": 1},
                 {"name": "../escaped.txt", "size": 1}], "dirs": []}  # fmt: skip
        refused = pytest.raises(BadName, match=r"'\.\./escaped\.txt': empty, '\.' and '\.\.'")
        with refused, hostile.peer_api.pool.stream("gpu-1", offer):
            pass
        assert receiving.wait(30) == 1
    assert "(BAD_NAME)" in receiving.stderr.read()  # type: ignore[union-attr]
    assert not any(inbox.iterdir()) and not (tmp_path / "escaped.txt").exists()


def test_an_interrupted_send_resumes_where_it_stopped(fleet: Fleet, tmp_path: Path) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    inbox, big = tmp_path / "inbox", tmp_path / "big.bin"
    inbox.mkdir()
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    partial = inbox / ".rendezvous-partial" / "big.bin"
    with gpu.running("receive", "--dir", str(inbox)) as receiving:
        told = Lines(receiving.stdout)
        told.until("waiting for files")  # a send before it would be refused (NOT_RECEIVING)
        with laptop.running("send", "gpu-1", str(big)) as sending:
            wait_until(
                lambda: (
                    still_running(sending)
                    and partial.exists()
                    and partial.stat().st_size > 8 * 1024 * 1024
                ),
                timeout=60,
                what="8 MiB to arrive",
            )
            sending.send_signal(signal.SIGINT)  # Ctrl-C
            assert sending.wait(30) == 130
        assert "kept for resume" in told.until("big.bin: the sender stopped")
        assert receiving.wait(30) == 1
    kept = partial.stat().st_size
    assert kept > 8 * 1024 * 1024
    assert "cancelled; send again to resume" in sending.stderr.read()  # type: ignore[union-attr]
    with gpu.running("receive", "--dir", str(inbox)) as receiving:
        Lines(receiving.stdout).until("waiting for files")
        again = laptop.command("send", "gpu-1", str(big)).stdout
        assert receiving.wait(30) == 0
    resumed_at = re.search(r"resuming at ([\d.]+) MiB", again)
    assert resumed_at and abs(float(resumed_at.group(1)) - kept / 2**20) < 0.1, again
    wire = re.search(r"96\.0 MiB; ([\d.]+) MiB over the wire", again)
    assert wire and float(wire.group(1)) < 96 - 8, again
    assert (
        hashlib.sha256((inbox / "big.bin").read_bytes()).digest()
        == hashlib.sha256(big.read_bytes()).digest()
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_full_disk_keeps_the_partial_file_and_the_next_send_resumes(
    fleet: Fleet, tmp_path: Path
) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    inbox, data = tmp_path / "small-disk", tmp_path / "data.bin"
    inbox.mkdir()
    data.write_bytes(os.urandom(12 * 1024 * 1024))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(inbox)], check=True)
    try:
        with gpu.running("receive", "--dir", str(inbox)) as receiving:
            Lines(receiving.stdout).until("waiting for files")
            full = failure(laptop.command("send", "gpu-1", str(data), check=False), "NO_SPACE")
            assert receiving.wait(30) == 1
        assert "the disk is full after" in full and "the partial file is kept" in full
        partial = inbox / ".rendezvous-partial" / "data.bin"
        kept = partial.stat().st_size
        assert 4 * 1024 * 1024 < kept <= 8 * 1024 * 1024
        subprocess.run(["mount", "-o", "remount,size=32m", str(inbox)], check=True)
        with gpu.running("receive", "--dir", str(inbox)) as receiving:
            Lines(receiving.stdout).until("waiting for files")
            again = laptop.command("send", "gpu-1", str(data)).stdout
            assert receiving.wait(30) == 0
        assert "resuming at" in again
        assert (inbox / "data.bin").read_bytes() == data.read_bytes()
    finally:
        subprocess.run(["umount", str(inbox)], check=False)


def test_a_file_that_vanishes_mid_send_is_reported_and_the_others_arrive(
    fleet: Fleet, tmp_path: Path
) -> None:
    gpu, laptop = fleet("gpu-1"), fleet("laptop-3")
    inbox, folder = tmp_path / "inbox", tmp_path / "run"
    inbox.mkdir()
    folder.mkdir()
    (folder / "a-big.bin").write_bytes(os.urandom(48 * 1024 * 1024))
    (folder / "b-later.log").write_text("gone before its turn")
    (folder / "c-last.txt").write_text("still here")
    partial = inbox / ".rendezvous-partial" / "run" / "a-big.bin"
    with gpu.running("receive", "--dir", str(inbox)) as receiving:
        Lines(receiving.stdout).until("waiting for files")
        with laptop.running("send", "gpu-1", str(folder)) as sending:
            wait_until(
                lambda: still_running(sending) and partial.exists(),
                timeout=60,
                what="the first file to start",
            )
            (folder / "b-later.log").unlink()  # while the first one is still on its way
            assert sending.wait(60) == 1
            said = sending.stdout.read() + sending.stderr.read()  # type: ignore[operator]
        assert receiving.wait(30) == 0
    assert "run/b-later.log: run/b-later.log could not be opened: No such file" in said
    assert "1 of 3 files failed" in said and "(FILE_CHANGED)" in said
    assert (inbox / "run" / "a-big.bin").read_bytes() == (folder / "a-big.bin").read_bytes()
    assert (inbox / "run" / "c-last.txt").read_text() == "still here"


# ---- when things go wrong around the command -----------------------------------------------------


def test_a_command_hears_when_its_agent_stops_or_dies_under_it(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet("gpu-1", RENDEZVOUS_EXPOSE="9")
    laptop = fleet("laptop-3")
    with laptop.running("forward", str(free_port()), "gpu-1:9") as forward:
        Lines(forward.stdout).until("forwarding")
        laptop.stop(signal.SIGTERM)  # a restart: stopped first
        assert forward.wait(30) == 1
        assert "the agent is stopping (AGENT_STOPPING)" in forward.stderr.read()  # type: ignore[union-attr]
    laptop.start()
    with laptop.running("receive", "--dir", str(tmp_path)) as receiving:
        Lines(receiving.stdout).until("waiting for files")
        laptop.stop(signal.SIGKILL)  # a crash: no goodbye
        assert receiving.wait(30) == 1
        said = receiving.stderr.read()  # type: ignore[union-attr]
    assert "the agent stopped during the command" in said and "(AGENT_GONE)" in said


def test_the_peer_policy_refuses_forward_pipe_and_send_with_its_reason(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(env={"RENDEZVOUS_PEER_POLICY": "rules"}).start()  # and no rule
    gpu = Agent(server.url, "gpu-1", tmp_path, RENDEZVOUS_EXPOSE="9").start()
    laptop = Agent(server.url, "laptop-3", tmp_path).start()
    try:
        reason = "no peer policy rule lets laptop-3 reach gpu-1"
        for command in (
            ["forward", str(free_port()), "gpu-1:9"],
            ["pipe", "gpu-1"],
            ["send", "gpu-1", str(tmp_path / "gpu-1.log")],
            ["ping", "gpu-1"],
        ):
            denied = failure(laptop.command(*command, input="", check=False), "POLICY_DENIED")
            assert reason in denied, command
        assert PeerConnection.objects.filter(outcome="refused").count() == 4
    finally:
        laptop.stop()
        gpu.stop()


def test_secured_mode_agents_keep_their_socket_beside_their_credential(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from registry.security import enrolment

    server = server_factory(env={"RENDEZVOUS_SECURITY_MODE": "secured"}).start()
    key = enrolment.create_enrolment_key(name="cli", reusable=True, expires_in=timedelta(days=1))[1]
    started = []
    for worker_id in ("gpu-1", "laptop-3"):
        folder = tmp_path / worker_id
        folder.mkdir()
        agent = Agent(
            server.url, worker_id, folder,
            RENDEZVOUS_ENROLMENT_KEY=key, RENDEZVOUS_CREDENTIAL_FILE=str(folder / "identity.json"),
        )  # fmt: skip
        del agent.env["RENDEZVOUS_CONTROL_SOCKET"]  # the default: beside the credential file
        agent.socket = folder / "identity.sock"
        started.append(agent.start())
    gpu, laptop = started
    try:
        assert "pong from gpu-1 via" in laptop.command("ping", "gpu-1", "--count", "1").stdout
        (tmp_path / "secret.txt").write_text("enrolled")
        with gpu.running("receive", "--dir", str(tmp_path / "gpu-1")) as receiving:
            Lines(receiving.stdout).until("waiting for files")
            laptop.command("send", "gpu-1", str(tmp_path / "secret.txt"))
            assert receiving.wait(30) == 0
        assert (tmp_path / "gpu-1" / "secret.txt").read_text() == "enrolled"
    finally:
        for agent in started:
            agent.stop()


def test_a_host_programs_on_peer_still_gets_its_streams_beside_the_peer_api(
    fleet: Fleet, server: ServerProcess, agents: Callable[..., WorkerAgent]
) -> None:
    def echo(agent: WorkerAgent, conn) -> None:
        stream = conn.accept_stream(timeout=30)
        stream.sendall(b"echo:" + stream.recv(timeout=10))
        stream.shutdown_write()

    box = agents(server.url, "box", peer_api=True, on_peer=echo)
    program = agents(server.url, "program")
    box.start()
    program.start()
    assert box.wait_registered(10) and program.wait_registered(10)
    laptop = fleet("laptop-3")
    assert "pong from box via" in laptop.command("ping", "box", "--count", "1").stdout
    with program.connect("box") as conn:
        stream = conn.open_stream()
        stream.sendall(b"ping")
        assert stream.recv(timeout=10) == b"echo:ping"


def test_the_standalone_agent_accepts_its_environment_or_says_what_is_wrong(tmp_path) -> None:
    for env, message in (
        ({"RENDEZVOUS_EXPOSE": "8888,http"}, "RENDEZVOUS_EXPOSE: 'http'"),
        ({"RENDEZVOUS_INBOX": str(tmp_path / "missing")}, "is not a folder"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "worker_agent"],
            cwd=REPO,
            env={"PATH": os.environ["PATH"], "RENDEZVOUS_SERVICE_URL": "http://127.0.0.1:9", **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr


def test_an_inbox_takes_files_without_a_receive_running(fleet: Fleet, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fleet("gpu-1", RENDEZVOUS_INBOX=str(inbox))
    laptop = fleet("laptop-3")
    (tmp_path / "a.txt").write_text("a")
    laptop.command("send", "gpu-1", str(tmp_path / "a.txt"))
    assert (inbox / "a.txt").read_text() == "a"
    shutil.rmtree(inbox / "a.txt", ignore_errors=True)


# ---- the README ----------------------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The command-line example of the README's peer-to-peer section, one command per entry."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Peer-to-peer") :]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()
            and not line.startswith("#")]  # fmt: skip


def test_the_readmes_command_line_example_runs_as_written(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Each line as a user types it, in a terminal of its own where the README says so, the
    next one once the last is ready (its agent answers, its command says it waits). Only the
    addresses change: the test's service, free ports for 8888, 9888 and the health ports."""
    served = DigestServer()
    ports = {"8888": str(served.port), "9888": str(free_port()), "8081": "0", "8082": "0"}
    (tmp_path / "dataset" / "part").mkdir(parents=True)
    (tmp_path / "dataset" / "part" / "rows.csv").write_text("a,b\n1,2\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    running: list[subprocess.Popen[str]] = []
    outputs: dict[str, str] = {}
    try:
        for command in readme_commands():
            line = command.replace("http://127.0.0.1:8000", server.url)
            for written, port in ports.items():
                line = re.sub(rf"\b{written}\b", port, line)
            line = line.replace("rendezvous-worker", f"{sys.executable} -m worker_agent")
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                env[name] = value
                continue
            if (
                "worker_agent receive" in line
                or line.endswith("&")
                or line.endswith("worker_agent")
            ):
                process = subprocess.Popen(
                    _exec(line.rstrip("& ")), shell=True, cwd=tmp_path, env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )  # fmt: skip
                running.append(process)
                ready = "commands on" if line.endswith("worker_agent") else ""
                Lines(process.stdout).until(
                    ready or ("waiting" if "receive" in line else "forwarding")
                )
                continue
            result = subprocess.run(line, shell=True, cwd=tmp_path, env=env, text=True,
                                    capture_output=True, timeout=60)  # fmt: skip
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            outputs[command.split()[1]] = result.stdout
        assert "via lan" in outputs["ping"].strip().splitlines()[-1], outputs["ping"]
        assert "sent 1 file" in outputs["send"]
        assert (tmp_path / "inbox" / "dataset" / "part" / "rows.csv").read_text() == "a,b\n1,2\n"
        assert "gpu-box-7" in outputs["status"]
        assert through(int(ports["9888"]), b"forwarded") == hashlib.sha256(b"forwarded").hexdigest()
    finally:
        for process in reversed(running):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        served.close()


def _exec(line: str) -> str:
    """The shell line with `exec` before its command (after its assignments): the signal that
    stops it then reaches the program, not a shell around it."""
    words = line.split()
    first = next(i for i, word in enumerate(words) if "=" not in word)
    return " ".join([*words[:first], "exec", *words[first:]])
