"""A worker for the NAT traversal tests, run inside a worker's network namespace.

    python -m tests.support.peer_agent answer  --url URL --id w2
    python -m tests.support.peer_agent connect --url URL --id w1 --peer w2

`answer` keeps a WorkerAgent registered and echoes every datagram that arrives on a punched
path (prefixed with b"echo:"). `connect` waits until the peer is listed, connects, sends
b"ping" and prints one JSON line: the outcome, the peer's address as seen on the path, and the
reply, or the error's class and message. Exit status 0 either way; the test reads the line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

from worker_agent import PeerError, PeerPath, WorkerAgent


def echo(agent: WorkerAgent, path: PeerPath) -> None:
    def serve() -> None:
        with path:
            while True:
                try:
                    data = path.recv(timeout=30)
                except TimeoutError:
                    return
                path.send(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["answer", "connect"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--peer")
    parser.add_argument("--timeout", type=float, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    agent = WorkerAgent(
        args.url, args.id, ip_echo_url="", on_peer=echo if args.mode == "answer" else None
    )
    agent.start()
    if args.mode == "answer":
        threading.Event().wait()  # until the test ends the process
        return 0
    deadline = time.monotonic() + args.timeout
    result: dict[str, object]
    started: float | None = None
    try:
        while not any(p["worker_id"] == args.peer for p in agent.list_peers(timeout=5)):
            if time.monotonic() > deadline:
                raise PeerError(f"{args.peer} never appeared in the peer list")
            time.sleep(0.2)
        # The peer's NAT report may still be on its way; it only matters for the fast refusal.
        time.sleep(1.0)
        started = time.monotonic()
        with agent.connect(args.peer, timeout=15) as path:
            path.send(b"ping")
            reply = path.recv(timeout=5)
            result = {
                "ok": True,
                "peer_address": list(path.peer_address),
                "reply": reply.decode(),
                "seconds": round(time.monotonic() - started, 3),
            }
    except (PeerError, OSError) as exc:
        result = {
            "ok": False,
            "error_type": type(exc).__name__,
            "error": str(exc),
            "seconds": None if started is None else round(time.monotonic() - started, 3),
        }
    print(json.dumps(result), flush=True)
    agent.stop(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
