"""The fix over autobahn: its per-connection configuration dump is made only when logged."""

from __future__ import annotations

import pprint

import pytest
from autobahn.websocket import protocol

from registry.ops import websocket_server

pytestmark = pytest.mark.standalone


def test_the_dump_is_lazy_and_reads_as_autobahns_own() -> None:
    websocket_server.install()
    value = [("autoPingTimeout", 30, "WebSocketServerFactory"), ("maxFramePayloadSize", 65536, "")]
    dump = protocol.pformat(value)
    assert isinstance(dump, websocket_server.LazyPformat)
    assert f"\n{dump}" == "\n" + pprint.pformat(value)


def test_timings_still_print_as_text() -> None:
    websocket_server.install()
    timings = protocol.Timings()
    timings.track("onOpen")
    assert isinstance(str(timings), str) and "onOpen" in str(timings)


def test_installing_twice_keeps_the_fix() -> None:
    assert websocket_server.install() in (True, False)
    assert websocket_server.install() is True
    assert protocol.pformat is websocket_server.LazyPformat
