"""Relay fairness: what one pair at its byte budget costs another pair relayed by the service.

One service on loopback (`manage.py serve`: daphne, SQLite and the in-memory layer, as `make
run`), and two pairs through its relay:

- the victim: two worker agents with `peer_udp=False` (the relay is their only route), each in
  a process of its own, on an encrypted connection: `--pings` ping-pongs of 64 bytes on one
  stream (the round trip of each), then `--bulk-seconds` of sending on another (MB/s at the
  receiver, from the first byte sent to the last byte received);
- the flooder: two raw WebSocket clients (no QUIC and no agent: next to no CPU of their own on
  a shared machine), introduced to each other; one sends relay frames at the relay's byte budget
  (RENDEZVOUS_RELAY_BYTES_PER_SECOND, 32 MiB/s) in frames of 6,710 bytes, which puts it at the
  frame budget too (5,000 a second); the other does the same back (`--one-way`: it only reads).

Each round measures the victim idle (no flooder), then loaded (the flooder running). The summary
gives the medians of the rounds, loaded / idle ratios, what the flooder got through, and
daphne's CPU use while the victim measured (cores: CPU-seconds per second). Prints its figures;
not a test.

    flock /work/heavy.lock .venv/bin/python bench/relay_fairness.py [--rounds 3] [--pings 2000]
        [--bulk-seconds 5] [--one-way] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PING = 64
BUDGET = 32 * 1024 * 1024  # RENDEZVOUS_RELAY_BYTES_PER_SECOND's default
FRAME_BUDGET = 5000  # RENDEZVOUS_RELAY_FRAMES_PER_SECOND's default
# Frames of this size put a sender at both budgets at once: 5,000 frames of 6,710 bytes a second.
FRAME_BYTES = BUDGET // FRAME_BUDGET


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ---- the victim: worker agents, one process each -------------------------------------------------


def victim_answer(url: str, worker_id: str) -> None:
    """Answers encrypted connections: a stream that starts with P is echoed, one that starts
    with B is read to its end and answered with when its first and last bytes arrived."""
    from worker_agent import PeerConnection, PeerError, WorkerAgent

    def serve(stream: Any) -> None:
        kind = stream.recv_exactly(1, timeout=60)
        if kind == b"P":
            while data := stream.recv(PING, timeout=600):
                stream.sendall(data)
            return
        received, first, last = 0, None, None
        while data := stream.recv(1 << 20, timeout=60):
            last = time.monotonic()
            first = first or last
            received += len(data)
        stream.sendall(json.dumps({"bytes": received, "first": first, "last": last}).encode())
        stream.shutdown_write()

    def on_peer(agent: WorkerAgent, conn: PeerConnection) -> None:
        while True:
            try:
                stream = conn.accept_stream(timeout=3600)
            except (TimeoutError, PeerError):
                return
            threading.Thread(target=serve, args=(stream,), daemon=True).start()

    agent = WorkerAgent(url, worker_id, ip_echo_url="", on_peer=on_peer, peer_udp=False)
    agent.start()
    if not agent.wait_registered(30):
        raise SystemExit("victim answer: not registered")
    print(json.dumps({"registered": worker_id}), flush=True)
    threading.Event().wait()


def victim_measure(url: str, worker_id: str, peer: str, pings: int, bulk_seconds: float) -> dict:
    from worker_agent import WorkerAgent

    agent = WorkerAgent(url, worker_id, ip_echo_url="", peer_udp=False)
    agent.start()
    if not agent.wait_registered(30):
        return {"error": "not registered"}
    try:
        with agent.connect(peer, timeout=15) as conn:
            stream = conn.open_stream()
            stream.sendall(b"P")
            payload = b"p" * PING
            for _ in range(20):  # the stream's first round trips, and the path warmed
                stream.sendall(payload)
                stream.recv_exactly(PING, timeout=10)
            rtts, began = [], time.monotonic()
            for _ in range(pings):
                started = time.monotonic()
                stream.sendall(payload)
                stream.recv_exactly(PING, timeout=10)
                rtts.append(1000 * (time.monotonic() - started))
            stream.close()
            bulk = conn.open_stream()
            chunk = os.urandom(1 << 20)
            started = time.monotonic()
            bulk.sendall(b"B")
            while time.monotonic() - started < bulk_seconds:
                bulk.sendall(chunk, timeout=60)
            bulk.shutdown_write()
            answer = b""
            while part := bulk.recv(4096, timeout=600):
                answer += part
            reply = json.loads(answer)
            kind = conn.path_kind
            ended = time.monotonic()
    finally:
        agent.stop(5)
    return {
        "kind": kind,
        "ping_p50_ms": round(statistics.median(rtts), 2),
        "ping_p99_ms": round(percentile(rtts, 99), 2),
        "bulk_mb_per_s": round(reply["bytes"] / 1e6 / (reply["last"] - started), 2),
        "began": began,
        "ended": ended,
    }


# ---- the flooder: two raw WebSocket clients ------------------------------------------------------


def introduced(url: str) -> tuple[Any, Any, str]:
    """flood-a and flood-b on raw sockets (tests/support/raw_websocket.py), introduced."""
    from tests.support.raw_websocket import RawWebSocket, text_frame

    host, port = url.removeprefix("http://").rsplit(":", 1)

    def registered(worker_id: str) -> RawWebSocket:
        ws = RawWebSocket(host, int(port), f"/ws/register/{worker_id}")
        assert ws.status == 101, ws.status
        return ws

    def next_of(ws: RawWebSocket, kind: str) -> dict:
        while True:
            _, payload = ws.read_frame()
            message = json.loads(payload)
            if message["type"] == kind:
                return message

    a, b = registered("flood-a"), registered("flood-b")
    a.send_raw(
        text_frame(
            json.dumps({"type": "connect_request", "peer_id": "flood-b", "request_id": "flood",
                        "protocol_version": 3, "transport": "datagrams"})
        )
    )  # fmt: skip
    introduction_id = next_of(b, "introduction_request")["introduction_id"]
    b.send_raw(
        text_frame(
            json.dumps({"type": "introduction_accept", "introduction_id": introduction_id,
                        "protocol_version": 3})
        )
    )  # fmt: skip
    next_of(a, "introduction")
    next_of(b, "introduction")
    return a, b, introduction_id


def flood(url: str, rate: float, size: int, both: bool, stop: threading.Event) -> dict:
    """Introduce flood-a to flood-b, then send relay frames of `size` bytes from a to b (and from
    b to a if `both`) at `rate` bytes a second each, until `stop`; the other side reads them.

    The frames are built once, masked with a zero key (RFC 6455 allows any key; XOR with zero
    leaves the payload as it is), and written in batches; the reader counts bytes without
    parsing them: the flooder costs the shared machine next to nothing of its own."""
    a, b, introduction_id = introduced(url)
    datagram = size - 19  # the relay header and one length
    payload = b"\x01" + bytes.fromhex(introduction_id) + datagram.to_bytes(2, "big")
    payload += os.urandom(datagram)
    frame = struct.pack("!BBH", 0x82, 0x80 | 126, len(payload)) + b"\0\0\0\0" + payload
    batch_frames = max(1, int(rate / len(payload) / 200))  # 5 ms worth
    batch = frame * batch_frames
    counts = {"sent": 0, "received": 0}
    lock = threading.Lock()

    def send(ws: Any) -> None:
        started, sent = time.monotonic(), 0
        while not stop.is_set():
            delay = started + sent / rate - time.monotonic()  # paced: the budget, not more
            if delay > 0:
                stop.wait(delay)
                continue
            ws.sock.sendall(batch)
            sent += batch_frames * len(payload)
            with lock:
                counts["sent"] += batch_frames * len(payload)

    def read(ws: Any) -> None:
        ws.sock.settimeout(0.5)
        while not stop.is_set():
            try:
                data = ws.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                return
            with lock:
                counts["received"] += len(data)

    threads = [threading.Thread(target=read, args=(ws,), daemon=True) for ws in (a, b)]
    threads += [
        threading.Thread(target=send, args=(ws,), daemon=True) for ws in ((a, b) if both else (a,))
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    stop.wait()
    seconds = time.monotonic() - started
    for thread in threads:
        thread.join(2)
    a.close()
    b.close()
    return {
        "seconds": round(seconds, 1),
        "sent_mb_per_s": round(counts["sent"] / 1e6 / seconds, 2),
        # What the readers got, WebSocket framing included (and the odd error frame).
        "received_mb_per_s": round(counts["received"] / 1e6 / seconds, 2),
    }


def flood_main(url: str, rate: float, size: int, both: bool) -> None:
    """Floods until SIGTERM, then prints what it got through."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps(flood(url, rate, size, both, stop)), flush=True)


