"""The registry kept in a dict, for the two comparison servers of the benchmark (the FastAPI
baseline and the bare-Channels floor): the same frames and the same JSON shapes as the service,
nothing stored anywhere else."""

from __future__ import annotations

import json
import math
import time
from typing import Any

HEARTBEAT_INTERVAL = 30


class MemoryRegistry:
    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.next_connection_id = 1

    def connect(self, worker_id: str, client: tuple[str, int] | None) -> str:
        """Register a connection; returns the `welcome` frame."""
        ip, port = client or (None, None)
        connection_id = self.next_connection_id
        self.next_connection_id += 1
        self.workers[worker_id] = {
            "connection_id": connection_id,
            "observed_ip": ip,
            "observed_port": port,
            "public_ip": None,
        }
        return json.dumps(
            {
                "type": "welcome",
                "worker_id": worker_id,
                "connection_id": connection_id,
                "observed_ip": ip,
                "observed_port": port,
                "heartbeat_interval": HEARTBEAT_INTERVAL,
            }
        )

    def receive(self, worker_id: str, text: str) -> str:
        """One client frame in, its reply out."""
        try:
            message = json.loads(text)
        except ValueError:
            return json.dumps({"type": "error", "code": "INVALID_JSON", "message": "not JSON"})
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "register_public_ip" and isinstance(message.get("ip"), str):
            self.workers[worker_id]["public_ip"] = message["ip"]
            return json.dumps({"type": "public_ip_registered", "ip": message["ip"]})
        if kind == "heartbeat":
            return json.dumps({"type": "heartbeat_ack", "server_time": time.time()})
        return json.dumps({"type": "error", "code": "UNKNOWN_TYPE", "message": str(kind)})

    def disconnect(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def debug_listing(self) -> dict[str, Any]:
        """`/debug/list_workers` in the proof of concept's shape."""
        workers = {
            worker_id: {
                "public_ip": w["public_ip"] or w["observed_ip"],
                "public_port": w["observed_port"],
                "connected": True,
                "raw_state": 1,
            }
            for worker_id, w in sorted(self.workers.items())
        }
        return {"connected_workers_count": len(workers), "workers": workers}

    def api_listing(self, page: int, page_size: int) -> dict[str, Any]:
        """`/api/workers/` (connected workers only: nothing else is kept)."""
        page_size = max(1, min(page_size, 1000))
        ids = sorted(self.workers)
        chosen = ids[(page - 1) * page_size : page * page_size]
        return {
            "count": len(ids),
            "page": page,
            "page_size": page_size,
            "num_pages": max(1, math.ceil(len(ids) / page_size)),
            "results": [
                {"id": worker_id, "status": "connected", **self.workers[worker_id]}
                for worker_id in chosen
            ],
        }
