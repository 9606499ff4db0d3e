"""Peer-event benchmark: how fast join events reach every subscriber, and what the fan-out costs.

S subscribers connect and send `subscribe_peers`; then J more workers register. Each joiner's
`peer_joined` must reach every subscriber: S x J frames. Prints the time from the first joiner's
handshake until the last subscriber has all J events, and the server's CPU for it (from /proc).
Not a test.

    python bench/peer_events.py --subscribers 1000 --joiners 200
    python bench/peer_events.py --subscribers 1000 --joiners 200 --setup production
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registrations import cpu_seconds, start_server

COUNTERS: set[asyncio.Task[None]] = set()  # referenced until they finish


async def subscriber(
    url: str, worker_id: str, expected: int, ready: asyncio.Event, done: list[float]
) -> websockets.ClientConnection:
    ws = await websockets.connect(
        f"{url}/ws/register/{worker_id}", ping_interval=None, open_timeout=60, max_queue=None
    )
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.send('{"type":"subscribe_peers"}')
    while (reply := json.loads(await ws.recv()))["type"] != "peers_subscribed":
        if reply["type"] == "error":
            raise RuntimeError(f"{worker_id} could not subscribe: {reply}")
    ready.set()
    task = asyncio.ensure_future(_count(ws, expected, done))
    COUNTERS.add(task)
    task.add_done_callback(COUNTERS.discard)
    return ws


async def _count(ws: websockets.ClientConnection, expected: int, done: list[float]) -> None:
    seen = 0
    async for frame in ws:
        if json.loads(frame)["type"] == "peer_joined":
            seen += 1
            if seen == expected:
                done.append(time.perf_counter())
                return


async def run(args: argparse.Namespace, url: str, pid: int) -> dict[str, float | int | str]:
    ws_url = url.replace("http", "ws", 1)
    done: list[float] = []
    gate = asyncio.Semaphore(100)

    async def subscribe(n: int) -> websockets.ClientConnection:
        async with gate:
            return await subscriber(ws_url, f"sub-{n:05d}", args.joiners, asyncio.Event(), done)

    subscribers = await asyncio.gather(*(subscribe(n) for n in range(args.subscribers)))
    await asyncio.sleep(1)
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()

    async def join(n: int) -> websockets.ClientConnection:
        async with gate:
            ws = await websockets.connect(
                f"{ws_url}/ws/register/join-{n:05d}", ping_interval=None, open_timeout=60
            )
            await ws.recv()
            return ws

    joiners = await asyncio.gather(*(join(n) for n in range(args.joiners)))
    registered = time.perf_counter()
    deadline = started + 120
    while len(done) < args.subscribers and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    cpu = cpu_seconds(pid) - cpu_before
    frames = args.subscribers * args.joiners
    results: dict[str, float | int | str] = {
        "setup": args.setup,
        "subscribers": args.subscribers,
        "joiners": args.joiners,
        "event_frames": frames,
        "subscribers_with_every_event": len(done),
        "joiners_registered_s": round(registered - started, 2),
        "last_event_delivered_s": round((max(done) if done else deadline) - started, 2),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_event_frame": round(cpu / frames * 1e6, 1),
    }
    await asyncio.gather(*(ws.close() for ws in [*subscribers, *joiners]), return_exceptions=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--joiners", type=int, default=200)
    parser.add_argument("--setup", choices=["default", "production"], default="default")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rendezvous-bench-"))
    server = start_server(args.setup, workdir, "open", [])
    try:
        results = asyncio.run(run(args, server.url, server.pid))
    finally:
        server.stop()
    print(f"\n== peer events: {args.setup} set-up ==")
    for key, value in results.items():
        print(f"{key:36} {value}")
    print(json.dumps(results))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
