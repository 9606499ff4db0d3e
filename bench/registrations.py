"""Registration benchmark: N simulated workers (asyncio clients) against a real service.

Starts the service itself (`manage.py serve`, as in production) on a fresh database, unless
--url is given, and reads the server's CPU time and memory from /proc, which is steadier than
wall time on a shared machine. Prints one block of figures per run; not a test.

    python bench/registrations.py --workers 1000 --setup default
    python bench/registrations.py --workers 10000 --setup production --hold 120
    python bench/registrations.py --workers 1000 --security secured

With --security secured every simulated worker is enrolled beforehand (a credential bound to
its id, written straight into the database) and presents its credential: the reconnect path
of a secured fleet. The JSON views are read with an API token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
API_TOKEN = "rvt_bench"  # seeded with the credentials in secured mode
# Set in main(): send credentials and the API token (secured mode).
SECURED = False

SEED_CREDENTIALS = """
import hashlib, sys
from django.utils import timezone
from registry.models import ApiToken, Worker
now = timezone.now()
def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()
Worker.objects.bulk_create(
    [Worker(id=i, first_seen=now, last_seen=now, credential_digest=digest("rvc_" + i),
            credential_prefix=("rvc_" + i)[:12], credential_issued_at=now)
     for i in sys.stdin.read().split()],
    batch_size=2000,
)
ApiToken.objects.create(name="bench", digest=digest("API_TOKEN"), prefix="API_TOKEN",
                        created_at=now)
