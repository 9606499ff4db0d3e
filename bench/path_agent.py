"""A worker for bench/peer_paths.py, run in a worker's network namespace (or on loopback).

    python bench/path_agent.py answer --url URL --id B [--no-udp]
    python bench/path_agent.py ttfb   --url URL --id A --peer B --count 20 [--wait-kind direct]
    python bench/path_agent.py blast  --url URL --id A --peer B --seconds 5 [--no-udp]
    python bench/path_agent.py offline --url URL --id A --count 20
    python bench/path_agent.py udp-recv --bind 203.0.113.10:9000 --seconds 5
    python bench/path_agent.py udp-send --to 203.0.113.10:9000 --seconds 5
    python bench/path_agent.py quic-answer --url URL --id B [--no-udp]
    python bench/path_agent.py quic-send --url URL --id A --peer B --megabytes 16 --count 10

`answer` echoes pings and counts bulk bytes. `ttfb` connects `count` times, each time timing
connect() and the first echoed byte, and the time until the path reaches its best kind. `blast`
sends 1,200-byte datagrams as fast as the path takes them and asks the peer how many bytes
arrived between the first and the last (the clock stops at the last byte's arrival).
`offline` times connect() to a worker that is not there. `udp-recv` and `udp-send` are the
baseline: the same 1,200-byte datagrams over a plain UDP socket between the same namespaces.
`quic-answer` answers encrypted connections: each stream is read to its end and answered with
what arrived (bytes, SHA-256, when the first and the last byte arrived, and this process's CPU
time in between). `quic-send` times `count` connects (introduction, path, QUIC handshake), then
sends `megabytes` over one stream; the clock stops when the last byte arrived at the peer
(CLOCK_MONOTONIC is one clock for every process on the machine, namespaces or not).
Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_agent import PeerConnection, PeerError, PeerPath, WorkerAgent

DATAGRAM = 1200
# What this process's QUIC did, counted by the probes `count_events` puts in.
EVENTS = {"lost": 0, "transmits": 0, "bursts": 0, "reads": 0}


def count_events() -> None:
    """Bench probes: packets aioquic declares lost (`_on_packets_lost`, private to aioquic 1.7,
    pinned), the QUIC session's transmit rounds and those that sent anything, and the turns of
    the loop in which the path's socket was read. Nothing else relies on them."""
    from aioquic.quic.recovery import QuicPacketRecovery

    from worker_agent.paths import ice
    from worker_agent.secure import quic

    lost = QuicPacketRecovery._on_packets_lost

    def counting_losses(self: Any, **kwargs: Any) -> None:
        packets = list(kwargs.pop("packets"))
        EVENTS["lost"] += len(packets)
        lost(self, packets=packets, **kwargs)

    transmit = quic.QuicSession.transmit

    def counting_transmits(self: Any) -> None:
        EVENTS["transmits"] += 1
        before = self._last_sent
        transmit(self)
        EVENTS["bursts"] += self._last_sent != before

    read_more = ice._Drain.read_more

    def counting_reads(self: Any) -> None:
        EVENTS["reads"] += not self._reading
        read_more(self)

    QuicPacketRecovery._on_packets_lost = counting_losses  # type: ignore[method-assign]
    quic.QuicSession.transmit = counting_transmits  # type: ignore[method-assign]
    ice._Drain.read_more = counting_reads  # type: ignore[method-assign]


def variant(name: str) -> None:
    """Alternatives measured side by side with what the agent does (bench knobs, not settings)."""
    from worker_agent.secure import pacing, quic

    if "nopacing" in name:
        from aioquic.quic.recovery import QuicPacketPacer

        QuicPacketPacer.next_send_time = lambda self, now: None  # type: ignore[method-assign]
    if "aioquicpacing" in name:  # aioquic's own pacer: bursts of 16 packets
        pacing.PACING_BURST = 0
    if "burst5ms" in name:
        pacing.PACING_BURST = 0.005
    if "lazywake" in name:  # the reader woken per 256 KiB (or at the end), not per burst
        from worker_agent.secure.streams import StreamBuffer

        def wake(self: Any) -> None:
            with self._changed:
                if len(self._data) >= 256 * 1024 or self._eof or self._error:
                    self._changed.notify_all()

        StreamBuffer.wake = wake  # type: ignore[method-assign]
    if "packet1452" in name:  # the largest QUIC packet a 1,500-byte IPv4 path carries whole
        quic.MAX_PACKET = 1452


