"""Connection limits: per instance, per source address, and handshakes per address per second."""

from __future__ import annotations

import json

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import override_settings

from registry.models import Worker
from registry.presence.admission import Admission
from registry.routing import websocket_urlpatterns


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.standalone
def test_the_instance_limit_counts_open_sockets() -> None:
    admission = Admission(max_total=2, max_per_address=0, handshake_rate=0)
    admission.opened("192.0.2.1")
    assert admission.refusal("192.0.2.2") is None
    admission.opened("192.0.2.2")
    assert admission.refusal("192.0.2.3") == "this instance holds its maximum of connections"
    admission.closed("192.0.2.1")
    assert admission.refusal("192.0.2.3") is None


@pytest.mark.standalone
def test_the_per_address_limit_leaves_other_addresses_alone() -> None:
    admission = Admission(max_total=0, max_per_address=1, handshake_rate=0)
    admission.opened("192.0.2.1")
    assert admission.refusal("192.0.2.1") == "too many connections from your address"
    assert admission.refusal("192.0.2.2") is None


@pytest.mark.standalone
def test_handshakes_per_address_are_rate_limited_with_a_burst() -> None:
    clock = Clock()
    admission = Admission(max_total=0, max_per_address=0, handshake_rate=1, clock=clock)
    assert [admission.refusal("192.0.2.1") for _ in range(11)][-2:] == [
        None,
        "too many handshakes from your address",
    ]
    assert admission.refusal("192.0.2.9") is None  # another address has its own bucket
    clock.now += 1
    assert admission.refusal("192.0.2.1") is None


@pytest.mark.standalone
def test_limits_of_zero_mean_none() -> None:
    admission = Admission(max_total=0, max_per_address=0, handshake_rate=0)
    for _ in range(1000):
        admission.opened("192.0.2.1")
    assert admission.refusal("192.0.2.1") is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_refused_connection_gets_4008_and_leaves_no_row() -> None:
    limits = {**settings.RENDEZVOUS, "MAX_CONNECTIONS_PER_ADDRESS": 1}
    with override_settings(RENDEZVOUS=limits):
        first = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/register/one")
        first.scope["client"] = ("198.51.100.5", 1)
        assert (await first.connect())[0]
        await first.receive_json_from()
        second = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/register/two")
        second.scope["client"] = ("198.51.100.5", 2)
        assert (await second.connect())[0]
        closing = json.loads(await second.receive_from())
        assert closing == {
            "type": "closing",
            "code": 4008,
            "reason": "too many connections from your address",
        }
        assert await second.receive_output() == {"type": "websocket.close", "code": 4008}
        assert not await Worker.objects.filter(id="two").aexists()
        await first.disconnect()


def test_failed_authentications_count_against_an_ipv6_hosts_whole_64() -> None:
    from registry.presence.admission import Admission

    admission = Admission(
        max_total=0, max_per_address=0, handshake_rate=0, auth_failures_per_minute=3
    )
    for n in range(3):
        admission.authentication_failed(f"2001:db8:1:2::{n + 1}")  # rotating within one /64
    assert admission.refusal("2001:db8:1:2::ffff") == (
        "too many failed authentications from your address"
    )
    assert admission.refusal("2001:db8:1:3::1") is None  # the next /64 is someone else
