"""The consumer through channels' WebsocketCommunicator: each documented outcome of a frame."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from registry.core import protocol
from registry.models import Connection, Worker, WorkerStatus
from registry.ops import control
from registry.presence import instances
from registry.presence.runtime import InstanceRuntime
from registry.routing import websocket_urlpatterns

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

application = URLRouter(websocket_urlpatterns)


def communicator(
    worker_id: str, client: tuple[str, int] = ("203.0.113.5", 40000)
) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, f"/ws/register/{worker_id}")
    comm.scope["client"] = client
    return comm


async def connected(worker_id: str, **kwargs) -> tuple[WebsocketCommunicator, dict]:
    comm = communicator(worker_id, **kwargs)
    accepted, _ = await comm.connect()
    assert accepted
    welcome = await comm.receive_json_from()
    return comm, welcome


@database_sync_to_async
def worker(worker_id: str) -> Worker:
    return Worker.objects.get(id=worker_id)


@database_sync_to_async
def connections(worker_id: str) -> list[Connection]:
    return list(Connection.objects.filter(worker_id=worker_id).order_by("id"))


async def test_welcome_names_the_id_the_observed_address_and_the_heartbeat() -> None:
    comm, welcome = await connected("w1")
    assert welcome["type"] == "welcome"
    assert welcome["worker_id"] == "w1"
    assert (welcome["observed_ip"], welcome["observed_port"]) == ("203.0.113.5", 40000)
    assert welcome["heartbeat_interval"] == 30.0
    assert welcome["connection_id"] == (await worker("w1")).current_connection_id
    await comm.disconnect()


async def test_register_public_ip_updates_the_reported_address() -> None:
    comm, _ = await connected("w1")
    await comm.send_to(text_data=json.dumps({"type": "register_public_ip", "ip": "198.51.100.7"}))
    assert await comm.receive_json_from() == {"type": "public_ip_registered", "ip": "198.51.100.7"}
    assert (await worker("w1")).public_ip == "198.51.100.7"
    await comm.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("hello", "INVALID_JSON"),
        ("[1]", "NOT_AN_OBJECT"),
        ('{"type": "teleport"}', "UNKNOWN_TYPE"),
        ('{"type": "register_public_ip"}', "MISSING_FIELD"),
        ('{"type": "register_public_ip", "ip": "999.1.1.1"}', "INVALID_IP"),
        ('{"type": "register_public_ip", "ip": "<script>"}', "INVALID_IP"),
    ],
)
async def test_bad_text_frames_get_an_error_and_the_connection_stays(frame: str, code: str) -> None:
    comm, _ = await connected("w1")
    await comm.send_to(text_data=frame)
    reply = await comm.receive_json_from()
    assert (reply["type"], reply["code"]) == ("error", code)
    await comm.send_to(text_data='{"type": "heartbeat"}')
    assert (await comm.receive_json_from())["type"] == "heartbeat_ack"
    assert (await worker("w1")).public_ip is None
    await comm.disconnect()


async def test_binary_frames_that_are_not_relay_frames_get_an_error_and_the_connection_stays() -> (
    None
):
    comm, _ = await connected("w1")
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await comm.receive_json_from())["code"] == "RELAY_MALFORMED"
    await comm.send_to(text_data='{"type": "heartbeat"}')
    assert (await comm.receive_json_from())["type"] == "heartbeat_ack"
    await comm.disconnect()


async def test_oversized_frames_get_an_error_and_the_connection_stays() -> None:
    comm, _ = await connected("w1")
    await comm.send_to(text_data=json.dumps({"type": "heartbeat", "pad": "x" * 10_000}))
    assert (await comm.receive_json_from())["code"] == "FRAME_TOO_LARGE"
    await comm.send_to(text_data='{"type": "heartbeat"}')
    assert (await comm.receive_json_from())["type"] == "heartbeat_ack"
    await comm.disconnect()


async def test_agent_info_is_recorded() -> None:
    comm, _ = await connected("w1")
    info = {"hostname": "pod-7", "version": "0.1.0", "pid": 12}
    await comm.send_to(text_data=json.dumps({"type": "agent_info", "info": info}))
    assert (await comm.receive_json_from())["type"] == "agent_info_recorded"
    assert (await worker("w1")).agent_info == info
    await comm.disconnect()


@pytest.mark.parametrize("worker_id", ["-bad", "a%20b", "x" * 129, "%C3%BC"])
async def test_ids_outside_the_rule_are_refused_at_the_handshake(worker_id: str) -> None:
    comm = communicator(worker_id)
    accepted, _ = await comm.connect()
    assert not accepted
    assert not await database_sync_to_async(Worker.objects.exists)()


async def test_second_connection_supersedes_the_first_with_code_4000() -> None:
    old, _ = await connected("w1")
    new, welcome = await connected("w1")
    assert await old.receive_json_from() == {
        "type": "closing",
        "code": 4000,
        "reason": "New connection from same worker ID",
    }
    assert await old.receive_output() == {"type": "websocket.close", "code": 4000}
    await old.disconnect(code=4000)
    current = await worker("w1")
    assert current.status == WorkerStatus.CONNECTED
    assert current.current_connection_id == welcome["connection_id"]
    await new.disconnect()
    rows = await connections("w1")
    assert [row.close_code for row in rows] == [4000, 1000]


async def test_disconnect_of_the_current_connection_ends_the_registration() -> None:
    comm, _ = await connected("w1")
    await comm.disconnect(code=1001)
    current = await worker("w1")
    assert current.status == WorkerStatus.DISCONNECTED
    [row] = await connections("w1")
    assert (row.close_code, row.close_reason) == (1001, "worker going away")


@override_settings(
    RENDEZVOUS={
        **settings.RENDEZVOUS,
        "RATE_LIMIT": 1.0,
        "RATE_BURST": 3,
        "RATE_LIMIT_CLOSE_AFTER": 10,
    }
)
async def test_a_flood_gets_one_rate_limit_error_then_a_4029_close() -> None:
    comm, _ = await connected("w1")
    for _ in range(3):
        await comm.send_to(text_data='{"type": "heartbeat"}')
        assert (await comm.receive_json_from())["type"] == "heartbeat_ack"
    for _ in range(9):
        await comm.send_to(text_data='{"type": "heartbeat"}')
    assert (await comm.receive_json_from())["code"] == "RATE_LIMITED"
    assert await comm.receive_nothing(timeout=0.2)  # one error per streak, not one per message
    await comm.send_to(text_data='{"type": "heartbeat"}')  # the tenth dropped message
    closing = await comm.receive_json_from()
    assert closing == {"type": "closing", "code": 4029, "reason": "too many messages"}
    assert await comm.receive_output() == {"type": "websocket.close", "code": 4029}
    await comm.disconnect(code=4029)
    [row] = await connections("w1")
    assert row.close_code == 4029


async def test_a_flood_on_one_connection_goes_unnoticed_by_another() -> None:
    with override_settings(
        RENDEZVOUS={
            **settings.RENDEZVOUS,
            "RATE_LIMIT": 1.0,
            "RATE_BURST": 2,
            "RATE_LIMIT_CLOSE_AFTER": 5,
        }
    ):
        flooder, _ = await connected("flooder")
        calm, _ = await connected("calm")
        for _ in range(10):
            await flooder.send_to(text_data='{"type": "heartbeat"}')
        await calm.send_to(text_data='{"type": "heartbeat"}')
        assert (await calm.receive_json_from())["type"] == "heartbeat_ack"
        assert (await worker("calm")).status == WorkerStatus.CONNECTED
        await flooder.disconnect()
        await calm.disconnect()


async def test_operator_disconnect_reaches_the_consumer_through_the_channel_layer() -> None:
    comm, _ = await connected("w1")
    assert await database_sync_to_async(control.disconnect_worker)("w1")
    assert (await comm.receive_json_from())["code"] == 4001
    assert await comm.receive_output() == {"type": "websocket.close", "code": 4001}
    await comm.disconnect(code=4001)
    [row] = await connections("w1")
    assert (row.close_code, row.close_reason) == (4001, "disconnected by an operator")


async def test_operator_disconnect_of_an_offline_worker_says_so() -> None:
    comm, _ = await connected("w1")
    await comm.disconnect()
    assert not await database_sync_to_async(control.disconnect_worker)("w1")


async def test_housekeeping_closes_a_socket_whose_row_was_closed_elsewhere(
    runtime: InstanceRuntime,
) -> None:
    comm, welcome = await connected("w1")
    # Another instance swept this one: its rows are closed behind its back.
    await database_sync_to_async(Connection.objects.filter(pk=welcome["connection_id"]).update)(
        closed_at=timezone.now(), close_code=1006, close_reason="swept"
    )
    later = timezone.now() + timedelta(seconds=60)
    report = await database_sync_to_async(runtime.housekeeping_round)(now=later)
    assert report.sockets_closed == 1
    assert (await comm.receive_json_from())["code"] == protocol.CloseCode.INSTANCE_RESET
    await comm.disconnect()


async def test_housekeeping_of_a_swept_instance_starts_a_new_boot_and_closes_its_sockets(
    runtime: InstanceRuntime,
) -> None:
    comm, _welcome = await connected("w1")
    old_id = runtime.instance_id
    await database_sync_to_async(instances.stop_instance)(instance_id=old_id, reason="swept")
    report = await database_sync_to_async(runtime.housekeeping_round)()
    assert report.declared_dead and report.sockets_closed == 1
    assert runtime.instance_id != old_id
    assert (await comm.receive_json_from())["code"] == protocol.CloseCode.INSTANCE_RESET
    await comm.disconnect()
