"""QUIC over an impaired direct path: aioquic's congestion controllers side by side.

Needs root (network namespaces and iptables, as tests/test_paths_e2e.py). Two cone NATs and the
service (bench/peer_paths.py's set-up); the pair runs on its direct path with UDP through one
NAT impaired in the kernel: random loss both ways (`iptables -m statistic`, since these kernels
have no netem) and, on request, a fixed delay on the way out (an NFQUEUE reader,
tests/support/impair.py). For each impairment and each controller (Reno, CUBIC), `--repeat`
transfers of `--megabytes` over one stream each; the clock stops when the last byte arrived at
the peer, which checks the SHA-256. The unimpaired path runs first, as the baseline.

    sudo .venv/bin/python bench/peer_loss.py [--megabytes 8] [--repeat 3]

Prints its figures; not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_paths import AGENT, Bench, public_services

# peer_paths put the repository on sys.path.
from tests.support.netns import NatKind, Site, netns_unavailable_reason

CONTROLLERS = ("reno", "cubic")
IMPAIRMENTS = (  # name, loss each way, delay added on the way out (ms)
    ("none", 0.0, 0),
    ("5% loss", 0.05, 0),
    ("5% loss, 20 ms delay", 0.05, 20),
    ("1% loss, 20 ms delay", 0.01, 20),
)
QUEUE = 7


class Impairment:
    """Loss and delay on the UDP a NAT forwards, set up and taken down with its rules."""

    def __init__(self, bench: Bench, site: Site, loss: float, delay_ms: int) -> None:
        self.bench, self.site, self.loss, self.delay_ms = bench, site, loss, delay_ms
        self.rules: list[list[str]] = []
        self.reader: Any = None

    def __enter__(self) -> Impairment:
        net = self.bench.net
        if self.loss:
            self._rule(["FORWARD", "-p", "udp", "-m", "statistic", "--mode", "random",
                        "--probability", str(self.loss), "-j", "DROP"])  # fmt: skip
        if self.delay_ms:
            self.reader = net.python(
                self.site.nat, "-m", "tests.support.impair", "--queue", str(QUEUE),
                "--delay-ms", str(self.delay_ms), log_name="impair.log",
            )  # fmt: skip
            time.sleep(0.3)  # bound to its queue before packets are sent there
            self._rule(["FORWARD", "-o", "wan0", "-p", "udp", "-j", "NFQUEUE", "--queue-num",
                        str(QUEUE), "--queue-bypass"], table="mangle")  # fmt: skip
        return self

    def _rule(self, rule: list[str], table: str = "filter") -> None:
        self.bench.net._exec(self.site.nat, "iptables", "-w", "5", "-t", table, "-I", *rule)
        self.rules.append(["-t", table, "-D", *rule])

    def __exit__(self, *exc: object) -> None:
        for rule in reversed(self.rules):
            self.bench.net._exec(self.site.nat, "iptables", "-w", "5", *rule)
        if self.reader is not None:
            self.reader.terminate()
            self.reader.wait(10)


def transfer(bench: Bench, n: int, controller: str, megabytes: int, repeat: int) -> dict:
    a, b = bench.net.sites[0].worker, bench.net.sites[1].worker
    extra = ["--congestion-control", controller]
    bench.answer(b, "plain", f"lb{n}", *extra, mode="quic-answer")
    try:
        return bench.run(
            a,
            [*AGENT, "quic-send", "--url", bench.url("plain"), "--id", f"la{n}", "--peer",
             f"lb{n}", "--count", "1", "--megabytes", str(megabytes), "--repeat", str(repeat),
             "--wait-kind", "direct", *extra],
        )  # fmt: skip
    finally:
        bench.stop_answering()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=8, help="MiB per transfer")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per case (median)")
    parser.add_argument("--logs", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    rows: list[tuple[str, str, dict[str, Any]]] = []
    kinds = [NatKind.MASQUERADE, NatKind.MASQUERADE]
    with public_services(kinds, [1, 1], args.logs, "rendezvous-loss-bench-") as bench:
        n = 0
        for name, loss, delay in IMPAIRMENTS:
            for controller in CONTROLLERS:
                n += 1
                with Impairment(bench, bench.net.sites[0], loss, delay):
                    outcome = transfer(bench, n, controller, args.megabytes, args.repeat)
                print(f"  {name}, {controller}: {outcome}", flush=True)
                rows.append((name, controller, outcome))
    print(f"\n{args.repeat} x {args.megabytes} MiB per case, QUIC over a direct path:")
    print("\n| impairment | controller | MB/s (median; min-max) | path | SHA-256 |")
    print("|---|---|---|---|---|")
    for name, controller, r in rows:
        if "error" in r:
            print(f"| {name} | {controller} | {r['error']} | | |")
            continue
        print(
            f"| {name} | {controller} | {r['mb_per_s']} ({r['mb_per_s_min']}-"
            f"{r['mb_per_s_max']}) | {r['kind']} | {'match' if r['intact'] else 'MISMATCH'} |"
        )
    by = {(name, controller): r.get("mb_per_s") for name, controller, r in rows}
    for name, _, _ in IMPAIRMENTS:
        reno, cubic = by.get((name, "reno")), by.get((name, "cubic"))
        if reno and cubic:
            print(f"{name}: cubic / reno = {cubic / reno:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