def quic_counters(conn: PeerConnection) -> dict[str, float]:
    """What one side's QUIC did so far: datagrams on the path, packets declared lost, and the
    sender's congestion window and smoothed RTT (aioquic's private `_loss`; bench only)."""
    stats = conn.path.stats
    quic = conn._session.quic
    loss = quic._loss if quic is not None else None
    return {
        "sent": sum(stats.sent.values()),
        "received": sum(stats.received.values()),
        **EVENTS,
        "cwnd": loss.congestion_window if loss is not None else 0,
        "srtt_ms": round(loss._rtt_smoothed * 1000, 3) if loss is not None else 0,
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Counters over one transfer; the window and RTT as they are at its end."""
    return {k: v if k in ("cwnd", "srtt_ms") else v - before[k] for k, v in after.items()}


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.first: float | None = None
        self.last: float | None = None


def answer(agent: WorkerAgent, path: PeerPath) -> None:
    counter = Counter()

    def serve() -> None:
        with path:
            while True:
                try:
                    data = path.recv(timeout=300)
                except (TimeoutError, PeerError):
                    return
                if data.startswith(b"bulk"):
                    now = time.monotonic()
                    counter.first = counter.first or now
                    counter.last = now
                    counter.bytes += len(data)
                elif data == b"stat":
                    reply = {"bytes": counter.bytes, "first": counter.first, "last": counter.last}
                    path.send(b"stat:" + json.dumps(reply).encode())
                else:
                    path.send(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()


def quic_answer(agent: WorkerAgent, conn: PeerConnection) -> None:
    while True:
        try:
            stream = conn.accept_stream(timeout=600)
        except (TimeoutError, PeerError):
            return
        digest = hashlib.sha256()
        received, first, last, cpu, system = 0, None, None, 0.0, 0.0
        counters = quic_counters(conn)
        while data := stream.recv(1 << 20, timeout=60):
            last = time.monotonic()
            if first is None:
                first, cpu, system = last, time.process_time(), os.times().system
            received += len(data)
            digest.update(data)
        reply = {
            "bytes": received,
            "sha256": digest.hexdigest(),
            "first": first,
            "last": last,
            "cpu_s": time.process_time() - cpu,
            "system_s": os.times().system - system,
            "counters": delta(quic_counters(conn), counters),
        }
        stream.sendall(json.dumps(reply).encode())
        stream.shutdown_write()


def quic_send(
    agent: WorkerAgent, peer: str, megabytes: int, count: int, repeat: int, kinds: list[str]
) -> dict:
    setups, handshakes, first_kinds = [], [], {}
    for _ in range(count):
        started = time.monotonic()
        with agent.connect(peer, timeout=15) as conn:
            setups.append(1000 * (time.monotonic() - started))
            handshakes.append(1000 * (conn.handshake_seconds or 0))
            first_kinds[str(conn.path_kind)] = first_kinds.get(str(conn.path_kind), 0) + 1
        time.sleep(1.05)  # the service allows one connect request a second after a burst of 5
    payload = os.urandom(megabytes * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    mb = len(payload) / 1e6
    rates, sender_cpu, receiver_cpu, intact = [], 0.0, 0.0, True
    transfers: list[dict[str, Any]] = []
    with agent.connect(peer, timeout=15) as conn:
        if kinds and not conn.path.wait_for_kind(*kinds, timeout=20):
            return {"error": f"the path never reached {kinds} (it is {conn.path_kind})"}
        kind = conn.path_kind
        for _ in range(repeat):  # one stream each, one after the other, on the one connection
            stream = conn.open_stream()
            counters = quic_counters(conn)
            started, cpu, system = time.monotonic(), time.process_time(), os.times().system
            stream.sendall(payload, timeout=600)
            stream.shutdown_write()
            answer = b""
            while part := stream.recv(4096, timeout=600):
                answer += part
            reply = json.loads(answer)
            spent, kernel = time.process_time() - cpu, os.times().system - system
            sender_cpu += spent
            receiver_cpu += reply["cpu_s"]
            intact = intact and reply["sha256"] == digest
            rates.append(mb / (reply["last"] - started))
            transfers.append(
                {
                    "mb_per_s": round(rates[-1], 2),
                    "cpu_s_per_mb": [round(spent / mb, 4), round(reply["cpu_s"] / mb, 4)],
                    "system_s_per_mb": [
                        round(kernel / mb, 4),
                        round(reply["system_s"] / mb, 4),
                    ],
                    "sender": delta(quic_counters(conn), counters),
                    "receiver": reply["counters"],
                }
            )
    return {
        "kind": kind,
        "first_route": first_kinds,
        "setup_p50_ms": round(statistics.median(setups), 1),
        "setup_p99_ms": round(percentile(setups, 99), 1),
        "handshake_p50_ms": round(statistics.median(handshakes), 1),
        "handshake_p99_ms": round(percentile(handshakes, 99), 1),
        "mb": round(mb, 2),
        "intact": intact,
        "mb_per_s": round(statistics.median(rates), 2),
        "mb_per_s_min": round(min(rates), 2),
        "mb_per_s_max": round(max(rates), 2),
        "sender_cpu_s_per_mb": round(sender_cpu / mb / repeat, 4),
        "receiver_cpu_s_per_mb": round(receiver_cpu / mb / repeat, 4),
        "transfers": transfers,
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def wait_listed(agent: WorkerAgent, peer: str) -> None:
    deadline = time.monotonic() + 30
    while not any(p["worker_id"] == peer for p in agent.list_peers(timeout=5)):
        if time.monotonic() > deadline:
            raise PeerError(f"{peer} never appeared")
        time.sleep(0.1)


def ttfb(agent: WorkerAgent, peer: str, count: int, kinds: list[str], wait: float) -> dict:
    connects, firsts, best = [], [], []
    final: dict[str, int] = {}
    for n in range(count):
        started = time.monotonic()
        path = agent.connect_path(peer, timeout=10)
        connects.append(1000 * (time.monotonic() - started))
        path.send(b"ping:%d" % n)
        while path.recv(timeout=5) != b"echo:ping:%d" % n:
            pass
        firsts.append(1000 * (time.monotonic() - started))
        if kinds and path.wait_for_kind(*kinds, timeout=wait):
            best.append(1000 * (time.monotonic() - started))
        final[str(path.kind)] = final.get(str(path.kind), 0) + 1
        path.close()
        time.sleep(1.05)  # the service allows one connect request a second after a burst of 5
    result: dict[str, Any] = {
        "count": count,
        "connect_p50_ms": round(statistics.median(connects), 1),
        "ttfb_p50_ms": round(statistics.median(firsts), 1),
        "ttfb_p99_ms": round(percentile(firsts, 99), 1),
        "final_kinds": final,
    }
    if best:
        result["best_kind_p50_ms"] = round(statistics.median(best), 1)
        result["best_kind_p99_ms"] = round(percentile(best, 99), 1)
    return result


def blast(agent: WorkerAgent, peer: str, seconds: float, kinds: list[str]) -> dict:
    path = agent.connect_path(peer, timeout=10)
    if kinds:
        path.wait_for_kind(*kinds, timeout=15)
    kind = path.kind
    payload = b"bulk" + b"\0" * (DATAGRAM - 4)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for _ in range(64):
            path.send(payload, timeout=None)
        sent += 64 * DATAGRAM
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # stragglers
    stat = ask_for_stat(path)
    window = (stat["last"] or 0) - (stat["first"] or 0)
    path.close()
    return {
        "kind": kind,
        "sent_mb": round(sent / 1e6, 2),
        "send_seconds": round(elapsed, 2),
        "received_mb": round(stat["bytes"] / 1e6, 2),
        "receive_seconds": round(window, 3),
        "mb_per_s": round(stat["bytes"] / 1e6 / window, 2) if window > 0 else None,
        "delivered": round(stat["bytes"] / sent, 4) if sent else None,
    }


def ask_for_stat(path: Any, *, patience: float = 60.0) -> dict:
    """The receiver's count, asked for once a second: the request is a datagram too, and may be
    lost, or wait behind a backlog the receiver is still reading."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        path.send(b"stat")
        try:
            while not (reply := path.recv(timeout=1.0)).startswith(b"stat:"):
                pass
        except TimeoutError:
            continue
        return json.loads(reply[5:])
    raise TimeoutError(f"no count from the receiver within {patience:g} s")


def offline(agent: WorkerAgent, count: int) -> dict:
    times = []
    for n in range(count):
        started = time.monotonic()
        try:
            agent.connect_path(f"nobody-{n}", timeout=10)
        except PeerError:
            times.append(1000 * (time.monotonic() - started))
        time.sleep(1.05)
    return {
        "count": count,
        "failure_p50_ms": round(statistics.median(times), 1),
        "failure_p99_ms": round(percentile(times, 99), 1),
    }


def udp_recv(bind: str, seconds: float) -> dict:
    host, port = bind.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((host, int(port)))
        print(json.dumps({"listening": bind}), flush=True)
        sock.settimeout(seconds + 30)
        received, first, last = 0, None, None
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if data == b"done":
                break
            last = time.monotonic()
            first = first or last
            received += len(data)
            sock.settimeout(2.0)
    window = (last or 0) - (first or 0)
    return {
        "received_mb": round(received / 1e6, 2),
        "receive_seconds": round(window, 3),
        "mb_per_s": round(received / 1e6 / window, 2) if window > 0 else None,
    }


def udp_send(to: str, seconds: float) -> dict:
    host, port = to.rsplit(":", 1)
    payload = b"\0" * DATAGRAM
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, int(port)))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for _ in range(64):
                try:
                    sock.send(payload)
                    sent += DATAGRAM
                except OSError:  # ENOBUFS: the datagram is dropped, as the relay drops too
                    pass
        time.sleep(0.5)
        for _ in range(5):
            sock.send(b"done")
    return {"sent_mb": round(sent / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode",
        choices=[
            "answer", "ttfb", "blast", "offline", "udp-recv", "udp-send", "quic-answer",
            "quic-send",
        ],
    )  # fmt: skip
    parser.add_argument("--url")
    parser.add_argument("--id")
    parser.add_argument("--bind")
    parser.add_argument("--to")
    parser.add_argument("--peer")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--wait-kind", default="")
    parser.add_argument("--wait", type=float, default=15)
    parser.add_argument("--no-udp", action="store_true")
    parser.add_argument("--megabytes", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--congestion-control", help="aioquic's controller for this agent's QUIC (reno, cubic)"
    )
    args = parser.parse_args()
    if args.congestion_control:  # a bench knob, not a setting: bench/peer_loss.py compares them
        from worker_agent.secure import quic

        quic.CONGESTION_CONTROL = args.congestion_control
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.mode.startswith("quic"):
        count_events()
        variant(os.environ.get("BENCH_VARIANT", ""))
    if args.mode == "udp-recv":
        print(json.dumps(udp_recv(args.bind, args.seconds)), flush=True)
        return 0
    if args.mode == "udp-send":
        print(json.dumps(udp_send(args.to, args.seconds)), flush=True)
        return 0
    agent = WorkerAgent(
        args.url,
        args.id,
        ip_echo_url="",
        on_peer_path=answer if args.mode == "answer" else None,
        on_peer=quic_answer if args.mode == "quic-answer" else None,
        peer_udp=not args.no_udp,
    )
    agent.start()
    if not agent.wait_registered(30):
        print(json.dumps({"error": "not registered"}), flush=True)
        return 1
    print(json.dumps({"registered": args.id}), flush=True)
    if args.mode in ("answer", "quic-answer"):
        threading.Event().wait()
    kinds = [k for k in args.wait_kind.split(",") if k]
    try:
        if args.mode == "offline":
            result = offline(agent, args.count)
        else:
            wait_listed(agent, args.peer)
            if args.mode == "ttfb":
                result = ttfb(agent, args.peer, args.count, kinds, args.wait)
            elif args.mode == "quic-send":
                result = quic_send(agent, args.peer, args.megabytes, args.count, args.repeat, kinds)
            else:
                result = blast(agent, args.peer, args.seconds, kinds)
    except (PeerError, TimeoutError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    agent.stop(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
