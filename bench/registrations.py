"""Registration benchmark: N simulated workers doing what the proof of concept's worker does,
against the service and, in the same run, against two comparison servers.

Each worker connects, waits for `welcome` and sends `register_public_ip` (at most --concurrency
handshakes in flight). The clock stops when the registry shows every worker with its reported
address, in `/debug/list_workers` and in `/api/workers/`: what a user waits for. The same flow
runs against
  - baseline: the protocol on FastAPI + uvicorn with the registry in memory
    (bench/baseline_fastapi.py), what the proof of concept was;
  - floor: a bare Channels consumer on daphne with the registry in memory
    (bench/floor_channels.py), what the mandated stack costs before the service does anything;
and the ratios are printed. Server CPU time and memory are read from /proc/<pid>, which is
steadier than wall time on a shared machine. Not a test.

    python bench/registrations.py --workers 2000 --setup default
    python bench/registrations.py --workers 10000 --setup production --repeat 3
    python bench/registrations.py --workers 1000 --extended --hold 120   # + hold and disconnect
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
        # As `make run` logs (INFO): a line per registration and per close.
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
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
    _wait_healthy(url, process, workdir / "server.log")
    return Server(url=url, pid=process.pid, process=process, cleanup=cleanup)


def _psql(url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


BENCH = Path(__file__).resolve().parent


def start_comparison(kind: str, workdir: Path) -> Server:
    """The baseline (FastAPI + uvicorn) or the floor (a bare Channels consumer on daphne)."""
    port = free_port()
    if kind == "baseline":
        argv = [sys.executable, str(BENCH / "baseline_fastapi.py"), "--port", str(port)]
    else:
        argv = [
            sys.executable,
            "-m",
            "daphne",
            "-e",
            f"tcp:port={port}:interface=127.0.0.1:backlog=2048",
            "--verbosity",
            "0",
            "floor_channels:application",
        ]
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    log = (workdir / f"{kind}.log").open("wb")
    process = subprocess.Popen(argv, cwd=BENCH, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, process, workdir / f"{kind}.log")
    return Server(url=url, pid=process.pid, process=process)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            http_get(f"{url}/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server did not start; see {log}")


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
    public_ip: str = ""


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
        if worker.public_ip:  # as the proof of concept's worker does right after its welcome
            await worker.ws.send(json.dumps({"type": "register_public_ip", "ip": worker.public_ip}))


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


def reported_ip(n: int) -> str:
    """A distinct address per simulated worker (shared address space, 100.64.0.0/10)."""
    return f"100.{64 + n // 65536}.{n // 256 % 256}.{n % 256}"


async def listed(url: str, expected: dict[str, str]) -> bool:
    """Whether both views show every expected worker with its reported address."""
    _, body = await asyncio.to_thread(http_get, f"{url}/debug/list_workers")
    shown = json.loads(body)["workers"]
    if any(shown.get(i, {}).get("public_ip") != ip for i, ip in expected.items()):
        return False
    found: dict[str, str | None] = {}
    page = 1
    while True:
        query = f"status=connected&page_size=1000&page={page}"
        _, body = await asyncio.to_thread(http_get, f"{url}/api/workers/?{query}")
        listing = json.loads(body)
        found.update((w["id"], w["public_ip"]) for w in listing["results"])
        if page >= listing["num_pages"]:
            break
        page += 1
    return all(found.get(i) == ip for i, ip in expected.items())


async def whole_flow(
    args: argparse.Namespace, server: Server, kind: str
) -> tuple[dict[str, float | int | str], list[Worker]]:
    """N workers connect, get `welcome`, report their address; the clock stops when the
    registry lists them all with it. Returns the figures and the (still connected) workers."""
    url = server.url
    warmup = Worker("warmup-0", public_ip="100.127.255.254")
    await register(url, warmup, asyncio.Semaphore(1))
    await wait_listed(url, {warmup.worker_id: warmup.public_ip}, timeout=30)
    assert warmup.ws is not None
    await warmup.ws.close()
    workers = [Worker(i, public_ip=reported_ip(n)) for n, i in enumerate(worker_ids(args))]
    expected = {w.worker_id: w.public_ip for w in workers}
    gate = asyncio.Semaphore(args.concurrency)
    await asyncio.sleep(1)
    rss_before = rss_bytes(server.pid)
    cpu_before = cpu_seconds(server.pid)
    profiler = await start_profiler(args, server, "register") if kind == "service" else None
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(register(url, w, gate) for w in workers), return_exceptions=True
    )
    # Memory per connected worker: every worker connected and its address sent, before the
    # views are read (a listing's transient objects are not per-worker state).
    rss_after = rss_bytes(server.pid)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    registered = [w for w in workers if w.welcomed]
    await wait_listed(url, {w.worker_id: w.public_ip for w in registered}, timeout=120)
    elapsed = time.perf_counter() - started
    cpu_spent = cpu_seconds(server.pid) - cpu_before
    stop_profiler(profiler)
    latencies = [w.welcomed - w.connect_started for w in registered]
    results: dict[str, float | int | str] = {
        "registration_failures": len(failures),
        "registrations_per_second": round(len(registered) / elapsed, 1),
        "server_cpu_s_per_1000_registrations": round(cpu_spent / len(registered) * 1000, 3),
        "connect_to_welcome_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "connect_to_welcome_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "all_listed_with_address_s": round(elapsed, 2),
        "server_kib_per_connected_worker": round(
            (rss_after - rss_before) / len(registered) / 1024, 1
        ),
        "listed_with_reported_address": len(expected) if await listed(url, expected) else 0,
    }
    if failures:
        results["first_failure"] = repr(failures[0])[:200]
    return results, registered


async def wait_listed(url: str, expected: dict[str, str], timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not await listed(url, expected):
        if time.perf_counter() > deadline:
            return  # reported: listed_with_reported_address stays below the count
        await asyncio.sleep(0.05)


async def extended_phases(
    args: argparse.Namespace, server: Server, registered: list[Worker]
) -> dict[str, float | int | str]:
    """The service only, after the whole flow: detail-view visibility of a sample, list
    timings, a hold with heartbeats, and everyone disconnecting at once."""
    url = server.url
    results: dict[str, float | int | str] = {}
    gate = asyncio.Semaphore(args.concurrency)
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
    results["server_rss_mib"] = round(rss_bytes(server.pid) / 2**20, 1)
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


TARGETS = ("baseline", "floor", "service")
# Figures compared, and how a ratio reads: service / other for costs, other / service for rates.
COMPARED = (
    ("server_cpu_s_per_1000_registrations", "cost"),
    ("registrations_per_second", "rate"),
    ("connect_to_welcome_p50_ms", "cost"),
    ("connect_to_welcome_p99_ms", "cost"),
    ("all_listed_with_address_s", "cost"),
    ("server_kib_per_connected_worker", "cost"),
)


async def one_round(
    args: argparse.Namespace, workdir: Path, enrolled: list[str]
) -> dict[str, dict[str, float | int | str]]:
    """The whole flow against each target in turn, each on a fresh server."""
    figures: dict[str, dict[str, float | int | str]] = {}
    for kind in args.targets:
        if kind == "service":
            server = start_server(args.setup, workdir, args.security, enrolled)
        else:
            server = start_comparison(kind, workdir)
        try:
            results, registered = await whole_flow(args, server, kind)
            if kind == "service" and args.extended:
                results.update(await extended_phases(args, server, registered))
            else:
                await asyncio.gather(
                    *(w.ws.close() for w in registered if w.ws), return_exceptions=True
                )
        finally:
            server.stop()
        figures[kind] = results
        await asyncio.sleep(2)  # let the machine settle between servers
    return figures


def report(args: argparse.Namespace, rounds: list[dict[str, dict[str, float | int | str]]]) -> None:
    print(
        f"\n== registrations benchmark: {args.setup} set-up, {args.security} mode, "
        f"{args.workers} workers, {args.concurrency} handshakes in flight, "
        f"{len(rounds)} round(s); medians =="
    )
    medians: dict[str, dict[str, float]] = {}
    for kind in args.targets:
        keys = [k for k, v in rounds[0][kind].items() if isinstance(v, int | float)]
        medians[kind] = {k: statistics.median(float(r[kind][k]) for r in rounds) for k in keys}
    header = f"{'figure':40}" + "".join(f"{kind:>12}" for kind in args.targets)
    print(header)
    for key in medians[args.targets[0]]:
        if all(key in medians[kind] for kind in args.targets):
            print(f"{key:40}" + "".join(f"{medians[k][key]:>12g}" for k in args.targets))
    if "service" in args.targets:
        for other in (k for k in args.targets if k != "service"):
            for key, sense in COMPARED:
                service, them = medians["service"][key], medians[other][key]
                ratio = service / them if sense == "cost" else them / service
                print(f"ratio service/{other:9} {key:40} {ratio:6.2f}x")
        for key, value in medians["service"].items():
            if key not in medians.get("baseline", {}):
                print(f"service {key:40} {value:g}")
    for n, figures in enumerate(rounds, 1):
        print(f"round {n}: {json.dumps(figures)}")


def main() -> int:
    global SECURED
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2000)
    parser.add_argument("--setup", choices=["default", "production"], default="default")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are printed")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--extended",
        action="store_true",
        help="after the service's whole flow: detail-view visibility of a sample, list timings, "
        "a hold with heartbeats (--hold) and everyone disconnecting at once",
    )
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to hold with heartbeats")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    parser.add_argument("--sample", type=int, default=200, help="workers timed to visibility")
    parser.add_argument("--list-requests", type=int, default=10)
    parser.add_argument("--profile", help="write a py-spy profile (folded stacks) of the server")
    parser.add_argument("--profile-phase", choices=["register", "close"], default="register")
    parser.add_argument("--security", choices=["open", "secured"], default="open")
    args = parser.parse_args()
    args.targets = [t for t in TARGETS if t in args.targets.split(",")]
    SECURED = args.security == "secured"
    workdir = Path(tempfile.mkdtemp(prefix="rendezvous-bench-"))
    enrolled = ["warmup-0", *worker_ids(args), *sample_ids(args)] if SECURED else []
    rounds = []
    for n in range(args.repeat):
        (workdir / f"round{n + 1}").mkdir()  # a fresh database each round
        rounds.append(asyncio.run(one_round(args, workdir / f"round{n + 1}", enrolled)))
    report(args, rounds)
    troubled = any(
        f.get("dropped_during_hold") or f.get("registration_failures")
        for r in rounds
        for f in r.values()
    )
    if troubled:
        print(f"server logs kept for inspection: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