# ---- the run -------------------------------------------------------------------------------------


class Service:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "RENDEZVOUS_DATA_DIR": str(workdir),
            "RENDEZVOUS_INSTANCE_NAME": f"fairness-{self.port}",
            "RENDEZVOUS_SECURITY_MODE": "open",
            "LOG_LEVEL": "INFO",
        }
        env.pop("DATABASE_URL", None)
        env.pop("REDIS_URL", None)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True
        )
        self.log = (workdir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the service did not start; see {workdir / 'server.log'}")

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    @contextmanager
    def sampled(self):
        """daphne's CPU time every 50 ms meanwhile: (monotonic time, CPU-seconds) pairs."""
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                samples.append((time.monotonic(), self.cpu()))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            done.set()
            thread.join()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def role(*args: str, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        text=True,
    )


def last_json(process: subprocess.Popen[str], timeout: float) -> dict:
    out, _ = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"no output (exit {process.returncode})"}


@contextmanager
def flooding(service: Service, args: argparse.Namespace, log: Path):
    flooder = role(
        "flood", "--url", service.url, "--rate", str(args.rate),
        "--frame-bytes", str(args.frame_bytes), *([] if args.one_way else ["--both-ways"]),
        log=log,
    )  # fmt: skip
    time.sleep(2.0)  # introduced, and at its rate
    result: dict = {}
    try:
        yield result
    finally:
        flooder.send_signal(signal.SIGTERM)
        result.update(last_json(flooder, 30))


