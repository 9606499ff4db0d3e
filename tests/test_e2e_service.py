"""End to end: a real daphne (`manage.py serve`) on a free loopback port, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from registry.core import protocol
from registry.models import Connection, ServerInstance, Worker, WorkerStatus
from tests.support.poc_worker import run_poc_worker
from tests.support.processes import ServerProcess, get_json, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def listing(server: ServerProcess) -> dict:
    status, body = get_json(f"{server.url}/debug/list_workers")
    assert status == 200
    return body


def status_of(worker_id: str) -> str | None:
    return Worker.objects.filter(id=worker_id).values_list("status", flat=True).first()


def test_an_unchanged_proof_of_concept_worker_registers_and_reports_its_address(
    server: ServerProcess,
) -> None:
    async def scenario() -> list[str]:
        stop, received = asyncio.Event(), []
        task = asyncio.ensure_future(
            run_poc_worker(server.url, "poc-1", "198.51.100.7", stop=stop, received=received)
        )
        for _ in range(200):
            body = await asyncio.to_thread(listing, server)
            if body["workers"].get("poc-1", {}).get("public_ip") == "198.51.100.7":
                break
            await asyncio.sleep(0.05)
        assert body["connected_workers_count"] == 1
        entry = body["workers"]["poc-1"]
        assert entry["connected"] is True and entry["raw_state"] == 1
        assert isinstance(entry["public_port"], int)
        stop.set()
        await task
        return received

    received = asyncio.run(scenario())
    assert json.loads(received[0])["type"] == "welcome"
    wait_until(lambda: listing(server)["connected_workers_count"] == 0, timeout=10, what="removal")
    assert status_of("poc-1") == WorkerStatus.DISCONNECTED
    row = Connection.objects.get(worker_id="poc-1")
    assert row.close_code == 1000 and row.public_ip == "198.51.100.7"


def test_second_socket_supersedes_the_first_over_the_wire(server: ServerProcess) -> None:
    async def scenario() -> tuple[list[str], int | None]:
        old = await websockets.connect(f"{server.ws_url}/ws/register/dup")
        await old.recv()
        new = await websockets.connect(f"{server.ws_url}/ws/register/dup")
        welcome = json.loads(await new.recv())
        frames = []
        try:
            async for frame in old:
                frames.append(frame)
        except ConnectionClosed:
            pass
        code = old.close_code
        wait_current = welcome["connection_id"]
        await new.close()
        return frames, code, wait_current

    frames, code, current = asyncio.run(scenario())
    assert code == protocol.CloseCode.SUPERSEDED
    assert json.loads(frames[-1])["reason"] == "New connection from same worker ID"
    wait_until(lambda: Connection.objects.filter(pk=current, close_code=1000).exists(), timeout=10)
    codes = list(
        Connection.objects.filter(worker_id="dup")
        .order_by("id")
        .values_list("close_code", flat=True)
    )
    assert codes == [4000, 1000]


@pytest.mark.parametrize("worker_id", ["-dash-first", "has%20space", "x" * 129, "a%2Fb", "a/b"])
def test_ids_outside_the_rule_get_http_403_at_the_handshake(
    server: ServerProcess, worker_id: str
) -> None:
    async def scenario() -> int:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{server.ws_url}/ws/register/{worker_id}")
        return refused.value.response.status_code

    assert asyncio.run(scenario()) == 403
    assert not Worker.objects.exists()


def test_a_cross_site_browser_origin_is_refused_and_a_program_is_not(server: ServerProcess) -> None:
    async def scenario() -> tuple[int, str]:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(
                f"{server.ws_url}/ws/register/hijacked", origin="https://evil.example"
            )
        ws = await websockets.connect(f"{server.ws_url}/ws/register/own-page", origin=server.url)
        welcome = json.loads(await ws.recv())
        await ws.close()
        return refused.value.response.status_code, welcome["type"]

    assert asyncio.run(scenario()) == (403, "welcome")
    assert not Worker.objects.filter(id="hijacked").exists()


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(
    server_factory: Callable[..., ServerProcess],
) -> None:
    behind_proxy = server_factory(env={"RENDEZVOUS_TRUSTED_PROXIES": "127.0.0.0/8"}).start()

    async def scenario(url: str, worker_id: str) -> dict:
        ws = await websockets.connect(
            f"{url}/ws/register/{worker_id}",
            additional_headers={"X-Forwarded-For": "192.0.2.1, 203.0.113.9"},
        )
        welcome = json.loads(await ws.recv())
        await ws.close()
        return welcome

    trusted = asyncio.run(scenario(behind_proxy.ws_url, "via-proxy"))
    assert (trusted["observed_ip"], trusted["observed_port"]) == ("203.0.113.9", None)
    behind_proxy.stop()
    direct = server_factory().start()
    spoofed = asyncio.run(scenario(direct.ws_url, "spoofer"))
    assert spoofed["observed_ip"] == "127.0.0.1"
    direct.stop()


def test_other_websocket_paths_get_http_403(server: ServerProcess) -> None:
    async def scenario() -> int:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{server.ws_url}/ws/elsewhere")
        return refused.value.response.status_code

    assert asyncio.run(scenario()) == 403
    assert server.process.poll() is None
    assert "Traceback" not in server.log_tail(200)


def test_frames_above_the_transport_cap_drop_the_connection_and_others_never_notice(
    server: ServerProcess,
) -> None:
    async def scenario() -> tuple[int | None, dict, dict]:
        calm = await websockets.connect(f"{server.ws_url}/ws/register/calm")
        await calm.recv()
        rude = await websockets.connect(f"{server.ws_url}/ws/register/rude", max_size=None)
        await rude.recv()
        await rude.send(json.dumps({"type": "heartbeat", "pad": "x" * 10_000}))
        soft = json.loads(await rude.recv())  # above 4 KiB: an error, the connection stays
        await rude.send("x" * 200_000)  # above 64 KiB: the WebSocket layer drops it
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(rude.recv(), 5)
        await calm.send('{"type": "heartbeat"}')
        ack = json.loads(await calm.recv())
        await calm.close()
        return rude.close_code, soft, ack

    code, soft, ack = asyncio.run(scenario())
    assert soft["code"] == "FRAME_TOO_LARGE"
    assert code == 1006  # autobahn fails the connection by dropping TCP, without a close frame
    assert ack["type"] == "heartbeat_ack"
    wait_until(lambda: status_of("rude") == WorkerStatus.DISCONNECTED, timeout=10, what="close")
    assert Connection.objects.get(worker_id="rude").close_code == 1006
    wait_until(lambda: status_of("calm") == WorkerStatus.DISCONNECTED, timeout=10, what="close")
    assert Connection.objects.get(worker_id="calm").close_code == 1000  # its own, clean close


def test_garbage_from_one_worker_is_answered_and_stored_nowhere(server: ServerProcess) -> None:
    async def scenario() -> list[dict]:
        ws = await websockets.connect(f"{server.ws_url}/ws/register/noisy")
        await ws.recv()
        replies = []
        for frame in [
            "{",
            "[]",
            '{"type":"x"}',
            '{"type":"register_public_ip","ip":"1.2.3"}',
            b"\x01",
        ]:
            await ws.send(frame)
            replies.append(json.loads(await ws.recv()))
        await ws.close()
        return replies

    codes = [reply["code"] for reply in asyncio.run(scenario())]
    assert codes == [
        "INVALID_JSON",
        "NOT_AN_OBJECT",
        "UNKNOWN_TYPE",
        "INVALID_IP",
        "RELAY_MALFORMED",
    ]
    assert Worker.objects.get(id="noisy").public_ip is None


async def hold(url: str, worker_id: str, ready: asyncio.Event, stop: asyncio.Event) -> int | None:
    ws = await websockets.connect(f"{url}/ws/register/{worker_id}")
    await ws.recv()
    ready.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), 60)
    return ws.close_code


def connect_and_hold(server: ServerProcess, worker_id: str) -> Callable[[], None]:
    """Open a socket in a background loop; returns a function that waits for it to end."""
    import threading

    done = threading.Event()

    def run() -> None:
        async def main() -> None:
            ready, stop = asyncio.Event(), asyncio.Event()
            with contextlib.suppress(WebSocketException, OSError):
                await hold(server.ws_url, worker_id, ready, stop)

        asyncio.run(main())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_until(lambda: status_of(worker_id) == WorkerStatus.CONNECTED, timeout=10, what=worker_id)
    return lambda: done.wait(20)


def test_registry_survives_a_restart_and_reconnection_keeps_history(server: ServerProcess) -> None:
    ended = connect_and_hold(server, "keeper")
    first_seen = Worker.objects.get(id="keeper").first_seen
    assert server.stop() == 0  # SIGTERM: a clean shutdown
    ended()
    row = Connection.objects.get(worker_id="keeper")
    assert (row.close_code, row.close_reason) == (4002, "server shutting down, reconnect")
    assert status_of("keeper") == WorkerStatus.DISCONNECTED
    server.start()
    ended = connect_and_hold(server, "keeper")
    assert Worker.objects.get(id="keeper").first_seen == first_seen
    assert Connection.objects.filter(worker_id="keeper").count() == 2
    server.stop()


def test_a_crashed_instance_closes_its_sessions_at_its_next_start(server: ServerProcess) -> None:
    connect_and_hold(server, "orphan")
    crashed = Worker.objects.get(id="orphan").current_connection.instance_id
    server.kill()
    assert status_of("orphan") == WorkerStatus.CONNECTED  # nobody has noticed yet
    server.start()
    wait_until(
        lambda: status_of("orphan") == WorkerStatus.DISCONNECTED, timeout=10, what="takeover"
    )
    row = Connection.objects.get(worker_id="orphan")
    assert row.close_reason == protocol.REASON_INSTANCE_RESTARTED
    assert ServerInstance.objects.get(id=crashed).stopped_at is not None


def test_a_crashed_instance_is_swept_by_a_live_one_within_the_bound(
    server_factory: Callable[..., ServerProcess],
) -> None:
    doomed = server_factory().start()
    survivor = server_factory().start()
    connect_and_hold(doomed, "on-doomed")
    connect_and_hold(survivor, "on-survivor")
    doomed.kill()
    # Bound: INSTANCE_DEAD_AFTER (4 s here) + one housekeeping interval (1 s) + slack.
    wait_until(
        lambda: status_of("on-doomed") == WorkerStatus.DISCONNECTED, timeout=10, what="sweep"
    )
    row = Connection.objects.get(worker_id="on-doomed")
    assert row.close_reason == protocol.REASON_INSTANCE_LOST
    assert status_of("on-survivor") == WorkerStatus.CONNECTED
    survivor.stop()
