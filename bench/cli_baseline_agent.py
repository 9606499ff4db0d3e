"""The baseline for bench/cli_transfers.py: the same bytes over the Python API, as a program
would send them, run in a worker's network namespace.

    python bench/cli_baseline_agent.py answer --url URL --id B --dir DIR
    python bench/cli_baseline_agent.py stream --url URL --id A --peer B (--file PATH | --bytes N)
    python bench/cli_baseline_agent.py raw-ping --url URL --id A --peer B --count 50

`answer` takes each stream (a JSON line, then the bytes until the end of the stream): it hashes
them, writes them to DIR/<name> for a file, and answers the SHA-256; it echoes raw datagrams.
`stream` connects, waits for the direct path, then sends the file (read in 1 MiB pieces) or N
random bytes made beforehand, and times from the first byte written to the answer (the last
byte arrived, checked). `raw-ping` times datagram echoes on a raw path. Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_agent import PeerConnection, PeerError, PeerPath, WorkerAgent

CHUNK = 1024 * 1024


def answer(folder: Path) -> Any:
    def one(stream: Any) -> None:
        reader = stream.makefile("rb")
        ask = json.loads(reader.readline())
        digest = hashlib.sha256()
        target = (folder / ask["name"]).open("wb") if ask.get("name") else None
        while data := reader.read1(CHUNK):
            digest.update(data)
            if target is not None:
                target.write(data)
        if target is not None:
            target.close()
        stream.sendall(digest.hexdigest().encode())
        stream.shutdown_write()

    def on_peer(agent: WorkerAgent, conn: PeerConnection) -> None:
        while True:
            try:
                stream = conn.accept_stream(timeout=3600)
            except (TimeoutError, PeerError):
                return
            threading.Thread(target=one, args=(stream,), daemon=True).start()

    return on_peer


def echo(agent: WorkerAgent, path: PeerPath) -> None:
    def serve() -> None:
        while True:
            try:
                path.send(path.recv(timeout=3600))
            except (TimeoutError, PeerError):
                return

    threading.Thread(target=serve, daemon=True).start()


def stream(agent: WorkerAgent, peer: str, file: str | None, size: int) -> dict[str, Any]:
    conn = agent.connect(peer, timeout=15)
    conn.path.wait_for_kind("direct", "lan", timeout=20)
    payload = b"" if file else os.urandom(size)
    out = conn.open_stream()
    ask = {"name": Path(file).name} if file else {}
    digest = hashlib.sha256()
    started = time.monotonic()
    out.sendall(json.dumps(ask).encode() + b"\n")
    if file:
        with open(file, "rb") as source:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.sendall(chunk, timeout=120)
                size = max(size, 0) + len(chunk)
    else:
        for offset in range(0, size, CHUNK):
            out.sendall(payload[offset : offset + CHUNK], timeout=120)
        digest.update(payload)
    out.shutdown_write()
    reply = b"".join(iter(lambda: out.recv(timeout=120), b"")).decode()
    seconds = time.monotonic() - started
    result = {
        "ok": reply == digest.hexdigest(),
        "kind": conn.path_kind,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / 1e6 / seconds, 2),
    }
    conn.close()
    return result


def raw_ping(agent: WorkerAgent, peer: str, count: int) -> dict[str, Any]:
    path = agent.connect_path(peer, timeout=15)
    path.wait_for_kind("direct", "lan", timeout=20)
    samples = []
    for n in range(count + 5):
        started = time.monotonic()
        path.send(b"ping %d" % n)
        while path.recv(timeout=5) != b"ping %d" % n:
            pass
        if n >= 5:  # the first few warm the route up
            samples.append(1000 * (time.monotonic() - started))
        time.sleep(0.05)
    kind = path.kind
    path.close()
    return {"kind": kind, "median_ms": round(statistics.median(samples), 3),
            "samples_ms": [round(s, 3) for s in samples]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["answer", "stream", "raw-ping"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--peer")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--file")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    agent = WorkerAgent(
        args.url,
        args.id,
        ip_echo_url="",
        on_peer=answer(args.dir) if args.mode == "answer" else None,
        on_peer_path=echo if args.mode == "answer" else None,
    )
    agent.start()
    agent.wait_registered(15)
    if args.mode == "answer":
        print("registered", flush=True)
        threading.Event().wait()
    while not any(p["worker_id"] == args.peer for p in agent.list_peers()):
        time.sleep(0.2)
    if args.mode == "stream":
        result = stream(agent, args.peer, args.file, args.bytes)
    else:
        result = raw_ping(agent, args.peer, args.count)
    print(json.dumps(result), flush=True)
    agent.stop(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
