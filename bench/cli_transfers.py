"""The command line's transfers against the Python API's, on the same path, in one run.

Needs root (network namespaces and iptables, as tests/test_cli_nat_e2e.py). Builds two cone
NATs with the service and the STUN responder in the public namespace; in each worker's
namespace runs an agent as `rendezvous-worker` runs it (with its control socket) and, beside
it, a program on the Python API (bench/cli_baseline_agent.py). Both pairs punch the same kind of
path (direct, NAT to NAT). Then, interleaved, `--repeat` times each:

1. `rendezvous-worker send` of a `--megabytes` file (a `receive` waiting on the other side)
   against the program streaming the same file over `PeerConnection.open_stream()`, the other
   side writing it to disk and hashing it. The clock: from the command's start to its exit
   (it exits once the receiver has checked the last byte's digest), against from the first
   byte written to the answer with the digest.
2. `rendezvous-worker forward`: a TCP client sends `--megabytes` of random bytes through it to
   an exposed TCP server that answers their SHA-256, against the program sending the same
   amount of random bytes over a stream. The clock: from the first byte written to the digest.
3. `rendezvous-worker ping --count 50` over the direct path, against raw datagram echoes over a
   raw path (`connect_path`) of the same kind: the medians.

    sudo .venv/bin/python bench/cli_transfers.py [--megabytes 256] [--repeat 3]

Prints its figures and the targets: send and forward at least 0.9x the API stream's MB/s,
ping at most 0.2 ms above the raw path's round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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
    NatKind,
    NatTopology,
    netns_unavailable_reason,
)

BASELINE = [sys.executable, str(REPO / "bench" / "cli_baseline_agent.py")]
CLI = [sys.executable, "-m", "worker_agent"]
TCP_PORT, LOCAL_PORT, SERVICE_PORT = 7000, 9000, 8000

DIGEST_SERVER = str(REPO / "tests" / "support" / "digest_server.py")
BULK_CLIENT = """
import hashlib, json, os, socket, sys, time
payload = os.urandom(int(sys.argv[2]))
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
started = time.monotonic()
view = memoryview(payload)
for offset in range(0, len(payload), 1 << 20):
    client.sendall(view[offset : offset + (1 << 20)])
client.shutdown(socket.SHUT_WR)
reply = b"".join(iter(lambda: client.recv(1 << 16), b"")).decode()
seconds = time.monotonic() - started
print(json.dumps({"ok": reply == hashlib.sha256(payload).hexdigest(), "seconds": seconds,
                  "mb_per_s": round(len(payload) / 1e6 / seconds, 2)}), flush=True)
