"""Encrypted peer connections benchmark: QUIC over each kind of path, next to raw datagrams.

Needs root (network namespaces and iptables, as tests/test_paths_e2e.py) and coturn; builds the
same NAT topology as bench/peer_paths.py. Then, in one run:

1. The baselines: a plain UDP socket from a worker's namespace through its NAT to the public
   one, and raw datagrams (no QUIC) over the service relay, the direct and the TURN path
   (bench/peer_paths.py's throughput part).
2. For each path (LAN, direct, TURN, the service relay on one instance and across two over
   Redis): `--count` connects, each timed from `connect()` to the completed QUIC handshake
   (introduction, first route, handshake: what a user waits for), then `--repeat` transfers of
   `--megabytes`, one stream each, once the path is on the kind measured (the median counts).
   The clock starts at the first write and stops when the last byte arrived at the peer; the
   peer checks the SHA-256. CPU per MB on each peer.
3. With the relay off (`RENDEZVOUS_RELAY=off`) the handshake runs over the direct path itself:
   its time is the "handshake over a direct path" figure.

    sudo .venv/bin/python bench/peer_connections.py [--count 10] [--megabytes 16]

Prints its figures; not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_paths import AGENT, Bench, public_services, throughput

# peer_paths put the repository on sys.path.
from tests.support.netns import (
    NatKind,
    NatTopology,
    netns_unavailable_reason,
)

RAW = {  # the raw-datagram baseline over the same kind of path, from peer_paths.throughput()
    "LAN (two workers, one NAT)": "LAN (two workers, one NAT)",
    "direct (cone <-> cone)": "direct (cone <-> cone)",
    "TURN (cone <-> symmetric)": "TURN (cone <-> symmetric)",
    "service relay, one instance": "service relay, one instance",
    "service relay, two instances (Redis)": "service relay, two instances (Redis)",
}
PLAIN_UDP = "raw UDP (worker -> NAT -> public)"
# A transfer slower than this share of the path's fastest in the run is in the slow mode.
SLOW = 0.85


def cases(net: NatTopology) -> list[tuple[str, str, str, str, str, list[str], str]]:
    s = net.sites
    return [
        # name, service of A, service of B, A's namespace, B's namespace, extra, kind to measure
        ("LAN (two workers, one NAT)", "plain", "plain", s[0].workers[0], s[0].workers[1], [],
         "lan"),
        ("direct (cone <-> cone)", "plain", "plain", s[0].workers[0], s[1].worker, [], "direct"),
        ("TURN (cone <-> symmetric)", "turn", "turn", s[1].worker, s[2].worker, [], "turn"),
        ("service relay, one instance", "plain", "plain", s[0].workers[0], s[1].worker,
         ["--no-udp"], ""),
        ("service relay, two instances (Redis)", "redis-a", "redis-b", s[0].workers[0],
         s[1].worker, ["--no-udp"], ""),
        ("direct, relay off (handshake on the direct path)", "norelay", "norelay",
         s[0].workers[0], s[1].worker, [], "direct"),
    ]  # fmt: skip


def quic(
    bench: Bench,
    count: int,
    megabytes: int,
    repeat: int,
    only: list[str],
    pin: str,
    variants: list[str],
) -> dict[str, dict[str, Any]]:
    """Each path (those named in `only`, or all), once per variant: the agents of a variant
    run with BENCH_VARIANT set (bench/path_agent.py's `variant`); "" is the agent as it is."""
    cpus = [c for c in pin.split(",") if c]
    figures: dict[str, dict[str, Any]] = {}
    n = 0
    for name, service_a, service_b, frm, to, extra, kind in cases(bench.net):
        if only and not any(word in name for word in only):
            continue
        for variant in variants:
            n += 1
            env = ("env", f"BENCH_VARIANT={variant}")
            sender = (*env, *(("taskset", "-c", cpus[0]) if cpus else ()))
            receiver = (*env, *(("taskset", "-c", cpus[-1]) if cpus else ()))
            bench.answer(to, service_b, f"qb{n}", *extra, mode="quic-answer", prefix=receiver)
            args = ["--url", bench.url(service_a), "--id", f"qa{n}", "--peer", f"qb{n}"]
            args += ["--count", str(count), "--megabytes", str(megabytes)]
            args += ["--repeat", str(repeat), *extra]
            if kind:
                args += ["--wait-kind", kind]
            try:
                outcome = bench.run(frm, [*sender, *AGENT, "quic-send", *args])
            finally:
                bench.stop_answering()
            label = f"{name} [{variant}]" if variant else name
            print(f"  {label}: {outcome}", flush=True)
            figures[label] = outcome
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5, help="connects timed per path")
    parser.add_argument("--megabytes", type=int, default=16, help="MiB sent over one stream")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per path (median)")
    parser.add_argument(
        "--only", default="", help="comma-separated words: only the paths whose name has one"
    )
    parser.add_argument("--seconds", type=float, default=5, help="seconds per raw baseline")
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated alternatives measured side by side, each path once per variant "
        "(bench/path_agent.py's `variant`; an empty name is the agent as it is)",
    )
    parser.add_argument(
        "--pin", default="", help="CPUs for the sender and the receiver (taskset), e.g. 0,1"
    )
    parser.add_argument("--logs", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    kinds = [NatKind.MASQUERADE, NatKind.MASQUERADE, NatKind.RANDOM_FULLY]
    with public_services(kinds, [2, 1, 1], args.logs, "rendezvous-quic-bench-") as bench:
        bench.serve("norelay", 8004, RENDEZVOUS_RELAY="off")
        print(f"raw baselines ({args.seconds:g} s each, 1,200-byte datagrams):", flush=True)
        raw = throughput(bench, args.seconds)
        print(
            f"QUIC ({args.count} connects, then {args.repeat} x {args.megabytes} MiB, one "
            "stream each, per path):",
            flush=True,
        )
        only = [word for word in args.only.split(",") if word]
        variants = args.variants.split(",")
        figures = quic(bench, args.count, args.megabytes, args.repeat, only, args.pin, variants)
        bench.stop_answering()
    report(raw, figures)
    return 0


def report(raw: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]]) -> None:
    plain = raw.get(PLAIN_UDP, {}).get("mb_per_s")
    print(f"\nplain UDP socket, worker -> NAT -> public: {plain} MB/s")
    print(
        "\n| path | QUIC MB/s (median; min-max) | raw datagrams, same path (MB/s) | QUIC / raw "
        "| setup p50 / p99 (ms) | handshake p50 / p99 (ms) | CPU-s per MB, sender / receiver "
        "| slow mode | SHA-256 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in figures.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | | |")
            continue
        base = raw.get(RAW.get(name.split(" [")[0], ""), {}).get("mb_per_s")
        ratio = f"{r['mb_per_s'] / base:.2f}" if base else "-"
        print(
            f"| {name} ({r['kind']}) | {r['mb_per_s']} ({r['mb_per_s_min']}-{r['mb_per_s_max']}) | "
            f"{base or '-'} | {ratio} | "
            f"{r['setup_p50_ms']} / {r['setup_p99_ms']} | "
            f"{r['handshake_p50_ms']} / {r['handshake_p99_ms']} | "
            f"{r['sender_cpu_s_per_mb']} / {r['receiver_cpu_s_per_mb']} | "
            f"{slow_mode(r)} | {'match' if r['intact'] else 'MISMATCH'} |"
        )
    report_transfers(figures)
    print(
        f"\nslow mode: a transfer below {SLOW:.2f}x the fastest on its path in this run; "
        "the ratio's baseline for the relay rows is the relay's own budget "
        "(RENDEZVOUS_RELAY_BYTES_PER_SECOND), what raw datagrams reach through it"
    )
    direct = figures.get("direct (cone <-> cone)", {})
    turn = figures.get("TURN (cone <-> symmetric)", {})
    relay = figures.get("service relay, one instance", {})
    handshake = figures.get("direct, relay off (handshake on the direct path)", {})

    def verdict(value: float | None, target: float, above: bool) -> str:
        if value is None:
            return "NOT MEASURED"
        return "met" if (value >= target if above else value <= target) else "MISSED"

    print(
        "\ntargets: direct >= 15 MB/s: "
        f"{verdict(direct.get('mb_per_s'), 15, True)} ({direct.get('mb_per_s')}); "
        f"TURN >= 10 MB/s: {verdict(turn.get('mb_per_s'), 10, True)} ({turn.get('mb_per_s')}); "
        f"service relay >= 10 MB/s: {verdict(relay.get('mb_per_s'), 10, True)} "
        f"({relay.get('mb_per_s')}); handshake over a direct path <= 20 ms: "
        f"{verdict(handshake.get('handshake_p50_ms'), 20, False)} "
        f"({handshake.get('handshake_p50_ms')} ms p50)"
    )


