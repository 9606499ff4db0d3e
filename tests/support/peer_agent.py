"""A worker for the path tests, run inside a worker's network namespace (or on loopback).

    python -m tests.support.peer_agent answer  --url URL --id w2
    python -m tests.support.peer_agent connect --url URL --id w1 --peer w2 [--wait-kind direct]
                                               [--stream 10] [--no-udp]

`answer` keeps a WorkerAgent registered. On a raw path it echoes every datagram (prefixed with
b"echo:"); on an encrypted connection it answers each stream with the SHA-256 of what arrived
on it, and echoes datagrams. `connect` waits until the peer is listed, then either opens a raw
path (the default), sends b"ping" and waits for its echo (the time to first byte), optionally
waits for the path to reach a kind, optionally streams numbered datagrams for a while (counting
echoes, and the route each went out on); or, with `--quic BYTES`, connects encrypted and sends
that many random bytes over one stream, checking the digest that comes back. It prints one
JSON line: the outcome, the path's kinds over time, the figures, or the error's class and
message. Exit status 0 either way; the test reads the line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from worker_agent import PeerConnection, PeerError, PeerPath, WorkerAgent

TIMED = b"T"  # the first byte of a stream whose arrivals the answering side times
CHUNK = 64 * 1024


def digest_streams(agent: WorkerAgent, conn: PeerConnection) -> None:
    """Each stream: the SHA-256 of everything that arrived on it, sent back when it ends."""

    def one(stream: Any) -> None:
        digest = hashlib.sha256()
        timed = stream.recv_exactly(1, timeout=120) == TIMED
        if not timed:
            stream.close()  # not a stream of ours
            return
        last, longest = time.monotonic(), 0.0
        while data := stream.recv(1 << 20, timeout=120):
            now = time.monotonic()
            last, longest = now, max(longest, now - last)
            digest.update(data)
        stream.sendall(json.dumps({"sha256": digest.hexdigest(), "longest_gap": longest}).encode())
        stream.shutdown_write()

    def datagrams() -> None:
        while True:
            try:
                conn.send_datagram(b"echo:" + conn.recv_datagram(timeout=300))
            except (TimeoutError, PeerError):
                return

    def serve() -> None:
        threading.Thread(target=datagrams, daemon=True).start()
        while True:
            try:
                stream = conn.accept_stream(timeout=300)
            except (TimeoutError, PeerError):
                return
            threading.Thread(target=one, args=(stream,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def quic_transfer(
    agent: WorkerAgent, peer: str, size: int, kinds: list[str], pace: float = 0.0
) -> dict[str, Any]:
    """`size` random bytes over one stream (at `pace` MB/s at most, when given); the peer
    answers with their digest and the longest wait between two arrivals."""
    started = time.monotonic()
    conn = agent.connect(peer, timeout=15)
    connected = time.monotonic() - started
    first_kind = conn.path_kind
    if kinds:
        conn.path.wait_for_kind(*kinds, timeout=15)
    payload = os.urandom(size)
    stream = conn.open_stream()
    began = time.monotonic()
    stream.sendall(TIMED, timeout=10)
    for offset in range(0, size, CHUNK):
        stream.sendall(payload[offset : offset + CHUNK], timeout=120)
        if pace:
            time.sleep(max(0.0, began + (offset + CHUNK) / (pace * 1e6) - time.monotonic()))
    stream.shutdown_write()
    answer = json.loads(stream.makefile("rb").read().decode())
    reply = answer["sha256"]
    seconds = time.monotonic() - began
    conn.send_datagram(b"dg")
    datagram = conn.recv_datagram(timeout=10)
    result = {
        "ok": reply == hashlib.sha256(payload).hexdigest(),
        "first_kind": first_kind,
        "kind": conn.path_kind,
        "kinds": [kind for _, kind in conn.path.history],
        "connect_ms": round(1000 * connected, 1),
        "handshake_ms": round(1000 * (conn.handshake_seconds or 0), 1),
        "mb_per_s": round(size / 1e6 / seconds, 2),
        "longest_gap": round(answer["longest_gap"], 3),
        "seconds_to": {kind: round(at - started, 3) for at, kind in conn.path.history},
        "peer_fingerprint": conn.peer_fingerprint,
        "datagram": datagram.decode(),
        "remote_address": list(conn.remote_address) if conn.remote_address else None,
    }
    conn.close()
    return result


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
    parser.add_argument("--quic", type=int, default=0, help="bytes over one encrypted stream")
    parser.add_argument("--pace", type=float, default=0, help="MB/s at most on that stream")
    parser.add_argument("--credential-file", default=None)
    parser.add_argument(
        "--wait-nat", action="store_true", help="connect once this agent's NAT report is out"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    agent = WorkerAgent(
        args.url,
        args.id,
        ip_echo_url="",
        on_peer=digest_streams if args.mode == "answer" else None,
        on_peer_path=echo if args.mode == "answer" else None,
        peer_udp=not args.no_udp,
        credential_file=args.credential_file,
    )
    agent.start()
    if args.mode == "answer":
        threading.Event().wait()  # until the test ends the process
        return 0
    deadline = time.monotonic() + args.timeout
    result: dict[str, Any]
    try:
        while not any(
            p["worker_id"] == args.peer and (p["nat_mapping"] or not args.wait_nat)
            for p in agent.list_peers(timeout=5)
        ):
            if time.monotonic() > deadline:
                raise PeerError(f"{args.peer} never appeared in the peer list")
            time.sleep(0.2)
        while args.wait_nat and agent.peers.last_nat_report is None:
            if time.monotonic() > deadline:
                raise PeerError("no NAT report of this agent's own")
            time.sleep(0.05)
        time.sleep(0.3 if args.wait_nat else 0)  # the service stores reports in batches
        if args.quic:
            kinds = [k for k in args.wait_kind.split(",") if k]
            outcome = quic_transfer(agent, args.peer, args.quic, kinds, args.pace)
            print(json.dumps(outcome), flush=True)
            agent.stop(5)
            return 0
        started = time.monotonic()
        path = agent.connect_path(args.peer, timeout=10)
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