"""


class Run:
    def __init__(self, net: NatTopology, url: str, folder: Path) -> None:
        self.net, self.url, self.folder = net, url, folder
        self.a, self.b = net.sites[0].worker, net.sites[1].worker

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING", **extra}

    def agent(self, namespace: str, worker_id: str, **extra: str) -> Path:
        sock = self.folder / f"{worker_id}.sock"
        env = self.env(RENDEZVOUS_SERVICE_URL=self.url, WORKER_ID=worker_id, PORT="0",
                       IP_ECHO_URL="", RENDEZVOUS_CONTROL_SOCKET=str(sock), **extra)  # fmt: skip
        self.net.popen(namespace, CLI, env=env, log_name=f"{worker_id}.log")
        deadline = time.monotonic() + 30
        while self.cli(namespace, sock, "status", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker_id} did not start")
            time.sleep(0.2)
        return sock

    def cli(
        self, namespace: str, sock: Path, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        process = self.net.popen(
            namespace, [*CLI, *args], env=self.env(RENDEZVOUS_CONTROL_SOCKET=str(sock)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        stdout, stderr = process.communicate(timeout=900)
        if check and process.returncode != 0:
            raise RuntimeError(f"{args} exited {process.returncode}: {stderr}")
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

    @contextmanager
    def running(self, namespace: str, argv: list[str], until: str, **env: str) -> Iterator[Any]:
        process = self.net.popen(namespace, argv, env=self.env(**env), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert process.stdout is not None
        while until not in (line := process.stdout.readline()):
            if not line:
                raise RuntimeError(f"{argv} ended before {until!r}")
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(2)
                process.wait(30)

    def baseline(self, *args: str) -> dict[str, Any]:
        result = self.net.run(self.a, [*BASELINE, *args, "--url", self.url], timeout=900)
        return json.loads(result.stdout.strip().splitlines()[-1])


def measure(run: Run, megabytes: int, repeat: int) -> dict[str, Any]:
    size = megabytes * 1024 * 1024
    data = run.folder / "dataset.bin"
    data.write_bytes(os.urandom(size))
    inbox, api_inbox = run.folder / "inbox", run.folder / "api-inbox"
    inbox.mkdir()
    api_inbox.mkdir()
    run.net.popen(run.b, [*BASELINE, "answer", "--url", run.url, "--id", "api-b",
                          "--dir", str(api_inbox)], log_name="api-b.log")  # fmt: skip
    b_sock = run.agent(run.b, "cli-b", RENDEZVOUS_EXPOSE=str(TCP_PORT))
    a_sock = run.agent(run.a, "cli-a")
    run.net.popen(run.b, [sys.executable, DIGEST_SERVER, str(TCP_PORT)])
    pings = run.cli(run.a, a_sock, "ping", "cli-b", "--until-direct", "--interval", "0.5").stdout
    figures: dict[str, Any] = {"warm_up_pings": pings.strip().splitlines()}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("api_file", "send", "api_bytes",
                                                               "forward")}  # fmt: skip
    for n in range(repeat):
        (api_inbox / "dataset.bin").unlink(missing_ok=True)
        rows["api_file"].append(run.baseline("stream", "--id", f"api-a{n}", "--peer", "api-b",
                                             "--file", str(data)))  # fmt: skip
        (inbox / "dataset.bin").unlink(missing_ok=True)
        with run.running(run.b, [*CLI, "receive", "--dir", str(inbox)], "waiting for files",
                         RENDEZVOUS_CONTROL_SOCKET=str(b_sock)):  # fmt: skip
            started = time.monotonic()
            said = run.cli(run.a, a_sock, "send", "cli-b", str(data)).stdout
            seconds = time.monotonic() - started
        rows["send"].append({"ok": "SHA-256 checked" in said, "seconds": round(seconds, 3),
                             "mb_per_s": round(size / 1e6 / seconds, 2)})  # fmt: skip
        rows["api_bytes"].append(run.baseline("stream", "--id", f"api-c{n}", "--peer", "api-b",
                                              "--bytes", str(size)))  # fmt: skip
        with run.running(run.a, [*CLI, "forward", str(LOCAL_PORT), f"cli-b:{TCP_PORT}"],
                         "forwarding", RENDEZVOUS_CONTROL_SOCKET=str(a_sock)):  # fmt: skip
            moved = run.net.run(run.a, [sys.executable, "-c", BULK_CLIENT, str(LOCAL_PORT),
                                        str(size)], timeout=900)  # fmt: skip
        rows["forward"].append(json.loads(moved.stdout.strip().splitlines()[-1]))
        print(f"  round {n + 1}: " + ", ".join(f"{k} {v[-1]['mb_per_s']} MB/s"
                                               for k, v in rows.items()), flush=True)  # fmt: skip
    figures["rows"] = rows
    ping_out = run.cli(run.a, a_sock, "ping", "cli-b", "--count", "50", "--interval", "0.05")
    ping_ms = [float(m) for m in re.findall(r" in ([\d.]+) ms", ping_out.stdout)]
    figures["ping"] = {"kinds": sorted(set(re.findall(r"via (\w+)", ping_out.stdout))),
                       "median_ms": statistics.median(ping_ms), "count": len(ping_ms)}  # fmt: skip
    figures["raw"] = run.baseline("raw-ping", "--id", "api-p", "--peer", "api-b", "--count", "50")
    figures["status"] = json.loads(run.cli(run.a, a_sock, "status", "--json").stdout)
    return figures


def report(figures: dict[str, Any], megabytes: int) -> int:
    rows = figures["rows"]

    def median(name: str) -> float:
        return round(statistics.median(r["mb_per_s"] for r in rows[name]), 2)

    intact = all(r["ok"] for values in rows.values() for r in values)
    kind = figures["status"]["connections"][0]["kind"]
    print(f"\npath: {kind} (warm-up: {figures['warm_up_pings'][0]} ... "
          f"{figures['warm_up_pings'][-1]})")  # fmt: skip
    print(f"\n| {megabytes} MiB, median of {len(rows['send'])} | MB/s (each run) | baseline MB/s "
          "| ratio | target |")  # fmt: skip
    print("|---|---|---|---|---|")
    verdicts, each_round = [], []
    for name, base, label in (("send", "api_file", "send (a file, to disk, checked)"),
                              ("forward", "api_bytes", "forward (TCP bulk, checked)")):  # fmt: skip
        ratio = median(name) / median(base)
        pairs = zip(rows[name], rows[base], strict=True)
        paired = [row["mb_per_s"] / against["mb_per_s"] for row, against in pairs]
        each_round.append(f"{name}: " + ", ".join(f"{p:.2f}" for p in paired))
        verdicts.append(ratio >= 0.9)
        each = ", ".join(str(r["mb_per_s"]) for r in rows[name])
        base_each = ", ".join(str(r["mb_per_s"]) for r in rows[base])
        print(f"| {label} | {median(name)} ({each}) | {median(base)} ({base_each}) | "
              f"{ratio:.2f} | >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'} |")  # fmt: skip
    print("\neach round against the baseline of the same round: " + "; ".join(each_round))
    ping, raw = figures["ping"], figures["raw"]
    added = ping["median_ms"] - raw["median_ms"]
    verdicts.append(added <= 0.2)
    print(f"\nping: median {ping['median_ms']:.3f} ms over {ping['count']} pongs via "
          f"{'/'.join(ping['kinds'])} (QUIC PING to its acknowledgement, timed at this side's "
          f"socket); raw path echo: median {raw['median_ms']:.3f} ms via {raw['kind']} "
          f"(connect_path, send to recv of the peer's echo); ping minus raw {added:+.3f} ms "
          f"(target <= +0.2 ms: {'met' if added <= 0.2 else 'MISSED'})")  # fmt: skip
    print(f"every transfer checked by SHA-256: {'yes' if intact else 'NO'}")
    return 0 if intact and all(verdicts) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--logs", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    with tempfile.TemporaryDirectory(prefix="rendezvous-cli-bench-") as tmp:
        folder = args.logs or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        database = f"sqlite:///{folder / 'bench.sqlite3'}"
        env = {**os.environ, "DATABASE_URL": database}
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env,
                       check=True)  # fmt: skip
        with NatTopology([NatKind.MASQUERADE, NatKind.MASQUERADE], log_dir=folder) as net:
            net.start_stun()
            stun = f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
            service = {**env, "HOST": SERVICE_IP, "PORT": str(SERVICE_PORT),
                       "ALLOWED_HOSTS": SERVICE_IP, "RENDEZVOUS_SECURITY_MODE": "open",
                       "RENDEZVOUS_STUN_SERVERS": stun}  # fmt: skip
            net.python(net.public, "manage.py", "serve", env=service, log_name="service.log")
            deadline = time.monotonic() + 30
            while "Listening on TCP" not in (folder / "service.log").read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not start")
                time.sleep(0.1)
            run = Run(net, f"http://{SERVICE_IP}:{SERVICE_PORT}", folder)
            print(f"{args.megabytes} MiB, {args.repeat} rounds, cone <-> cone NAT:", flush=True)
            figures = measure(run, args.megabytes, args.repeat)
    return report(figures, args.megabytes)


if __name__ == "__main__":
    sys.exit(main())
