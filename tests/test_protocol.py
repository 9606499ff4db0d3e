"""The protocol module alone: every rule, without a socket or a database."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.core import protocol
from registry.core.protocol import ErrorCode

pytestmark = pytest.mark.standalone


def error_code(text: str, **kwargs: int) -> ErrorCode:
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse_client_message(text, **kwargs)
    return caught.value.code


def test_register_public_ip_as_the_proof_of_concept_sends_it() -> None:
    message = protocol.parse_client_message('{"type": "register_public_ip", "ip": "198.51.100.7"}')
    assert message == protocol.RegisterPublicIp(ip="198.51.100.7")


def test_ipv6_addresses_are_stored_in_canonical_form() -> None:
    message = protocol.parse_client_message(
        '{"type": "register_public_ip", "ip": "2001:DB8:0:0:0:0:0:1"}'
    )
    assert message == protocol.RegisterPublicIp(ip="2001:db8::1")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.NOT_AN_OBJECT),
        ('"register_public_ip"', ErrorCode.NOT_AN_OBJECT),
        ("{}", ErrorCode.MISSING_TYPE),
        ('{"type": 5}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "teleport"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "register_public_ip"}', ErrorCode.MISSING_FIELD),
        ('{"type": "register_public_ip", "ip": "not-an-ip"}', ErrorCode.INVALID_IP),
        ('{"type": "register_public_ip", "ip": "1.2.3.4; DROP TABLE"}', ErrorCode.INVALID_IP),
        ('{"type": "register_public_ip", "ip": "256.1.1.1"}', ErrorCode.INVALID_IP),
        ('{"type": "register_public_ip", "ip": 16909060}', ErrorCode.INVALID_IP),
        ('{"type": "register_public_ip", "ip": null}', ErrorCode.INVALID_IP),
        ('{"type": "register_public_ip", "ip": "fe80::1%eth0"}', ErrorCode.INVALID_IP),
        ('{"type": "agent_info"}', ErrorCode.MISSING_FIELD),
        ('{"type": "agent_info", "info": {"load": NaN}}', ErrorCode.INVALID_JSON),
        ('{"type": "agent_info", "info": {"load": Infinity}}', ErrorCode.INVALID_JSON),
        ('{"type": "agent_info", "info": {"a": {"nested": 1}}}', ErrorCode.INVALID_FIELD),
        ('{"type": "agent_info", "info": {"a": "' + "x" * 300 + '"}}', ErrorCode.INVALID_FIELD),
    ],
)
def test_bad_frames_get_a_coded_error(text: str, code: ErrorCode) -> None:
    assert error_code(text) == code


def test_frames_over_the_size_limit_are_refused_before_parsing() -> None:
    frame = json.dumps({"type": "heartbeat", "pad": "x" * 5000})
    assert error_code(frame, max_bytes=4096) == ErrorCode.FRAME_TOO_LARGE


def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    frame = json.dumps({"type": "heartbeat", "pad": "é" * 2500}, ensure_ascii=False)
    assert len(frame) < 4096 < len(frame.encode())
    assert error_code(frame, max_bytes=4096) == ErrorCode.FRAME_TOO_LARGE


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    assert error_code("[" * 100_000 + "]" * 100_000, max_bytes=1_000_000) in {
        ErrorCode.INVALID_JSON,
        ErrorCode.NOT_AN_OBJECT,
    }


@pytest.mark.parametrize(
    "worker_id", ["a", "worker-1", "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc", "pod.ns_1", "x" * 128]
)
def test_worker_ids_inside_the_rule(worker_id: str) -> None:
    assert protocol.is_valid_worker_id(worker_id)


@pytest.mark.parametrize(
    "worker_id", ["", "-lead", ".hidden", "x" * 129, "a b", "a/b", "ü", "a\nb", "a\x00", "a;b"]
)
def test_worker_ids_outside_the_rule(worker_id: str) -> None:
    assert not protocol.is_valid_worker_id(worker_id)


def test_closing_frame_carries_the_proof_of_concepts_reason() -> None:
    frame = json.loads(protocol.closing(protocol.CloseCode.SUPERSEDED))
    assert frame == {
        "type": "closing",
        "code": 4000,
        "reason": "New connection from same worker ID",
    }


def test_every_close_code_has_a_reason() -> None:
    assert set(protocol.CLOSE_REASONS) == set(protocol.CloseCode)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.text(max_size=5000))
def test_arbitrary_text_never_raises_anything_but_protocol_errors(text: str) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.parse_client_message(text)


@given(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from([t.value for t in protocol.ClientMessageType])
            | st.text(max_size=20)
        },
        optional={"ip": json_values | st.ip_addresses().map(str), "info": json_values},
    )
)
def test_only_valid_addresses_ever_come_out_of_the_parser(frame: dict[str, object]) -> None:
    try:
        message = protocol.parse_client_message(json.dumps(frame))
    except protocol.ProtocolError:
        return
    if isinstance(message, protocol.RegisterPublicIp):
        import ipaddress

        assert str(ipaddress.ip_address(message.ip)) == message.ip


def test_the_candidate_rule_keeps_what_ice_needs_and_drops_the_rest() -> None:
    srflx = (
        "candidate:842163049 1 UDP 1677729535 198.51.100.7 40312 typ srflx raddr 10.0.1.2 "
        "rport 5000 generation 0"
    )
    assert protocol.parse_candidate(srflx) == (
        "842163049 1 udp 1677729535 198.51.100.7 40312 typ srflx raddr 10.0.1.2 rport 5000"
    )
    relayed = "1 1 udp 16777215 203.0.113.10 50000 typ relay raddr 0.0.0.0 rport 9"
    assert protocol.parse_candidate(relayed) == relayed
    v6 = "2 1 udp 2130706431 2001:DB8::1 4000 typ host"
    assert protocol.parse_candidate(v6) == "2 1 udp 2130706431 2001:db8::1 4000 typ host"
