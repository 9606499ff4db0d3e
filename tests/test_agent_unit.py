"""The worker agent on its own: no Django, no database, no Rendezvous server.

Modules are tested alone (wire, backoff, policy, public_ip, health, cli); the connection life is
tested against a small in-process fake service built on the `websockets` library, which speaks
`registry.core.protocol` frames. Integration with the real service lives in other test files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry.core import protocol
from worker_agent import AgentGroup, Backoff, WorkerAgent, __version__, wire
from worker_agent.cli import main
from worker_agent.health import HealthServer
from worker_agent.service.public_ip import fetch_public_ip
from worker_agent.service.reconnect import Outcome, ReconnectPolicy

# No database: these run once, in the SQLite pass (see tools/run_tests.py).
pytestmark = pytest.mark.standalone

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE = "http://rendezvous.example"


# ---- wire --------------------------------------------------------------------------------------


def _members(enum: Any) -> dict[str, Any]:
    return {member.name: member.value for member in enum}


def test_wire_constants_match_the_server_protocol() -> None:
    assert _members(wire.CloseCode) == _members(protocol.CloseCode)
    assert _members(wire.ClientMessageType) == _members(protocol.ClientMessageType)
    assert _members(wire.ServerMessageType) == _members(protocol.ServerMessageType)
    assert _members(wire.ErrorCode) == _members(protocol.ErrorCode)
    # The codes the agent's reconnect rules name, pinned by value as well.
    assert wire.CloseCode.NORMAL == 1000
    assert wire.CloseCode.SUPERSEDED == 4000
    assert wire.CloseCode.DISCONNECTED_BY_OPERATOR == 4001
    assert wire.CloseCode.RATE_LIMITED == 4029
    assert wire.FINAL_CLOSE_CODES == protocol.FINAL_CLOSE_CODES
    assert _members(wire.ConnectFailure) == _members(protocol.ConnectFailure)
    assert _members(wire.NatMapping) == _members(protocol.NatMapping)
    assert _members(wire.PathKind) == _members(protocol.PathKind)
    assert _members(wire.PortMappingProtocol) == _members(protocol.PortMappingProtocol)
    assert _members(wire.IcePolicy) == _members(protocol.IcePolicy)
    assert _members(wire.PeerClosedCode) == _members(protocol.PeerClosedCode)
    assert wire.RESUMING_PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    for name in (
        "PROTOCOL_VERSION",
        "PEER_PROTOCOL_VERSION",
        "RELAY_DATA",
        "RELAY_HEADER_BYTES",
        "RELAY_LENGTH_BYTES",
        "RELAY_MAX_FRAME_BYTES",
        "MAX_DATAGRAM_BYTES",
        "WORKER_ID_PATTERN",
        "WORKER_ID_MAX_LENGTH",
        "DEFAULT_MAX_FRAME_BYTES",
        "AGENT_INFO_MAX_KEYS",
        "AGENT_INFO_MAX_KEY_LENGTH",
        "AGENT_INFO_MAX_VALUE_LENGTH",
    ):
        assert getattr(wire, name) == getattr(protocol, name), name


def test_the_server_parses_every_frame_the_agent_builds() -> None:
    info = {"hostname": "h", "pid": 7, "ok": True, "load": 0.5, "none": None}
    assert protocol.parse_client_message(wire.heartbeat()) == protocol.Heartbeat()
    assert protocol.parse_client_message(wire.register_public_ip(" 2001:DB8::1 ")) == (
        protocol.RegisterPublicIp(ip="2001:db8::1")
    )
    assert protocol.parse_client_message(wire.agent_info(info)) == protocol.AgentInfo(info=info)
    cone = protocol.NatMapping.ENDPOINT_INDEPENDENT
    endpoint = protocol.UdpEndpoint("198.51.100.7", 4000)
    intro = "ab" * 16
    frames = {
        wire.nat_report(cone, ("198.51.100.7", 4000)): protocol.NatReport(cone, endpoint),
        wire.nat_report(
            cone, None, {"protocol": "pcp", "external": ("198.51.100.1", 4001)}
        ): protocol.NatReport(
            cone,
            None,
            protocol.PortMapping(
                protocol.PortMappingProtocol.PCP, protocol.UdpEndpoint("198.51.100.1", 4001)
            ),
        ),
        wire.list_peers(request_id="r", tag="gpu"): protocol.ListPeers("gpu", "r"),
        wire.subscribe_peers(): protocol.SubscribePeers(None),
        wire.unsubscribe_peers(): protocol.UnsubscribePeers(),
        wire.connect_request(peer_id="b", request_id="r"): protocol.ConnectRequest("b", "r", 3),
        wire.connect_request(peer_id="b", request_id="r", resumes=intro): protocol.ConnectRequest(
            "b", "r", 3, resumes=intro
        ),
        wire.introduction_accept(introduction_id=intro): protocol.IntroductionAccept(intro, 3),
        wire.introduction_reject(introduction_id=intro, reason="no"): protocol.IntroductionReject(
            intro, "no"
        ),
        wire.ice_candidates(
            introduction_id=intro,
            attempt=3,
            policy="relay",
            ufrag="abcd",
            pwd="p" * 22,
            candidates=[CANDIDATE],
            done=True,
        ): protocol.IceCandidates(
            intro, 3, protocol.IcePolicy.RELAY, "abcd", "p" * 22, (CANDIDATE,), True
        ),
        wire.path_report(
            introduction_id=intro, kind="direct", remote=("198.51.100.7", 4000), setup_ms=12
        ): protocol.PathReport(intro, protocol.PathKind.DIRECT, "198.51.100.7:4000", 12),
        wire.peer_close(introduction_id=intro, reason="done"): protocol.PeerClose(intro, "done"),
    }
    for frame, expected in frames.items():
        assert protocol.parse_client_message(frame) == expected


def test_the_agent_parses_every_frame_the_server_builds() -> None:
    welcome = protocol.welcome(
        worker_id="w1",
        connection_id=12,
        instance_id="inst",
        observed_ip="198.51.100.7",
        observed_port=40312,
        heartbeat_interval=30.0,
        max_frame_bytes=4096,
    )
    assert wire.parse_server_message(welcome)["connection_id"] == 12
    closing = wire.parse_server_message(protocol.closing(protocol.CloseCode.SUPERSEDED))
    assert closing == {
        "type": "closing",
        "code": 4000,
        "reason": "New connection from same worker ID",
    }
    error = wire.parse_server_message(protocol.error(protocol.InvalidIp("bad")))
    assert (error["type"], error["code"]) == ("error", "INVALID_IP")
    assert wire.parse_server_message(protocol.heartbeat_ack(1.5))["type"] == "heartbeat_ack"


@pytest.mark.parametrize("frame", ["not json", "[1, 2]", '"text"', '{"no": "type"}', '{"type": 3}'])
def test_server_frames_that_are_not_typed_objects_are_refused(frame: str) -> None:
    with pytest.raises(wire.ServerFrameError):
        wire.parse_server_message(frame)


def test_binary_server_frames_are_refused() -> None:
    with pytest.raises(wire.ServerFrameError):
        wire.parse_server_message(b'{"type": "welcome"}')


CANDIDATE = "6815297761 1 udp 2130706431 192.0.2.2 37929 typ host"


def test_relay_frames_the_agent_builds_pass_the_services_check_and_unpack_again() -> None:
    intro = "cd" * 16
    datagrams = [b"", b"x", bytes(range(256)) * 4, b"y" * wire.MAX_DATAGRAM_BYTES]
    for batch in ([datagrams[0]], datagrams[:3], [datagrams[3]]):
        frame = wire.relay_frame(wire.relay_header(intro), batch)
        assert protocol.relay_frame_introduction(frame) == intro
        assert wire.parse_relay_frame(frame) == (intro, batch)
    assert len(wire.relay_frame(wire.relay_header(intro), [datagrams[3]])) == (
        wire.RELAY_MAX_FRAME_BYTES
    )


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01" + b"\x00" * 15,
        b"\x02" + b"\x00" * 16 + b"\x00\x00",
        b"\x01" + b"\x00" * 16 + b"\x00\x05ab",
    ],
    ids=["empty", "short header", "unknown kind", "length overruns"],
)
def test_the_agent_refuses_binary_frames_that_are_not_relay_frames(frame: bytes) -> None:
    with pytest.raises(wire.ServerFrameError):
        wire.parse_relay_frame(frame)


def test_agent_info_cuts_long_strings_and_refuses_nested_values() -> None:
    sent = json.loads(wire.agent_info({"platform": "x" * 1000}))
    assert sent["info"]["platform"] == "x" * protocol.AGENT_INFO_MAX_VALUE_LENGTH
    with pytest.raises(ValueError):
        wire.agent_info({"nested": {"a": 1}})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        wire.agent_info({f"k{n}": n for n in range(protocol.AGENT_INFO_MAX_KEYS + 1)})


def test_register_public_ip_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        wire.register_public_ip("example.com")
    with pytest.raises(ValueError):
        wire.register_public_ip("fe80::1%eth0")


# ---- URL and worker id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service_url", "expected"),
    [
        ("http://svc.example", "ws://svc.example/ws/register/w-1"),
        ("https://svc.example", "wss://svc.example/ws/register/w-1"),
        ("https://svc.example/", "wss://svc.example/ws/register/w-1"),
        ("http://127.0.0.1:8000//", "ws://127.0.0.1:8000/ws/register/w-1"),
        ("https://svc.example/prefix/", "wss://svc.example/prefix/ws/register/w-1"),
        ("ws://svc.example:9000", "ws://svc.example:9000/ws/register/w-1"),
        ("wss://svc.example", "wss://svc.example/ws/register/w-1"),
        ("HTTPS://svc.example", "wss://svc.example/ws/register/w-1"),
        ("  https://svc.example  ", "wss://svc.example/ws/register/w-1"),
        ("http://[::1]:8000", "ws://[::1]:8000/ws/register/w-1"),
    ],
)
def test_service_url_becomes_the_registration_websocket_url(
    service_url: str, expected: str
) -> None:
    assert WorkerAgent(service_url, "w-1").url == expected


@pytest.mark.parametrize(
    ("service_url", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("svc.example", "scheme"),
        ("ftp://svc.example", "scheme"),
        ("http://", "no host"),
        ("https:///path", "no host"),
        ("http://svc.example:99999", "port"),
    ],
)
def test_an_invalid_service_url_is_refused_in_the_constructor(
    service_url: str, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        WorkerAgent(service_url, "w-1")


@pytest.mark.parametrize(
    "worker_id", ["", "-leading-dash", ".dot", "has space", "a/b", "é", "x" * 129, "a\n"]
)
def test_a_worker_id_outside_the_server_rule_is_refused(worker_id: str) -> None:
    with pytest.raises(ValueError, match="worker id"):
        WorkerAgent(BASE, worker_id)


def test_the_longest_allowed_worker_id_is_accepted() -> None:
    assert WorkerAgent(BASE, "a" + "._-9" * 31 + "xyz").worker_id.startswith("a._-9")


def test_the_worker_id_defaults_to_a_fresh_uuid4() -> None:
    first, second = WorkerAgent(BASE), WorkerAgent(BASE)
    assert uuid.UUID(first.worker_id).version == 4
    assert first.worker_id != second.worker_id
    assert first.url.endswith(f"/ws/register/{first.worker_id}")


# ---- keep-alive settings -----------------------------------------------------------------------


def test_the_poc_ping_defaults_are_clamped_so_websocket_client_accepts_them() -> None:
    agent = WorkerAgent(BASE, "w", ping_interval=25, ping_timeout=25)
    assert (agent.ping_interval, agent.ping_timeout) == (25.0, 20.0)


def test_a_ping_timeout_longer_than_the_interval_is_clamped_too() -> None:
    assert WorkerAgent(BASE, "w", ping_interval=10, ping_timeout=30).ping_timeout == 8.0


def test_a_ping_timeout_below_the_interval_is_kept() -> None:
    agent = WorkerAgent(BASE, "w", ping_interval=20, ping_timeout=5)
    assert (agent.ping_interval, agent.ping_timeout) == (20.0, 5.0)


def test_a_zero_ping_interval_disables_pings_without_clamping() -> None:
    agent = WorkerAgent(BASE, "w", ping_interval=0, ping_timeout=25)
    assert (agent.ping_interval, agent.ping_timeout) == (0.0, 25.0)


def test_negative_keepalive_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        WorkerAgent(BASE, "w", ping_interval=-1)
    with pytest.raises(ValueError):
        WorkerAgent(BASE, "w", ping_timeout=-1)
    with pytest.raises(ValueError):
        WorkerAgent(BASE, "w", heartbeat_interval=0)


# ---- backoff -----------------------------------------------------------------------------------


def test_full_jitter_draws_between_zero_and_the_doubling_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return high

    backoff = Backoff(base=1, uniform=uniform)
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert all(low == 0 for low, _ in calls)


def test_full_jitter_delays_stay_within_bounds_with_a_real_random_source() -> None:
    backoff = Backoff(base=0.5, cap=10, uniform=random.Random(7).uniform)
    for attempt in range(50):
        ceiling = min(10.0, 0.5 * 2**attempt)
        assert 0 <= backoff.next_delay() <= ceiling


def test_the_cap_holds_after_very_many_attempts() -> None:
    backoff = Backoff(base=1, uniform=lambda low, high: high)
    backoff.attempt = 100_000
    assert backoff.next_delay() == 60.0


def test_a_connection_up_for_stable_after_resets_the_backoff() -> None:
    backoff = Backoff(base=1, stable_after=30, uniform=lambda low, high: high)
    for _ in range(5):
        backoff.next_delay()
    assert backoff.connection_lasted(29.9) is False
    assert backoff.next_delay() == 32
    assert backoff.connection_lasted(30.0) is True
    assert backoff.next_delay() == 1


def test_after_a_registered_connection_the_retries_stay_quick_for_a_while() -> None:
    """A service restart of a few seconds must cost its workers a few seconds: within
    `fast_for` of a registered connection's end every delay is at most `base`; a connection
    lost again meanwhile does not extend the window; then the exponent counts on."""
    now = [1000.0]
    backoff = Backoff(
        base=2, stable_after=30, fast_for=60, uniform=lambda low, high: high, clock=lambda: now[0]
    )
    assert [backoff.next_delay() for _ in range(3)] == [2, 4, 8]  # never registered: doubling
    backoff.connection_lasted(3600)
    backoff.registered_connection_ended()
    delays = []
    while now[0] < 1059.0:
        delays.append(backoff.next_delay())
        now[0] += delays[-1]
        if len(delays) == 10:
            backoff.registered_connection_ended()  # registered and lost again: no extension
    assert set(delays) == {2} and len(delays) == 30
    now[0] = 1060.0
    assert [backoff.next_delay() for _ in range(3)] == [2, 4, 8]


def test_the_policy_retries_quickly_after_a_registered_connection_only() -> None:
    now = [0.0]
    policy = ReconnectPolicy(Backoff(base=2, uniform=lambda low, high: high, clock=lambda: now[0]))
    assert [policy.after(Outcome()).delay for _ in range(3)] == [2, 4, 8]  # never registered
    lost = Outcome(opened=True, registered=True, uptime=5.0, close_code=None)
    assert [policy.after(lost).delay for _ in range(3)] == [2, 2, 2]
    flood = Outcome(opened=True, registered=True, uptime=5.0, close_code=4029)
    now[0] = 100.0
    assert policy.after(flood).delay == 16  # closed for flooding: the normal backoff


def test_backoff_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=10, cap=5)
    with pytest.raises(ValueError):
        Backoff(fast_for=-1)


# ---- reconnect policy --------------------------------------------------------------------------


def _policy(**kwargs: Any) -> ReconnectPolicy:
    return ReconnectPolicy(Backoff(base=1, uniform=lambda low, high: high), **kwargs)


SUPERSEDED = Outcome(opened=True, registered=True, uptime=5.0, close_code=4000)


def test_a_403_handshake_stops_for_good_as_refused() -> None:
    decision = _policy().after(Outcome(handshake_status=403))
    assert (decision.retry, decision.final_state) == (False, "refused")


def test_other_handshake_failures_are_retried_with_backoff() -> None:
    policy = _policy()
    delays = [policy.after(Outcome(handshake_status=503)).delay for _ in range(3)]
    assert delays == [1, 2, 4]


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1012, 4001, 4002, 4003, 4004, None])
def test_server_closes_and_lost_connections_reconnect_quickly_then_with_backoff(
    code: int | None,
) -> None:
    """The retries after a registered connection stay within the base delay for a while (a
    service restart); a policy that never saw one doubles them as before."""
    policy = _policy()
    decision = policy.after(Outcome(opened=True, registered=True, uptime=1.0, close_code=code))
    assert (decision.retry, decision.delay) == (True, 1)
    assert policy.after(Outcome(opened=True, uptime=1.0, close_code=code)).delay == 1
    fresh = _policy()
    assert [fresh.after(Outcome(opened=True, close_code=code)).delay for _ in range(2)] == [1, 2]


def test_a_stable_connection_resets_the_normal_backoff() -> None:
    policy = _policy()
    for _ in range(4):
        policy.after(Outcome())
    assert (
        policy.after(Outcome(opened=True, registered=True, uptime=31, close_code=1012)).delay == 1
    )


def test_rate_limited_connections_never_count_as_stable() -> None:
    policy = _policy()
    policy.after(Outcome())
    decision = policy.after(Outcome(opened=True, registered=True, uptime=300, close_code=4029))
    assert decision.delay == 2


def test_superseded_waits_the_long_jittered_delay() -> None:
    lows_highs: list[tuple[float, float]] = []
    policy = ReconnectPolicy(
        superseded_delay=60, uniform=lambda low, high: lows_highs.append((low, high)) or low
    )
    decision = policy.after(SUPERSEDED)
    assert decision.retry and decision.delay == 30
    assert lows_highs == [(30, 90)]


def test_three_supersedes_in_a_row_give_the_id_up() -> None:
    policy = _policy()
    assert policy.after(SUPERSEDED).retry
    assert policy.after(Outcome()).retry  # a failed attempt in between does not reset the count
    assert policy.after(SUPERSEDED).retry
    decision = policy.after(SUPERSEDED)
    assert (decision.retry, decision.final_state) == (False, "superseded")
    assert policy.superseded_count == 3


def test_a_session_ended_otherwise_forgets_earlier_supersedes() -> None:
    policy = _policy()
    policy.after(SUPERSEDED)
    policy.after(SUPERSEDED)
    policy.after(Outcome(opened=True, registered=True, uptime=2, close_code=4002))
    assert policy.superseded_count == 0
    assert policy.after(SUPERSEDED).retry


def test_a_supersede_after_a_long_hold_starts_counting_again() -> None:
    policy = _policy(superseded_reset_after=600)
    policy.after(SUPERSEDED)
    policy.after(SUPERSEDED)
    held_long = Outcome(opened=True, registered=True, uptime=601, close_code=4000)
    assert policy.after(held_long).retry
    assert policy.superseded_count == 1


def test_max_superseded_none_never_gives_up() -> None:
    policy = _policy(max_superseded=None)
    assert all(policy.after(SUPERSEDED).retry for _ in range(20))


# ---- public address ----------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2)
        status, body = {
            "/ipv4": (200, b"203.0.113.7\n"),
            "/ipv6": (200, b"2001:DB8:0:0::1"),
            "/garbage": (200, b"<html>not an address</html>"),
            "/long": (200, b"1" * 4096),
            "/error": (500, b"boom"),
            "/slow": (200, b"203.0.113.8"),
        }.get(self.path, (404, b"?"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_public_ip_returns_the_address_the_echo_service_answers(echo_url: str) -> None:
    assert fetch_public_ip(f"{echo_url}/ipv4", timeout=2) == "203.0.113.7"


def test_public_ip_returns_ipv6_in_canonical_form(echo_url: str) -> None:
    assert fetch_public_ip(f"{echo_url}/ipv6", timeout=2) == "2001:db8::1"


@pytest.mark.parametrize(
    ("path", "logged"),
    [("/garbage", "not an IP address"), ("/long", "too long"), ("/error", "HTTP 500")],
)
def test_public_ip_is_none_and_logged_when_the_answer_is_unusable(
    echo_url: str, path: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker_agent"):
        assert fetch_public_ip(f"{echo_url}{path}", timeout=2) is None
    assert logged in caplog.text


def test_public_ip_gives_up_after_its_timeout(
    echo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker_agent"):
        assert fetch_public_ip(f"{echo_url}/slow", timeout=0.3) is None
    assert time.monotonic() - started < 1.5
    assert "public ip" in caplog.text


def test_public_ip_is_none_when_nothing_listens() -> None:
    assert fetch_public_ip(f"http://127.0.0.1:{_closed_port()}/", timeout=2) is None


def test_public_ip_is_disabled_by_an_empty_url_and_refuses_other_schemes() -> None:
    assert fetch_public_ip("") is None
    assert fetch_public_ip(None) is None
    assert fetch_public_ip("file:///etc/hostname") is None


# ---- health server -----------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_health_answers_ok_to_any_get_and_the_status_as_json() -> None:
    snapshot = {"worker_id": "w1", "state": "registered", "connection_id": 3}
    with HealthServer("127.0.0.1", 0, status=lambda: snapshot) as health:
        assert health.port and health.port > 0
        for path in ("/", "/healthz", "/anything?x=1"):
            assert _get(f"{health.url}{path}") == (200, "text/plain; charset=utf-8", "OK")
        for path in ("/status", "/status.json", "/status?pretty=1"):
            status, content_type, body = _get(f"{health.url}{path}")
            assert (status, content_type, json.loads(body)) == (200, "application/json", snapshot)


def test_health_serves_an_agents_real_status_snapshot() -> None:
    agent = WorkerAgent(BASE, "w-status")
    with HealthServer("127.0.0.1", 0, status=agent.status) as health:
        body = json.loads(_get(f"{health.url}/status")[2])
    assert body["worker_id"] == "w-status"
    assert body["state"] == "idle"
    assert body["agent_version"] == __version__


def test_health_stop_releases_the_port() -> None:
    health = HealthServer("127.0.0.1", 0)
    port = health.start()
    health.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ---- command line ------------------------------------------------------------------------------


def test_main_without_a_service_url_exits_1_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([], environ={}) == 1
    assert "RENDEZVOUS_SERVICE_URL is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RENDEZVOUS_SERVICE_URL": "   "}, "RENDEZVOUS_SERVICE_URL is not set"),
        ({"RENDEZVOUS_SERVICE_URL": "ftp://svc.example"}, "scheme"),
        ({"RENDEZVOUS_SERVICE_URL": "http://svc.example", "WORKER_ID": "a b"}, "worker id"),
        ({"RENDEZVOUS_SERVICE_URL": "http://svc.example", "PING_INTERVAL_SEC": "x"}, "number"),
        ({"RENDEZVOUS_SERVICE_URL": "http://svc.example", "PORT": "http"}, "PORT"),
    ],
)
def test_main_with_bad_configuration_exits_1_with_a_message(
    environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([], environ=environ) == 1
    assert message in capsys.readouterr().err


def test_python_m_worker_agent_without_configuration_exits_1() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker_agent"],
        cwd=REPO_ROOT,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "RENDEZVOUS_SERVICE_URL is not set" in result.stderr


def test_main_runs_until_stopped_then_exits_0(fake_service: FakeService, tmp_path) -> None:
    stop = threading.Event()
    exit_codes: list[int] = []
    environ = {
        "RENDEZVOUS_SERVICE_URL": fake_service.url,
        "WORKER_ID": "cli-worker",
        "PORT": "0",
        "HEALTH_HOST": "127.0.0.1",
        "IP_ECHO_URL": "",
        "RENDEZVOUS_CONTROL_SOCKET": str(tmp_path / "agent.sock"),
    }
    websocket_level = logging.getLogger("websocket").level
    thread = threading.Thread(target=lambda: exit_codes.append(main([], environ, stop_event=stop)))
    thread.start()
    try:
        fake_service.wait_for(lambda: "cli-worker" in fake_service.current)
    finally:
        stop.set()
        thread.join(15)
        logging.getLogger("websocket").setLevel(websocket_level)
    assert exit_codes == [0]
    assert fake_service.wait_for(lambda: fake_service.close_codes.get("cli-worker") == [1000])


def test_sigterm_closes_with_1000_and_exits_0(fake_service: FakeService, tmp_path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RENDEZVOUS_SERVICE_URL": fake_service.url,
        "WORKER_ID": "sigterm-worker",
        "PORT": "0",
        "HEALTH_HOST": "127.0.0.1",
        "IP_ECHO_URL": "",
        "RENDEZVOUS_CONTROL_SOCKET": str(tmp_path / "agent.sock"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "worker_agent"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []])
    reader.start()
    try:
        assert fake_service.wait_for(lambda: "sigterm-worker" in fake_service.current)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
    output = "".join(lines.queue)
    assert fake_service.wait_for(lambda: fake_service.close_codes.get("sigterm-worker") == [1000])
    assert "worker=sigterm-worker conn=1 registered" in output
    assert "received SIGTERM, stopping" in output


# ---- connection life against a fake service ----------------------------------------------------


class FakeService:
    """Speaks `registry.core.protocol` frames: welcome, acks, supersede, refusal by worker id."""

    def __init__(self, heartbeat_interval: float = 30.0) -> None:
        from websockets.sync.server import serve

        self.heartbeat_interval = heartbeat_interval
        self.refused: set[str] = set()
        self.unavailable_once: set[str] = set()  # first public-ip report fails
        self.received: list[tuple[str, int, Any]] = []
        self.current: dict[str, Any] = {}
        self.close_codes: dict[str, list[int | None]] = {}
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._server = serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._check_request,
            ping_interval=None,
            close_timeout=2,
        )
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _check_request(self, connection: Any, request: Any) -> Any:
        worker_id = request.path.rsplit("/", 1)[-1]
        with self._lock:
            self.attempts[worker_id] = self.attempts.get(worker_id, 0) + 1
        if worker_id in self.refused:
            return connection.respond(HTTPStatus.FORBIDDEN, "refused\n")
        return None

    def _handle(self, ws: Any) -> None:
        worker_id = ws.request.path.rsplit("/", 1)[-1]
        with self._lock:
            self._next_id += 1
            connection_id = self._next_id
            previous = self.current.get(worker_id)
            self.current[worker_id] = ws
        if previous is not None:
            threading.Thread(
                target=self.close, args=(previous, protocol.CloseCode.SUPERSEDED), daemon=True
            ).start()
        ws.send(
            protocol.welcome(
                worker_id=worker_id,
                connection_id=connection_id,
                instance_id="fake-instance",
                observed_ip="127.0.0.1",
                observed_port=ws.remote_address[1],
                heartbeat_interval=self.heartbeat_interval,
                max_frame_bytes=protocol.DEFAULT_MAX_FRAME_BYTES,
            )
        )
        with contextlib.suppress(Exception):
            for text in ws:
                message = protocol.parse_client_message(text)
                with self._lock:
                    self.received.append((worker_id, connection_id, message))
                if isinstance(message, protocol.Heartbeat):
                    ws.send(protocol.heartbeat_ack(time.time()))
                elif isinstance(message, protocol.RegisterPublicIp):
                    if worker_id in self.unavailable_once:
                        self.unavailable_once.discard(worker_id)
                        ws.send(protocol.error(protocol.Unavailable("database away")))
                    else:
                        ws.send(protocol.public_ip_registered(message.ip))
                elif isinstance(message, protocol.AgentInfo):
                    ws.send(protocol.agent_info_recorded())
        with self._lock:
            self.close_codes.setdefault(worker_id, []).append(ws.close_code)
            if self.current.get(worker_id) is ws:
                del self.current[worker_id]

    def close(self, ws: Any, code: protocol.CloseCode) -> None:
        """As the service does: a `closing` frame, then a close frame without a reason."""
        with contextlib.suppress(Exception):
            ws.send(protocol.closing(code))
            ws.close(int(code), "")

    def close_worker(self, worker_id: str, code: protocol.CloseCode) -> None:
        with self._lock:
            ws = self.current[worker_id]
        self.close(ws, code)

    def messages(self, worker_id: str) -> list[tuple[int, Any]]:
        with self._lock:
            return [(c, m) for w, c, m in self.received if w == worker_id]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    def shutdown(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


@pytest.fixture
def fake_service() -> Iterator[FakeService]:
    pytest.importorskip("websockets.sync.server")
    service = FakeService()
    yield service
    service.shutdown()


@pytest.fixture
def agents() -> Iterator[list[WorkerAgent]]:
    started: list[WorkerAgent] = []
    yield started
    for agent in started:
        agent.stop(timeout=5)


def _agent(agents: list[WorkerAgent], url: str, worker_id: str, **kwargs: Any) -> WorkerAgent:
    kwargs.setdefault("public_ip_fetcher", lambda: None)
    kwargs.setdefault("ip_echo_url", "")
    kwargs.setdefault("backoff", Backoff(base=0.05, cap=0.2))
    agent = WorkerAgent(url, worker_id, **kwargs)
    agents.append(agent)
    return agent


def test_agent_registers_then_sends_agent_info_public_ip_and_heartbeats(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    registered: list[dict[str, Any]] = []
    agent = _agent(
        agents,
        fake_service.url,
        "w-life",
        public_ip_fetcher=lambda: "203.0.113.9",
        heartbeat_interval=0.1,
        agent_info={"role": "test"},
        on_registered=lambda _agent, welcome: registered.append(welcome),
    )
    agent.start()
    assert agent.wait_registered(5)
    assert fake_service.wait_for(
        lambda: (
            len([m for _, m in fake_service.messages("w-life") if m == protocol.Heartbeat()]) >= 2
        )
    )
    kinds = [type(m).__name__ for _, m in fake_service.messages("w-life")]
    assert kinds[:3] == ["AgentInfo", "RegisterPublicIp", "Heartbeat"]
    info = fake_service.messages("w-life")[0][1].info
    assert info["role"] == "test"
    assert info["agent_version"] == __version__
    assert {"hostname", "pid", "python_version", "platform"} <= info.keys()
    assert registered and registered[0]["connection_id"] == 1
    assert fake_service.wait_for(lambda: agent.status()["public_ip_registered"] == "203.0.113.9")
    status = agent.status()
    assert status["state"] == "registered"
    assert (status["connection_id"], status["instance_id"]) == (1, "fake-instance")
    assert status["observed_ip"] == "127.0.0.1"
    assert status["public_ip"] == "203.0.113.9"
    assert status["connects"] == 1


def test_the_public_ip_comes_from_the_echo_url_after_welcome(
    fake_service: FakeService, agents: list[WorkerAgent], echo_url: str
) -> None:
    agent = _agent(
        agents, fake_service.url, "w-echo", public_ip_fetcher=None, ip_echo_url=f"{echo_url}/ipv6"
    )
    agent.start()
    assert fake_service.wait_for(lambda: agent.status()["public_ip_registered"] == "2001:db8::1")
    assert protocol.RegisterPublicIp(ip="2001:db8::1") in [
        m for _, m in fake_service.messages("w-echo")
    ]


def test_a_public_ip_report_the_server_could_not_record_is_sent_again(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    fake_service.unavailable_once.add("w-retry")
    agent = _agent(
        agents,
        fake_service.url,
        "w-retry",
        public_ip_fetcher=lambda: "203.0.113.7",
        heartbeat_interval=0.05,
    )
    agent.start()
    assert fake_service.wait_for(lambda: agent.status()["public_ip_registered"] == "203.0.113.7")
    reports = [
        m for _, m in fake_service.messages("w-retry") if isinstance(m, protocol.RegisterPublicIp)
    ]
    assert len(reports) >= 2
    assert agent.status()["last_server_error"]["code"] == "UNAVAILABLE"


def test_a_failing_public_ip_source_does_not_stop_the_heartbeats(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    def broken() -> str | None:
        raise RuntimeError("no network")

    agent = _agent(
        agents, fake_service.url, "w-no-ip", public_ip_fetcher=broken, heartbeat_interval=0.05
    )
    agent.start()
    assert fake_service.wait_for(
        lambda: (
            [type(m).__name__ for _, m in fake_service.messages("w-no-ip")][:3]
            == ["AgentInfo", "Heartbeat", "Heartbeat"]
        )
    )
    assert agent.status()["public_ip"] is None


def test_heartbeats_follow_the_interval_the_welcome_gives(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    fake_service.heartbeat_interval = 0.1
    agent = _agent(agents, fake_service.url, "w-beat")
    agent.start()
    assert fake_service.wait_for(
        lambda: (
            len(fake_service.messages("w-beat")) >= 4 and agent.status()["last_heartbeat_ack_at"]
        )
    )
    assert agent.status()["heartbeat_interval"] == 0.1


def test_stop_closes_with_code_1000_promptly(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    states: list[tuple[str, str]] = []
    agent = _agent(
        agents,
        fake_service.url,
        "w-stop",
        on_state_change=lambda _a, old, new: states.append((old, new)),
    )
    agent.start()
    assert agent.wait_registered(5)
    started = time.monotonic()
    assert agent.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert agent.state == "stopped"
    assert fake_service.wait_for(lambda: fake_service.close_codes.get("w-stop") == [1000])
    assert [new for _, new in states] == [
        "connecting",
        "connected",
        "registered",
        "stopping",
        "stopped",
    ]


def test_a_server_close_is_followed_by_a_reconnect_and_the_closing_frame_is_recorded(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    agent = _agent(agents, fake_service.url, "w-restart")
    agent.start()
    assert agent.wait_registered(5)
    fake_service.close_worker("w-restart", protocol.CloseCode.INSTANCE_RESET)
    assert fake_service.wait_for(lambda: agent.status()["connection_id"] == 2)
    status = agent.status()
    assert status["state"] == "registered"
    assert status["last_close_code"] == 4003
    assert status["last_close_reason"] == protocol.CLOSE_REASONS[protocol.CloseCode.INSTANCE_RESET]
    assert status["connects"] == 2


def test_an_operator_disconnect_reconnects(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    agent = _agent(agents, fake_service.url, "w-operator")
    agent.start()
    assert agent.wait_registered(5)
    fake_service.close_worker("w-operator", protocol.CloseCode.DISCONNECTED_BY_OPERATOR)
    assert fake_service.wait_for(lambda: agent.status()["connects"] == 2 and agent.registered)
    assert agent.status()["last_close_code"] == 4001


def test_two_agents_with_one_id_settle_and_the_newer_keeps_it(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    first = _agent(agents, fake_service.url, "w-shared", superseded_delay=0.2)
    second = _agent(agents, fake_service.url, "w-shared", superseded_delay=0.2)
    first.start()
    assert first.wait_registered(5)
    second.start()
    assert first.wait_finished(15)
    assert first.state == "superseded"
    assert first.status()["superseded_count"] == 3
    assert "giving it up" in first.status()["final_reason"]
    assert second.wait_registered(5)
    attempts = fake_service.attempts["w-shared"]
    time.sleep(0.8)  # longer than any superseded delay: nobody comes back
    assert second.state == "registered"
    assert fake_service.attempts["w-shared"] == attempts


def test_a_403_at_the_handshake_stops_the_agent_without_retrying(
    fake_service: FakeService, agents: list[WorkerAgent]
) -> None:
    fake_service.refused.add("w-refused")
    agent = _agent(agents, fake_service.url, "w-refused")
    agent.start()
    assert agent.wait_finished(5)
    assert agent.state == "refused"
    assert not agent.wait_registered(0.1)
    assert "HTTP 403" in agent.status()["last_error"]
    time.sleep(0.5)
    assert fake_service.attempts["w-refused"] == 1


def test_an_unreachable_service_is_retried_and_reported(agents: list[WorkerAgent]) -> None:
    agent = _agent(agents, f"http://127.0.0.1:{_closed_port()}", "w-away")
    agent.start()
    assert not agent.wait_registered(0.6)
    status = agent.status()
    assert status["attempts"] >= 2
    assert status["state"] in {"connecting", "backoff"}
    assert "ConnectionRefusedError" in status["last_error"]
    assert agent.stop(timeout=5)


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts TCP connections and never answers the WebSocket handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for sock in accepted:
        sock.close()


def test_a_handshake_that_never_completes_is_cut_and_retried(
    silent_server: tuple[str, list[socket.socket]], agents: list[WorkerAgent]
) -> None:
    url, accepted = silent_server
    agent = _agent(agents, url, "w-silent", connect_timeout=0.2)
    agent.start()
    assert _wait(lambda: agent.status()["attempts"] >= 3, timeout=5)
    assert len(accepted) >= 2
    assert agent.status()["connects"] == 0


def test_stop_during_a_stuck_handshake_returns_after_the_close_timeout(
    silent_server: tuple[str, list[socket.socket]], agents: list[WorkerAgent]
) -> None:
    url, accepted = silent_server
    agent = _agent(agents, url, "w-stuck", close_timeout=0.3)
    agent.start()
    assert _wait(lambda: len(accepted) == 1)
    started = time.monotonic()
    assert agent.stop(timeout=5)
    assert 0.2 < time.monotonic() - started < 2
    assert agent.state == "stopped"


def test_exceptions_in_user_callbacks_are_logged_not_fatal(
    fake_service: FakeService, agents: list[WorkerAgent], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*_args: Any) -> None:
        raise RuntimeError("callback bug")

    agent = _agent(
        agents,
        fake_service.url,
        "w-callbacks",
        heartbeat_interval=0.1,
        on_message=explode,
        on_registered=explode,
        on_state_change=explode,
    )
    with caplog.at_level(logging.ERROR, logger="worker_agent"):
        agent.start()
        assert agent.wait_registered(5)
        assert fake_service.wait_for(lambda: len(fake_service.messages("w-callbacks")) >= 3)
    assert "callback bug" in caplog.text
    assert agent.state == "registered"


def test_a_group_runs_several_agents_and_reports_them_on_one_health_server(
    fake_service: FakeService,
) -> None:
    group = AgentGroup(
        fake_service.url,
        3,
        health_host="127.0.0.1",
        health_port=0,
        public_ip_fetcher=lambda: None,
    )
    with group:
        assert all(agent.wait_registered(5) for agent in group.agents)
        assert group.health is not None
        body = json.loads(_get(f"{group.health.url}/status")[2])
    assert (body["count"], body["registered"]) == (3, 3)
    assert len({s["worker_id"] for s in body["agents"]}) == 3
    assert all(agent.state == "stopped" for agent in group.agents)


def test_a_group_refuses_duplicate_worker_ids() -> None:
    with pytest.raises(ValueError, match="distinct"):
        AgentGroup(BASE, worker_ids=["a", "a"])


# ---- helpers -----------------------------------------------------------------------------------


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_importing_every_agent_module_loads_neither_django_nor_the_service() -> None:
    modules = ["worker_agent", *(f"worker_agent.{p.stem}" for p in AGENT_MODULES)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'registry'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


AGENT_MODULES = sorted(
    p for p in (REPO_ROOT / "worker_agent").glob("*.py") if p.stem not in ("__init__", "__main__")
)


# ---- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [4010, 4011])
def test_an_authentication_refusal_ends_the_agent_with_the_servers_reason(code: int) -> None:
    decision = ReconnectPolicy().after(
        Outcome(opened=True, close_code=code, close_reason="enrolment key expired")
    )
    assert not decision.retry and decision.final_state == "refused"
    assert "enrolment key expired" in decision.reason


def test_a_credential_file_round_trips_with_mode_0600(tmp_path) -> None:
    from worker_agent.service import credentials

    path = tmp_path / "sub" / "id.json"
    assert credentials.load(path) is None
    credentials.save(path, credentials.Identity("w-1", "rvc_secret", "http://svc"))
    assert credentials.load(path) == credentials.Identity("w-1", "rvc_secret", "http://svc")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["id.json"]  # no temporary left behind


@pytest.mark.parametrize("content", ["not json", "{}", '{"worker_id": "w", "credential": "rvk_x"}'])
def test_a_damaged_credential_file_is_an_error_not_a_fresh_start(tmp_path, content: str) -> None:
    from worker_agent.service import credentials

    path = tmp_path / "id.json"
    path.write_text(content)
    with pytest.raises(credentials.CredentialFileError):
        credentials.load(path)
    with pytest.raises(ValueError):
        WorkerAgent("http://127.0.0.1:9", credential_file=path)


def test_a_credential_file_decides_the_worker_id_and_refuses_another(tmp_path) -> None:
    from worker_agent.service import credentials

    path = tmp_path / "id.json"
    credentials.save(path, credentials.Identity("w-7", "rvc_secret"))
    agent = WorkerAgent("http://127.0.0.1:9", credential_file=path, enrolment_key="rvk_k")
    assert agent.worker_id == "w-7" and agent.credential == "rvc_secret"
    headers = agent.enrolment.headers({})
    assert headers["Authorization"] == "Bearer rvc_secret"  # the credential wins
    with pytest.raises(ValueError, match="belongs to worker 'w-7'"):
        WorkerAgent("http://127.0.0.1:9", "w-8", credential_file=path)


def test_an_agent_without_secrets_sends_no_authorization_header() -> None:
    assert "Authorization" not in WorkerAgent("http://127.0.0.1:9", "w").enrolment.headers({})
    keyed = WorkerAgent("http://127.0.0.1:9", "w", enrolment_key="rvk_k")
    assert keyed.enrolment.headers({})["Authorization"] == "Bearer rvk_k"


def test_a_flood_of_one_server_error_is_one_warning_and_the_status_stays_current(caplog) -> None:
    """Issue 19: every error frame was a WARNING (9,117 in one run of a relay flood). One line
    per code every few seconds, the repeats counted in the next; the status keeps the last."""
    from worker_agent.service.attempt import Attempt
    from worker_agent.service.session import SERVER_ERROR_QUIET

    agent = WorkerAgent("http://127.0.0.1:9", "w-flooded", ip_echo_url="")
    now = [100.0]
    agent.session._error_lines.clock = lambda: now[0]

    def error(code: str, n: int) -> str:
        return json.dumps({"type": "error", "code": code, "message": f"refused #{n}"})

    with caplog.at_level(logging.WARNING, logger="worker_agent"):
        for n in range(500):
            now[0] += 0.001
            agent.session._handle_message(Attempt(1), error("RELAY_RATE_LIMITED", n))
        assert agent.status()["last_server_error"]["message"] == "refused #499"
        agent.session._handle_message(Attempt(1), error("INVALID_FIELD", 0))  # another code
        now[0] += SERVER_ERROR_QUIET
        agent.session._handle_message(Attempt(1), error("RELAY_RATE_LIMITED", 500))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "RELAY_RATE_LIMITED: refused #0" in warnings[0]
    assert "INVALID_FIELD: refused #0" in warnings[1]
    assert warnings[2].endswith("refused #500 (499 more of RELAY_RATE_LIMITED since its last line)")
    assert agent.status()["last_server_error"]["message"] == "refused #500"


def test_a_relay_error_for_an_introduction_this_agent_ended_is_no_warning(caplog) -> None:
    """Closing a connection tells the service at once; packets the peer or this agent still had
    on their way then meet RELAY_NOT_INTRODUCED. That is no news: logged at DEBUG, not kept as
    the last server error. The same error for a live or unknown introduction is a warning."""
    from worker_agent.service.attempt import Attempt

    agent = WorkerAgent("http://127.0.0.1:9", "w-late", ip_echo_url="")
    ended, unknown = "ab" * 16, "cd" * 16
    agent.peers.signalling._ended[ended] = None  # type: ignore[assignment]  # as ended() keeps it

    def error(introduction_id: str) -> str:
        return json.dumps(
            {"type": "error", "code": "RELAY_NOT_INTRODUCED", "message": "no introduction",
             "introduction_id": introduction_id}
        )  # fmt: skip

    with caplog.at_level(logging.DEBUG, logger="worker_agent"):
        agent.session._handle_message(Attempt(1), error(ended))
        assert agent.status()["last_server_error"] is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        agent.session._handle_message(Attempt(1), error(unknown))
    assert agent.status()["last_server_error"]["code"] == "RELAY_NOT_INTRODUCED"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RELAY_NOT_INTRODUCED" in warnings[0]
