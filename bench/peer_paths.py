"""Peer path benchmark: time to first byte per NAT scenario, failure time, relay throughput.

Needs root (network namespaces and iptables, as tests/test_paths_e2e.py) and coturn. Builds the
tests' NAT topology (tests/support/netns.py): five NAT sites, the service, two STUN listeners,
coturn and a redis-server in the public namespace. Then, in one run:

1. Time to first byte, p50/p99 over `--count` connects per scenario: connect() until the
   peer's echo of the first datagram is back, and until the path reaches its best kind.
2. Failure time for a peer that is not there.
3. Throughput for one pair, 1,200-byte datagrams as fast as the path takes them, measured at
   the receiver (first to last byte): raw UDP between the same namespaces (the baseline), the
   service relay through one instance, across two instances (Redis between them), and the
   direct and TURN paths. Service CPU-seconds per relayed MB from /proc of the daphne
   processes.

    sudo .venv/bin/python bench/peer_paths.py [--count 20] [--seconds 5]

Prints its figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.netns import (  # noqa: E402
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    TURN_PORT,
    NatKind,
    NatTopology,
    netns_unavailable_reason,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TURN_SECRET = "bench-turn-secret-0123456789"
REDIS_PORT = 6390
AGENT = [sys.executable, str(REPO / "bench" / "path_agent.py")]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Bench:
    def __init__(self, net: NatTopology, database_url: str, log_dir: Path) -> None:
        self.net = net
        self.database_url = database_url
        self.log_dir = log_dir
        self.services: dict[str, tuple[str, subprocess.Popen[Any]]] = {}
        self.answering: list[subprocess.Popen[Any]] = []

    def serve(self, name: str, port: int, **env: str) -> None:
        environment = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "HOST": SERVICE_IP,
            "PORT": str(port),
            "ALLOWED_HOSTS": SERVICE_IP,
            "RENDEZVOUS_SECURITY_MODE": "open",
            "RENDEZVOUS_INSTANCE_NAME": f"bench-{name}",
            "RENDEZVOUS_STUN_SERVERS": (
                f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
            ),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        log = f"service-{name}.log"
        process = self.net.python(
            self.net.public, "manage.py", "serve", env=environment, log_name=log
        )
        self.services[name] = (f"http://{SERVICE_IP}:{port}", process)
        wait_for(
            lambda: "Rendezvous on" in (self.log_dir / log).read_text(errors="replace"),
            30,
            f"service {name}",
        )
        time.sleep(1.0)  # daphne binds right after printing its address line

    def url(self, name: str) -> str:
        return self.services[name][0]

    def pid(self, name: str) -> int:
        return self.services[name][1].pid

    def answer(
        self,
        namespace: str,
        service: str,
        worker_id: str,
        *extra: str,
        mode: str = "answer",
        prefix: tuple[str, ...] = (),
    ) -> None:
        """Start an answering agent; `prefix` goes before it (`taskset -c 1`, say)."""
        process = self.net.popen(
            namespace,
            [*prefix, *AGENT, mode, "--url", self.url(service), "--id", worker_id, *extra],
            stdout=subprocess.PIPE,
            stderr=(self.log_dir / f"{worker_id}.log").open("ab"),
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if "registered" not in line:
            raise RuntimeError(f"{worker_id} did not register: {line}")
        self.answering.append(process)

    def stop_answering(self) -> None:
        for process in self.answering:
            process.terminate()
            process.wait(10)
        self.answering.clear()

    def run(self, namespace: str, argv: list[str], timeout: float = 600) -> dict[str, Any]:
        """Run a path agent to its end: its JSON line, or what went wrong instead."""
        process = self.net.popen(
            namespace,
            argv,
            stdout=subprocess.PIPE,
            stderr=(self.log_dir / "agents.log").open("ab"),
            text=True,
        )
        try:
            stdout, _ = process.communicate(timeout=timeout)
            return json.loads(stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            process.kill()
            return {"error": f"{type(exc).__name__}: {exc}"}


def scenarios(bench: Bench, count: int) -> list[tuple[str, dict[str, Any]]]:
    net = bench.net
    s = net.sites
    rows = [
        # name, service, from, to, kinds to wait for
        ("LAN (two workers, one NAT)", "plain", s[0].workers[0], s[0].workers[1], "lan"),
        ("cone <-> cone", "plain", s[0].workers[0], s[1].worker, "direct,lan"),
        ("cone <-> symmetric, TURN", "turn", s[1].worker, s[2].worker, "turn,direct,lan"),
        ("symmetric <-> symmetric, TURN", "turn", s[2].worker, s[3].worker, "turn,direct,lan"),
        ("cone <-> symmetric, no TURN", "plain", s[1].worker, s[2].worker, ""),
        ("symmetric <-> symmetric, no TURN", "plain", s[2].worker, s[3].worker, ""),
        ("UDP dropped at one NAT", "turn", s[4].worker, s[1].worker, ""),
    ]
    results = []
    for n, (name, service, frm, to, kinds) in enumerate(rows):
        if name.startswith("UDP"):
            net.block_udp(s[4])
        try:
            bench.answer(to, service, f"b{n}")
            args = ["--url", bench.url(service), "--id", f"a{n}", "--peer", f"b{n}"]
            args += ["--count", str(count), "--wait", "10"]
            if kinds:
                args += ["--wait-kind", kinds]
            outcome = bench.run(frm, [*AGENT, "ttfb", *args])
        finally:
            bench.stop_answering()
            if name.startswith("UDP"):
                net.unblock_udp(s[4])
        print(f"  {name}: {outcome}", flush=True)
        results.append((name, outcome))
    return results


def throughput(bench: Bench, seconds: float) -> dict[str, dict[str, Any]]:
    net = bench.net
    s = net.sites
    figures: dict[str, dict[str, Any]] = {}
    # The baseline: plain UDP from a worker's namespace, through its NAT, to the public one.
    receiver = net.popen(
        net.public,
        [*AGENT, "udp-recv", "--bind", f"{SERVICE_IP}:9000", "--seconds", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    receiver.stdout.readline()
    bench.run(s[0].worker, [*AGENT, "udp-send", "--to", f"{SERVICE_IP}:9000",
                            "--seconds", str(seconds)])  # fmt: skip
    received = receiver.communicate(timeout=60)[0]
    figures["raw UDP (worker -> NAT -> public)"] = json.loads(received.strip().splitlines()[-1])
    cases = [
        # name, service of A, service of B, A's namespace, B's namespace, extra, kind
        ("service relay, one instance", "plain", "plain", s[0].workers[0], s[1].worker,
         ["--no-udp"], ""),
        ("service relay, two instances (Redis)", "redis-a", "redis-b", s[0].workers[0],
         s[1].worker, ["--no-udp"], ""),
        ("LAN (two workers, one NAT)", "plain", "plain", s[0].workers[0], s[0].workers[1], [],
         "lan"),
        ("direct (cone <-> cone)", "plain", "plain", s[0].workers[0], s[1].worker, [], "direct"),
        ("TURN (cone <-> symmetric)", "turn", "turn", s[1].worker, s[2].worker, [], "turn"),
    ]  # fmt: skip
    for n, (name, service_a, service_b, source, target, extra, kind) in enumerate(cases):
        bench.answer(target, service_b, f"tb{n}", *extra)
        services = {service_a, service_b}
        before = {name: cpu_seconds(bench.pid(name)) for name in services}
        args = ["--url", bench.url(service_a), "--id", f"ta{n}", "--peer", f"tb{n}"]
        args += ["--seconds", str(seconds), *extra]
        if kind:
            args += ["--wait-kind", kind]
        outcome = bench.run(source, [*AGENT, "blast", *args])
        bench.stop_answering()
        cpu = sum(cpu_seconds(bench.pid(name)) - before[name] for name in services)
        if outcome.get("received_mb"):
            outcome["service_cpu_s"] = round(cpu, 2)
            outcome["service_cpu_s_per_mb"] = round(cpu / outcome["received_mb"], 4)
        print(f"  {name}: {outcome}", flush=True)
        figures[name] = outcome
    return figures


@contextmanager
def public_services(
    kinds: list[NatKind], workers: list[int], logs: Path | None, prefix: str, **redis_env: str
) -> Iterator[Bench]:
    """The NAT topology with its public side running: two STUN listeners, coturn, a
    redis-server, and the services on a migrated SQLite database: `plain` (8000), `turn`
    (8001, with TURN credentials) and `redis-a` / `redis-b` (8002, 8003: two instances over
    Redis, with `redis_env` too). Every process and namespace is gone when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        log_dir = logs or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite:///{log_dir / 'bench.sqlite3'}"
        env = {**os.environ, "DATABASE_URL": database_url}
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True
        )
        with NatTopology(kinds, workers=workers, log_dir=log_dir) as net:
            net.start_stun()
            net.start_turn(secret=TURN_SECRET)
            net.popen(
                net.public,
                ["redis-server", "--bind", SERVICE_IP, "--port", str(REDIS_PORT), "--save", "",
                 "--protected-mode", "no", "--appendonly", "no"],
                log_name="redis.log",
            )  # fmt: skip
            bench = Bench(net, database_url, log_dir)
            redis = {"REDIS_URL": f"redis://{SERVICE_IP}:{REDIS_PORT}/0", **redis_env}
            bench.serve("plain", 8000)
            bench.serve(
                "turn",
                8001,
                RENDEZVOUS_TURN_SERVERS=f"{SERVICE_IP}:{TURN_PORT}",
                RENDEZVOUS_TURN_SECRET=TURN_SECRET,
            )
            bench.serve("redis-a", 8002, **redis)
            bench.serve("redis-b", 8003, **redis)
            yield bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20, help="connects per scenario")
    parser.add_argument("--seconds", type=float, default=5, help="seconds per throughput run")
    parser.add_argument("--only", choices=["ttfb", "throughput"], help="run one part only")
    parser.add_argument("--logs", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    kinds = [NatKind.MASQUERADE, NatKind.MASQUERADE, NatKind.RANDOM_FULLY,
             NatKind.RANDOM_FULLY, NatKind.MASQUERADE]  # fmt: skip
    ttfbs: list[tuple[str, dict[str, Any]]] = []
    offline: dict[str, Any] = {}
    rates: dict[str, Any] = {}
    with public_services(
        kinds, [2, 1, 1, 1, 1], args.logs, "rendezvous-peer-bench-", LOG_LEVEL="INFO"
    ) as bench:
        if args.only != "throughput":
            print(f"time to first byte ({args.count} connects each):", flush=True)
            ttfbs = scenarios(bench, args.count)
            offline = bench.run(
                bench.net.sites[0].worker,
                [*AGENT, "offline", "--url", bench.url("plain"), "--id", "lonely",
                 "--count", str(args.count)],
            )  # fmt: skip
            print(f"  offline peer: {offline}", flush=True)
        if args.only != "ttfb":
            print(f"throughput ({args.seconds:g} s each, 1,200-byte datagrams):", flush=True)
            rates = throughput(bench, args.seconds)
        bench.stop_answering()
    report(ttfbs, offline, rates)
    return 0


def report(
    ttfbs: list[tuple[str, dict[str, Any]]], offline: dict[str, Any], rates: dict[str, Any]
) -> None:
    if ttfbs:
        report_ttfb(ttfbs, offline)
    if rates:
        report_rates(rates)
    if ttfbs and rates:
        report_targets(ttfbs, rates)


def report_ttfb(ttfbs: list[tuple[str, dict[str, Any]]], offline: dict[str, Any]) -> None:
    print(
        "\n| scenario | path (of each connect) | TTFB p50 / p99 (ms) | best path p50 / p99 (ms) |"
    )
    print("|---|---|---|---|")
    for name, r in ttfbs:
        best = (
            f"{r['best_kind_p50_ms']} / {r['best_kind_p99_ms']}" if "best_kind_p50_ms" in r else "-"
        )
        kinds = ", ".join(f"{k} x{n}" for k, n in r.get("final_kinds", {}).items())
        ttfb = f"{r.get('ttfb_p50_ms')} / {r.get('ttfb_p99_ms')}"
        print(f"| {name} | {kinds or r.get('error')} | {ttfb} | {best} |")
    print(
        f"\noffline peer: connect() fails in {offline.get('failure_p50_ms')} ms p50, "
        f"{offline.get('failure_p99_ms')} ms p99 (target: within 2,000 ms)"
    )


def report_rates(rates: dict[str, Any]) -> None:
    baseline = rates["raw UDP (worker -> NAT -> public)"].get("mb_per_s") or 0
    print("\n| path | MB/s | x raw UDP | service CPU-s per MB |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        rate = r.get("mb_per_s") or 0
        ratio = f"{rate / baseline:.2f}" if baseline else "-"
        cpu = r.get("service_cpu_s_per_mb", "-")
        print(f"| {name} | {rate} | {ratio} | {cpu} |")


def report_targets(ttfbs: list[tuple[str, dict[str, Any]]], rates: dict[str, Any]) -> None:
    relay = rates["service relay, one instance"]
    first = max(r.get("ttfb_p50_ms") or 0 for name, r in ttfbs if "no TURN" in name)
    print(
        "\ntargets: first byte through the relay <= 300 ms: "
        f"{'met' if first <= 300 else 'MISSED'} ({first} ms p50, relayed scenarios); "
        f"relay >= 10 MB/s: {'met' if (relay.get('mb_per_s') or 0) >= 10 else 'MISSED'} "
        f"({relay.get('mb_per_s')} MB/s); <= 0.1 CPU-s per relayed MB: "
        f"{'met' if (relay.get('service_cpu_s_per_mb') or 1) <= 0.1 else 'MISSED'} "
        f"({relay.get('service_cpu_s_per_mb')})"
    )


if __name__ == "__main__":
    sys.exit(main())