def measure(service: Service, args: argparse.Namespace, log: Path) -> dict:
    with service.sampled() as samples:
        process = role(
            "victim-measure", "--url", service.url, "--id", "victim-a", "--peer", "victim-b",
            "--pings", str(args.pings), "--bulk-seconds", str(args.bulk_seconds), log=log,
        )  # fmt: skip
        result = last_json(process, 600)
    began, ended = result.pop("began", None), result.pop("ended", None)
    during = [(t, cpu) for t, cpu in samples if began is not None and began <= t <= ended]
    if len(during) >= 2:
        (t0, cpu0), (t1, cpu1) = during[0], during[-1]
        result["daphne_cpu"] = round((cpu1 - cpu0) / (t1 - t0), 2)
    return result


def main_run(args: argparse.Namespace) -> int:
    workdir = Path(args.logs or tempfile.mkdtemp(prefix="rendezvous-fairness-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "roles.log"
    service = Service(workdir)
    answer = role("victim-answer", "--url", service.url, "--id", "victim-b", log=log)
    try:
        assert answer.stdout is not None
        json.loads(answer.stdout.readline())
        rounds: list[tuple[dict, dict, dict]] = []
        for n in range(args.rounds):
            idle = measure(service, args, log)
            print(f"round {n + 1} idle:   {json.dumps(idle)}", flush=True)
            with flooding(service, args, log) as flooder:
                loaded = measure(service, args, log)
            print(f"round {n + 1} loaded: {json.dumps(loaded)}", flush=True)
            print(f"round {n + 1} flooder: {json.dumps(flooder)}", flush=True)
            rounds.append((idle, loaded, flooder))
    finally:
        answer.kill()
        service.stop()
    report(rounds, args)
    print(f"logs: {workdir}")
    return 0


def report(rounds: list[tuple[dict, dict, dict]], args: argparse.Namespace) -> None:
    def median(phase: int, key: str) -> float:
        values = [r[phase][key] for r in rounds if key in r[phase]]
        return round(statistics.median(values), 2) if values else float("nan")

    print(
        f"\nvictim: {args.pings} pings of {PING} bytes, then {args.bulk_seconds:g} s of bulk, over "
        f"QUIC on the relay; flooder at {args.rate:g} x the byte budget "
        f"({args.rate * BUDGET / 1e6:.1f} MB/s) in frames of {args.frame_bytes} bytes, "
        f"{'one way' if args.one_way else 'both ways'}; {len(rounds)} rounds"
    )
    print("| figure (median of rounds) | idle | loaded | loaded / idle |")
    print("|---|---|---|---|")
    for key, label in (
        ("ping_p50_ms", "victim ping p50 (ms)"),
        ("ping_p99_ms", "victim ping p99 (ms)"),
        ("bulk_mb_per_s", "victim bulk (MB/s)"),
        ("daphne_cpu", "daphne CPU (cores)"),
    ):
        idle, loaded = median(0, key), median(1, key)
        print(f"| {label} | {idle} | {loaded} | {loaded / idle:.2f} |")
    print(
        f"flooder: sent {median(2, 'sent_mb_per_s')} MB/s, received "
        f"{median(2, 'received_mb_per_s')} MB/s"
    )
    p99 = median(1, "ping_p99_ms") / median(0, "ping_p99_ms")
    print(f"target, loaded p99 within 2x idle: {'met' if p99 <= 2 else 'MISSED'} ({p99:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "role",
        nargs="?",
        default="run",
        choices=["run", "victim-answer", "victim-measure", "flood"],
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--bulk-seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=1.0, help="the flooder's rate / the budget")
    parser.add_argument("--frame-bytes", type=int, default=FRAME_BYTES, help="the flooder's frames")
    parser.add_argument("--one-way", action="store_true", help="one of the flooders sends")
    parser.add_argument("--both-ways", action="store_true", help=argparse.SUPPRESS)  # the role
    parser.add_argument("--logs", help="keep the service's and the roles' logs here")
    parser.add_argument("--url")
    parser.add_argument("--id")
    parser.add_argument("--peer")
    args = parser.parse_args()
    if args.role == "victim-answer":
        victim_answer(args.url, args.id)
    elif args.role == "victim-measure":
        result = victim_measure(args.url, args.id, args.peer, args.pings, args.bulk_seconds)
        print(json.dumps(result))
    elif args.role == "flood":
        flood_main(args.url, args.rate * BUDGET, args.frame_bytes, args.both_ways)
    else:
        return main_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
