"""The benchmark's baseline: the registration protocol served by FastAPI on uvicorn with the
registry in memory (what the proof of concept was). Not part of the service.

    python bench/baseline_fastapi.py --port 8001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_registry import MemoryRegistry

registry = MemoryRegistry()
app = FastAPI()


@app.websocket("/ws/register/{worker_id}")
async def register(websocket: WebSocket, worker_id: str) -> None:
    await websocket.accept()
    client = (websocket.client.host, websocket.client.port) if websocket.client else None
    await websocket.send_text(registry.connect(worker_id, client))
    try:
        while True:
            await websocket.send_text(registry.receive(worker_id, await websocket.receive_text()))
    except WebSocketDisconnect:
        registry.disconnect(worker_id)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/debug/list_workers")
async def debug_list_workers() -> dict[str, Any]:
    return registry.debug_listing()


@app.get("/api/workers/")
async def api_workers(page: int = 1, page_size: int = 100) -> dict[str, Any]:
    return registry.api_listing(page, page_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--backlog", type=int, default=2048)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        log_level="warning",
        ws_ping_interval=20,
        ws_ping_timeout=30,
    )


if __name__ == "__main__":
    main()