def slow_mode(r: dict[str, Any]) -> str:
    """How many of the path's transfers fell in the slow mode, out of how many."""
    rates = [t["mb_per_s"] for t in r.get("transfers", [])]
    if not rates:
        return "-"
    return f"{sum(rate < SLOW * max(rates) for rate in rates)} of {len(rates)}"


def report_transfers(figures: dict[str, dict[str, Any]]) -> None:
    """Each transfer: its rate, CPU per MB on each side, and what QUIC did (datagrams each
    way, packets declared lost, the sender's window and smoothed RTT at the end)."""
    print(
        "\n| path | MB/s | CPU-s per MB, sender / receiver (of it in the kernel) "
        "| datagrams out / ACKs back | lost "
        "| window (KB) | sRTT (ms) | sender: sends / transmits | receiver: reads |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in figures.items():
        for t in r.get("transfers", []):
            sender, receiver = t["sender"], t["receiver"]
            print(
                f"| {name} | {t['mb_per_s']} | {t['cpu_s_per_mb'][0]} / {t['cpu_s_per_mb'][1]} "
                f"({t['system_s_per_mb'][0]} / {t['system_s_per_mb'][1]}) | "
                f"{sender['sent']} / {receiver['sent']} | {sender['lost']} | "
                f"{sender['cwnd'] // 1000} | {sender['srtt_ms']} | "
                f"{sender['bursts']} / {sender['transmits']} | {receiver['reads']} |"
            )


if __name__ == "__main__":
    sys.exit(main())