""".replace("API_TOKEN", API_TOKEN)


def credential(worker_id: str) -> str:
    return f"rvc_{worker_id}"


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ---- the server process -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def http_get(url: str, timeout: float = 30.0) -> tuple[float, bytes]:
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {API_TOKEN}"} if SECURED else {}
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=timeout
    ) as response:
        body = response.read()
    return time.perf_counter() - started, body


@dataclass
class Server:
    url: str
    pid: int
    process: subprocess.Popen[bytes] | None = None
    cleanup: list = field(default_factory=list)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for step in reversed(self.cleanup):
            step()


def start_server(setup: str, workdir: Path, security: str, enrolled: list[str]) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "RENDEZVOUS_DATA_DIR": str(workdir),
        "RENDEZVOUS_INSTANCE_NAME": f"bench-{port}",
        # The bench measures registrations, not the flood guard.
        "RENDEZVOUS_RATE_LIMIT": "100",
        "RENDEZVOUS_SECURITY_MODE": security,
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    cleanup = []
    if setup == "production":
        database = f"rendezvous_bench_{port}"
        admin_url = os.environ.get(
            "BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
        )
        _psql(admin_url, f"CREATE DATABASE {database}")
        cleanup.append(lambda: _psql(admin_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        env["DATABASE_URL"] = admin_url.rsplit("/", 1)[0] + f"/{database}"
        env["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        env["RENDEZVOUS_REDIS_PREFIX"] = f"bench{port}"
        env["SECRET_KEY"] = "bench-only-secret"
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    if security == "secured":
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", SEED_CREDENTIALS],
            cwd=REPO,
            env=env,
            check=True,
            input="\n".join(enrolled).encode(),
        )
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            http_get(f"{url}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise SystemExit(f"server did not start; see {workdir / 'server.log'}")
    return Server(url=url, pid=process.pid, process=process, cleanup=cleanup)


def _psql(url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


# ---- the simulated fleet ------------------------------------------------------------------------


@dataclass
class Worker:
    worker_id: str
    ws: websockets.ClientConnection | None = None
    connect_started: float = 0.0
    welcomed: float = 0.0
    dropped: bool = False
    drop_reason: str = ""
    heartbeats: int = 0


async def register(url: str, worker: Worker, gate: asyncio.Semaphore) -> None:
    async with gate:
        worker.connect_started = time.perf_counter()
        worker.ws = await websockets.connect(
            f"{url.replace('http', 'ws', 1)}/ws/register/{worker.worker_id}",
            ping_interval=None,  # the server pings; answering is automatic
            open_timeout=60,
            max_queue=4,
            additional_headers={"Authorization": f"Bearer {credential(worker.worker_id)}"}
            if SECURED
            else None,
        )
        welcome = json.loads(await worker.ws.recv())
        assert welcome["type"] == "welcome", welcome
        worker.welcomed = time.perf_counter()


async def hold(worker: Worker, interval: float, until: float) -> None:
    """Heartbeats at the interval the service asks for, starting at a random phase."""
    assert worker.ws is not None
    phase = interval * (hash(worker.worker_id) % 1000) / 1000
    await asyncio.sleep(min(phase, max(0.0, until - time.perf_counter())))
    try:
        while time.perf_counter() < until:
            await worker.ws.send('{"type":"heartbeat"}')
            await worker.ws.recv()
            worker.heartbeats += 1
            await asyncio.sleep(min(interval, max(0.0, until - time.perf_counter())))
    except websockets.ConnectionClosed as closed:
        worker.dropped = True
        received = closed.rcvd.code if closed.rcvd else None
        sent = closed.sent.code if closed.sent else None
        worker.drop_reason = f"{received}/{sent}"


async def start_profiler(
    args: argparse.Namespace, server: Server, phase: str
) -> subprocess.Popen[bytes] | None:
    """py-spy on the server for one phase (folded stacks), when --profile names a file."""
    if not args.profile or args.profile_phase != phase:
        return None
    command = ["py-spy", "record", "--pid", str(server.pid), "--format", "raw", "--rate", "200"]
    profiler = subprocess.Popen(
        [*command, "--output", args.profile, "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1)
    return profiler


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, server: Server) -> dict[str, float | int | str]:
    url = server.url
    results: dict[str, float | int | str] = {
        "setup": args.setup,
        "security": args.security,
        "workers": args.workers,
    }
    workers = [Worker(worker_id) for worker_id in worker_ids(args)]
    gate = asyncio.Semaphore(args.concurrency)
    await asyncio.sleep(1)
    rss_before = rss_bytes(server.pid)
    cpu_before = cpu_seconds(server.pid)
    profiler = await start_profiler(args, server, "register")
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(register(url, w, gate) for w in workers), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    cpu_spent = cpu_seconds(server.pid) - cpu_before
    stop_profiler(profiler)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    results["registration_failures"] = len(failures)
    if failures:
        results["first_failure"] = repr(failures[0])[:200]
    registered = [w for w in workers if w.welcomed]
    results["registrations_per_second"] = round(len(registered) / elapsed, 1)
    results["server_cpu_s_per_1000_registrations"] = round(cpu_spent / len(registered) * 1000, 3)
    latencies = [w.welcomed - w.connect_started for w in registered]
    results["connect_to_welcome_p50_ms"] = round(percentile(latencies, 0.5) * 1000, 1)
    results["connect_to_welcome_p99_ms"] = round(percentile(latencies, 0.99) * 1000, 1)

    # Visible in the list: a fresh sample of workers, each looked up right after its welcome.
    sample = [Worker(worker_id) for worker_id in sample_ids(args)]
    visible: list[float] = []
    for worker in sample:
        await register(url, worker, gate)
        while True:
            _, body = await asyncio.to_thread(http_get, f"{url}/api/workers/{worker.worker_id}/")
            if json.loads(body)["status"] == "connected":
                visible.append(time.perf_counter() - worker.connect_started)
                break
    results["connect_to_visible_p50_ms"] = round(percentile(visible, 0.5) * 1000, 1)
    results["connect_to_visible_p99_ms"] = round(percentile(visible, 0.99) * 1000, 1)

    await asyncio.sleep(2)
    connected = len(registered) + len(sample)
    results["server_rss_mib"] = round(rss_bytes(server.pid) / 2**20, 1)
    results["server_kib_per_connected_worker"] = round(
        (rss_bytes(server.pid) - rss_before) / connected / 1024, 1
    )
    for name, path in (
        ("debug_list_workers", "/debug/list_workers"),
        ("api_workers", "/api/workers/"),
    ):
        timings = []
        for _ in range(args.list_requests):
            took, body = await asyncio.to_thread(http_get, f"{url}{path}")
            timings.append(took)
        if name == "debug_list_workers":
            results["listed_connected"] = json.loads(body)["connected_workers_count"]
        results[f"{name}_median_ms"] = round(statistics.median(timings) * 1000, 1)
        results[f"{name}_max_ms"] = round(max(timings) * 1000, 1)

    everyone = registered + sample
    interval = args.heartbeat_interval
    cpu_before = cpu_seconds(server.pid)
    hold_started = time.perf_counter()
    until = hold_started + args.hold
    await asyncio.gather(*(hold(w, interval, until) for w in everyone))
    hold_elapsed = time.perf_counter() - hold_started
    results["hold_seconds"] = round(hold_elapsed, 1)
    results["heartbeats_sent"] = sum(w.heartbeats for w in everyone)
    results["server_cpu_percent_during_hold"] = round(
        (cpu_seconds(server.pid) - cpu_before) / hold_elapsed * 100, 1
    )
    results["dropped_during_hold"] = sum(w.dropped for w in everyone)
    if results["dropped_during_hold"]:
        reasons: dict[str, int] = {}
        for w in everyone:
            if w.dropped:
                reasons[w.drop_reason] = reasons.get(w.drop_reason, 0) + 1
        results["drop_close_codes_received/sent"] = json.dumps(reasons)

    profiler = await start_profiler(args, server, "close")
    closed_at = time.perf_counter()
    await asyncio.gather(*(w.ws.close() for w in everyone if w.ws), return_exceptions=True)
    results["client_close_seconds"] = round(time.perf_counter() - closed_at, 2)
    while True:
        _, body = await asyncio.to_thread(http_get, f"{url}/debug/list_workers")
        if json.loads(body)["connected_workers_count"] == 0:
            break
        if time.perf_counter() - closed_at > 120:
            break
        await asyncio.sleep(0.1)
    results["seconds_until_registry_shows_0"] = round(time.perf_counter() - closed_at, 2)
    stop_profiler(profiler)
    return results


def worker_ids(args: argparse.Namespace) -> list[str]:
    return [f"bench-{n:06d}" for n in range(args.workers)]


def sample_ids(args: argparse.Namespace) -> list[str]:
    return [f"probe-{n:04d}" for n in range(args.sample)]


def main() -> int:
    global SECURED
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--setup", choices=["default", "production"], default="default")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold with heartbeats")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--sample", type=int, default=200, help="workers timed to visibility")
    parser.add_argument("--list-requests", type=int, default=10)
    parser.add_argument("--profile", help="write a py-spy profile (folded stacks) of the server")
    parser.add_argument("--profile-phase", choices=["register", "close"], default="register")
    parser.add_argument("--security", choices=["open", "secured"], default="open")
    args = parser.parse_args()
    SECURED = args.security == "secured"
    workdir = Path(tempfile.mkdtemp(prefix="rendezvous-bench-"))
    enrolled = worker_ids(args) + sample_ids(args) if SECURED else []
    server = start_server(args.setup, workdir, args.security, enrolled)
    try:
        results = asyncio.run(run(args, server))
    finally:
        server.stop()
    print(
        f"\n== registrations benchmark: {args.setup} set-up, {args.security} mode, "
        f"{args.workers} workers =="
    )
    for key, value in results.items():
        print(f"{key:40} {value}")
    print(json.dumps(results))
    if results.get("dropped_during_hold") or results.get("registration_failures"):
        print(f"server log kept for inspection: {workdir / 'server.log'}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
