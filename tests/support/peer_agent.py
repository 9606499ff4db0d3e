"""A worker for the path tests, run inside a worker's network namespace (or on loopback).

    python -m tests.support.peer_agent answer  --url URL --id w2
    python -m tests.support.peer_agent connect --url URL --id w1 --peer w2 [--wait-kind direct]
                                               [--stream 10] [--no-udp]

`answer` keeps a WorkerAgent registered and echoes every datagram that arrives on a path
(prefixed with b"echo:"). `connect` waits until the peer is listed, connects, sends b"ping" and
waits for its echo (the time to first byte), optionally waits for the path to reach a kind,
optionally streams numbered datagrams for a while (counting echoes, and the route each went
out on), and prints one JSON line: the outcome, the path's kinds over time, the figures, or the
error's class and message. Exit status 0 either way; the test reads the line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

from worker_agent import PeerError, PeerPath, WorkerAgent


def echo(agent: WorkerAgent, path: PeerPath) -> None:
    def serve() -> None:
        with path:
            while True:
                try:
                    data = path.recv(timeout=120)
                except (TimeoutError, PeerError):
                    return
                path.send(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()


def stream(path: PeerPath, seconds: float, rate: float) -> dict[str, Any]:
    """Numbered datagrams at `rate` a second for `seconds`; echoes counted as they come."""
    received: set[int] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                data = path.recv(timeout=0.2)
            except TimeoutError:
                continue
            except PeerError:
                return
            if data.startswith(b"echo:seq:"):
                received.add(int(data[9:]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent_on: dict[str, int] = {}
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        kind = path.kind or "none"
        sent_on[kind] = sent_on.get(kind, 0) + 1
        path.send(b"seq:%d" % n)
        n += 1
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
    time.sleep(1.0)  # the last echoes
    done.set()
    reader.join(2)
    return {"sent": n, "echoed": len(received), "lost": n - len(received), "sent_on": sent_on}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["answer", "connect"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--peer")
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--wait-kind", default="", help="comma-separated kinds to wait for")
    parser.add_argument("--wait", type=float, default=15, help="seconds to wait for them")
    parser.add_argument("--stream", type=float, default=0, help="seconds of numbered datagrams")
    parser.add_argument("--rate", type=float, default=50, help="datagrams a second when streaming")
    parser.add_argument("--no-udp", action="store_true", help="the service relay only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    agent = WorkerAgent(
        args.url,
        args.id,
        ip_echo_url="",
        on_peer=echo if args.mode == "answer" else None,
        peer_udp=not args.no_udp,
    )
    agent.start()
    if args.mode == "answer":
        threading.Event().wait()  # until the test ends the process
        return 0
    deadline = time.monotonic() + args.timeout
    result: dict[str, Any]
    try:
        while not any(p["worker_id"] == args.peer for p in agent.list_peers(timeout=5)):
            if time.monotonic() > deadline:
                raise PeerError(f"{args.peer} never appeared in the peer list")
            time.sleep(0.2)
        started = time.monotonic()
        path = agent.connect(args.peer, timeout=10)
        connected = time.monotonic() - started
        first_kind = path.kind
        path.send(b"ping")
        reply = path.recv(timeout=5)
        ttfb = time.monotonic() - started
        result = {
            "ok": True,
            "first_kind": first_kind,
            "connect_ms": round(1000 * connected, 1),
            "ttfb_ms": round(1000 * ttfb, 1),
            "reply": reply.decode(),
        }
        if args.stream:
            result["stream"] = stream(path, args.stream, args.rate)
        if args.wait_kind:
            result["reached"] = path.wait_for_kind(*args.wait_kind.split(","), timeout=args.wait)
        path.send(b"pong")
        last = path.recv(timeout=5)
        while last.startswith(b"echo:seq:"):  # late echoes of the stream
            last = path.recv(timeout=5)
        result["last_reply"] = last.decode()
        result["kind"] = path.kind
        result["remote_address"] = list(path.remote_address) if path.remote_address else None
        result["kinds"] = [kind for _, kind in path.history]
        result["seconds_to"] = {kind: round(at - started, 3) for at, kind in path.history}
        path.close()
    except (PeerError, OSError, TimeoutError) as exc:
        result = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
    print(json.dumps(result), flush=True)
    agent.stop(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
