"""A worker whose socket is closing while a reply is on its way: the reply is dropped quietly and
counted, and the consumer's clean-up still records the close (a real daphne, a bare socket).

Until then the reply raised autobahn's `Disconnected` out of the consumer: daphne logged a
traceback, and the consumer ended without its disconnect, so the row stayed open and the socket
stayed held (the flaky `test_stop_closes_with_1000_and_the_service_records_it`).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable

import pytest

from registry.models import Connection, Worker, WorkerStatus
from tests.support.processes import ServerProcess, wait_until
from tests.support.raw_websocket import OPCODE_TEXT, RawWebSocket, close_frame, text_frame

pytestmark = pytest.mark.django_db(transaction=True)

HEARTBEAT = text_frame('{"type":"heartbeat"}')


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return sum(float(value) for value in found)


def test_a_reply_to_a_closing_socket_is_dropped_and_the_close_is_still_recorded(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # A heartbeat and the client's close frame in one write, and the TCP connection kept open:
    # autobahn takes the close before the consumer has answered the heartbeat, so the ack finds
    # the socket closing. (The service no longer reads what a connection it is closing sends,
    # so its own 4029 close cannot provoke this any more.)
    server = server_factory().start()
    client = RawWebSocket("127.0.0.1", server.port, "/ws/register/hasty")
    assert client.status == 101
    opcode, payload = client.read_frame()
    assert opcode == OPCODE_TEXT and json.loads(payload)["type"] == "welcome"
    client.send_raw(HEARTBEAT + close_frame(1000))
    wait_until(
        lambda: metric(server, "rendezvous_sends_after_close_total") >= 1,
        timeout=5,
        what="the dropped reply counted",
    )
    client.close()
    wait_until(
        lambda: Connection.objects.filter(worker_id="hasty", close_code=1000).exists(),
        timeout=10,
        what="the close recorded by the consumer's clean-up",
    )
    assert Worker.objects.get(id="hasty").status == WorkerStatus.DISCONNECTED
    wait_until(
        lambda: metric(server, "rendezvous_connected_workers") == 0,
        timeout=5,
        what="the socket no longer held",
    )
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
