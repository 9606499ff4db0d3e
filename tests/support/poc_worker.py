"""The proof-of-concept worker's conversation, unchanged: the `websockets` client it used,
the one message it sent, and a receive loop that ignores what it is told."""

from __future__ import annotations

import asyncio
import json

import websockets


async def run_poc_worker(
    base_url: str,
    worker_id: str,
    public_ip: str | None,
    *,
    stop: asyncio.Event,
    received: list[str],
) -> None:
    uri = base_url.replace("http://", "ws://").replace("https://", "wss://")
    uri = f"{uri}/ws/register/{worker_id}"
    async with websockets.connect(uri, ping_interval=25, ping_timeout=25) as ws:
        if public_ip:
            await ws.send(json.dumps({"type": "register_public_ip", "ip": public_ip}))
        receiver = asyncio.ensure_future(_receive_all(ws, received))
        await stop.wait()
        receiver.cancel()


async def _receive_all(ws: websockets.ClientConnection, received: list[str]) -> None:
    async for message in ws:
        received.append(message if isinstance(message, str) else message.decode())
