"""The direct rate: a matrix of NAT pairs in network namespaces, the final path of each, the
time to direct and the throughput, and the share of pairs that end direct.

Needs root, iptables, iptables-legacy and miniupnpd (tools/install_system_packages.sh). Builds
two topologies of tests/support/netns.py: IPv4 routers of every kind (full cone, port-restricted
cone, symmetric, symmetric behind miniupnpd), and two symmetric IPv4 routers that also route
global IPv6 behind stateful firewalls. The service (daphne) and the STUN responder run in the
public namespace; for each pair an answering agent and a connecting one
(tests/support/peer_agent.py) run `--count` times: an encrypted connection, a wait of up to
15 s for a direct or LAN path, then `--megabytes` over one QUIC stream.

`--code DIR` runs the agents from another checkout: today's behaviour is the same script with
the agents of main (`git archive main | tar -x -C /tmp/rdv-main`), so baseline and now are the
same matrix:

    sudo .venv/bin/python bench/nat_matrix.py --code /tmp/rdv-main --label baseline
    sudo .venv/bin/python bench/nat_matrix.py --label now
    sudo .venv/bin/python bench/nat_matrix.py --label "now, probing" --probing
    sudo .venv/bin/python bench/nat_matrix.py --probing --only "symmetric / port" --count 20

Prints one line per connection and a table; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.netns import (  # noqa: E402
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    NatKind,
    NatTopology,
    miniupnpd_unavailable_reason,
    netns_unavailable_reason,
)

K = NatKind
IPV4_SITES = [K.FULL_CONE, K.FULL_CONE, K.MASQUERADE, K.MASQUERADE, K.RANDOM_FULLY,
              K.RANDOM_FULLY, K.MINIUPNPD]  # fmt: skip
# name, site indices (1-based) into IPV4_SITES, or "v6" for the IPv6 topology's two sites
PAIRS = [
    ("cone / cone", (1, 2)),
    ("port-restricted / port-restricted", (3, 4)),
    ("symmetric / cone", (5, 1)),
    ("symmetric / port-restricted", (5, 3)),
    ("symmetric / symmetric", (5, 6)),
    ("symmetric behind miniupnpd / symmetric", (6, 7)),
    ("IPv6 both, symmetric IPv4 both", "v6"),
]


def serve(net: NatTopology, database_url: str, port: int, probing: bool) -> str:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "HOST": SERVICE_IP,
        "PORT": str(port),
        "ALLOWED_HOSTS": SERVICE_IP,
        "RENDEZVOUS_SECURITY_MODE": "open",
        "RENDEZVOUS_STUN_SERVERS": (
            f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
        ),
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        "RENDEZVOUS_HARD_NAT_PROBING": "on" if probing else "off",
    }
    log = f"service-{port}.log"
    net.python(net.public, "manage.py", "serve", env=env, log_name=log)
    deadline = time.monotonic() + 30
    assert net.log_dir is not None
    while "Rendezvous on" not in (net.log_dir / log).read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.1)
    time.sleep(1.0)  # daphne binds right after printing its address line
    return f"http://{SERVICE_IP}:{port}"


def one_pair(
    net: NatTopology,
    url: str,
    code: Path,
    frm: str,
    to: str,
    ids: tuple[str, str],
    size: int,
    probing: bool,
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RENDEZVOUS_PORT_MAPPING": "on"}
    argv = [sys.executable, "-m", "tests.support.peer_agent"]
    assert net.log_dir is not None
    answering = net.popen(
        to, [*argv, "answer", "--url", url, "--id", ids[1]], env=env, cwd=code,
        log_name=f"{ids[1]}.log",
    )  # fmt: skip
    try:
        time.sleep(2.0)  # registered (the connecting side also waits until it is listed)
        connecting = net.popen(
            frm,
            [*argv, "connect", "--url", url, "--id", ids[0], "--peer", ids[1],
             "--quic", str(size), "--wait-kind", "direct,lan",
             *(["--wait-nat"] if probing else [])],
            env=env, cwd=code, stdout=subprocess.PIPE,
            stderr=(net.log_dir / f"{ids[0]}.log").open("ab"), text=True,
        )  # fmt: skip
        try:
            stdout, _ = connecting.communicate(timeout=180)
            return json.loads(stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            connecting.kill()
            return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        answering.terminate()
        answering.wait(10)


def run_matrix(
    code: Path, count: int, size: int, logs: Path, probing: bool, only: str | None
) -> list[tuple[str, list[dict]]]:
    results: list[tuple[str, list[dict]]] = []
    database_url = f"sqlite:///{logs / 'bench.sqlite3'}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=REPO, env={**os.environ, "DATABASE_URL": database_url}, check=True,
    )  # fmt: skip
    pairs = [(name, sites) for name, sites in PAIRS if only is None or only in name]
    for ipv6 in (False, True):
        if not any((sites == "v6") == ipv6 for _, sites in pairs):
            continue
        kinds = [K.RANDOM_FULLY, K.RANDOM_FULLY] if ipv6 else IPV4_SITES
        with NatTopology(kinds, log_dir=logs, ipv6=ipv6) as net:
            net.start_stun()
            if not ipv6:
                net.start_miniupnpd(net.sites[6])
            url = serve(net, database_url, 8020 + ipv6, probing)
            for name, sites in pairs:
                if (sites == "v6") != ipv6:
                    continue
                a, b = (1, 2) if sites == "v6" else sites
                runs = []
                for n in range(count):
                    ids = (f"m{len(results)}a{n}{int(ipv6)}", f"m{len(results)}b{n}{int(ipv6)}")
                    worker_a, worker_b = net.sites[a - 1].worker, net.sites[b - 1].worker
                    outcome = one_pair(net, url, code, worker_a, worker_b, ids, size, probing)
                    print(f"  {name} #{n + 1}: {outcome}", flush=True)
                    runs.append(outcome)
                results.append((name, runs))
    return results


def summary(label: str, results: list[tuple[str, list[dict]]]) -> None:
    print(f"\n{label}:")
    print("| pair | final path (of each run) | time to direct p50 (s) | MB/s p50 |")
    print("|---|---|---|---|")
    direct = total = 0
    within_3s = 0
    for name, runs in results:
        kinds: dict[str, int] = {}
        to_direct, rates = [], []
        for r in runs:
            kind = r.get("kind") or "error"
            kinds[kind] = kinds.get(kind, 0) + 1
            total += 1
            if kind in ("direct", "lan"):
                direct += 1
                seconds = min(v for k, v in r["seconds_to"].items() if k in ("direct", "lan"))
                to_direct.append(seconds)
                within_3s += seconds <= 3.0
            if r.get("mb_per_s"):
                rates.append(r["mb_per_s"])
        shown = ", ".join(f"{k} x{n}" for k, n in kinds.items())
        ttd = f"{statistics.median(to_direct):.2f}" if to_direct else "-"
        rate = f"{statistics.median(rates):.1f}" if rates else "-"
        print(f"| {name} | {shown} | {ttd} | {rate} |")
    share = direct / total if total else 0
    print(
        f"\ndirect share ({label}): {direct}/{total} = {share:.0%}; "
        f"of those, direct within 3 s: {within_3s}/{direct}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose agents run")
    parser.add_argument("--label", default="now")
    parser.add_argument("--count", type=int, default=2, help="connections per pair")
    parser.add_argument("--megabytes", type=float, default=4)
    parser.add_argument("--logs", type=Path, help="keep every process's log here")
    parser.add_argument(
        "--probing", action="store_true", help="RENDEZVOUS_HARD_NAT_PROBING=on in the service"
    )
    parser.add_argument("--only", help="the pairs whose name contains this")
    args = parser.parse_args()
    reason = netns_unavailable_reason() or miniupnpd_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    with tempfile.TemporaryDirectory(prefix="rendezvous-nat-matrix-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        print(f"{args.label}: agents from {args.code}", flush=True)
        results = run_matrix(
            args.code.resolve(),
            args.count,
            int(args.megabytes * 1e6),
            logs,
            args.probing,
            args.only,
        )
    summary(args.label, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
