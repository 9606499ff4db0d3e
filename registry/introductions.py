"""Introductions: how two workers are told about each other so they can punch a UDP path.

A asks to reach B (`connect_request`, with A's candidate endpoints); the service asks B
(`introduction_request`); B answers with its own endpoints (`introduction_accept`); the service
sends both an `introduction` with the other's endpoints, a fresh key for authenticating the
probes, and a common start time. Between B's instance receiving the request and B's answer, the
request waits in B's consumer (`Pending`), so no state is shared between instances.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from registry import protocol

# How long B has to answer an introduction request.
PENDING_TTL = 30.0
# Both sides start probing this long after the service sends the introductions: enough for the
# frames to reach two instances and two agents.
START_LEAD = 0.5
MAX_PENDING = 32  # per connection: a worker cannot be made to hold unbounded state
# Connect requests per connection: a burst, then one a second. Each makes the peer's agent open
# a socket and probe, so a worker must not be able to set many peers probing at once.
REQUEST_RATE = 1.0
REQUEST_BURST = 5
KEY_BYTES = 32

ROLE_INITIATOR = "initiator"
ROLE_RESPONDER = "responder"


def new_introduction_id() -> str:
    return uuid.uuid4().hex


def new_key() -> str:
    """The probes' HMAC key, as hex: from the service, so a stranger cannot forge a probe."""
    return secrets.token_hex(KEY_BYTES)


def punch_impossible(mine: str | None, theirs: str | None) -> str | None:
    """Why no direct path can be punched between NATs with these mappings, or None to try.

    Two endpoint-dependent ("symmetric") NATs each give the peer a port it cannot predict, so
    neither side's probes can ever land. One endpoint-dependent NAT may still work when the
    other side is a full cone (it answers wherever a probe came from), so that is tried.
    """
    dependent = protocol.NatMapping.ENDPOINT_DEPENDENT
    if mine == dependent and theirs == dependent:
        return (
            "both NATs map endpoint-dependently (symmetric NAT): no direct UDP path can be "
            "punched between them; a relay would be needed, and Rendezvous has none yet"
        )
    return None


@dataclass(frozen=True, slots=True)
class Pending:
    """An introduction request waiting for the target's answer, kept by the target's consumer."""

    introduction_id: str
    requester_id: str
    requester_channel: str
    requester_connection_id: int
    request_id: str
    endpoints: list[dict[str, Any]]
    nat_mapping: str
    key: str
    expires_at: float = field(default_factory=lambda: time.monotonic() + PENDING_TTL)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Pending:
        return cls(
            introduction_id=message["introduction_id"],
            requester_id=message["requester_id"],
            requester_channel=message["requester_channel"],
            requester_connection_id=message["requester_connection_id"],
            request_id=message["request_id"],
            endpoints=message["endpoints"],
            nat_mapping=message["nat_mapping"],
            key=message["key"],
        )


class PendingIntroductions:
    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def add(self, pending: Pending) -> bool:
        self._prune()
        if len(self._pending) >= MAX_PENDING:
            return False
        self._pending[pending.introduction_id] = pending
        return True

    def take(self, introduction_id: str) -> Pending | None:
        self._prune()
        return self._pending.pop(introduction_id, None)

    def _prune(self) -> None:
        now = time.monotonic()
        self._pending = {k: p for k, p in self._pending.items() if p.expires_at > now}


def request_message(
    *,
    introduction_id: str,
    requester_id: str,
    requester_channel: str,
    requester_connection_id: int,
    request: protocol.ConnectRequest,
    key: str,
) -> dict[str, Any]:
    """What the requester's instance sends the target's consumer (plain JSON-able values)."""
    return {
        "introduction_id": introduction_id,
        "requester_id": requester_id,
        "requester_channel": requester_channel,
        "requester_connection_id": requester_connection_id,
        "request_id": request.request_id,
        "endpoints": [e.as_dict() for e in request.endpoints],
        "nat_mapping": str(request.nat_mapping),
        "key": key,
    }


def introductions(
    pending: Pending, accept: protocol.IntroductionAccept, *, target_id: str, now: float
) -> tuple[str, str]:
    """The two `introduction` frames: (for the requester, for the target)."""
    start_at = now + START_LEAD
    for_requester = protocol.introduction(
        introduction_id=pending.introduction_id,
        request_id=pending.request_id,
        peer_id=target_id,
        peer_endpoints=[e.as_dict() for e in accept.endpoints],
        peer_nat_mapping=str(accept.nat_mapping),
        key=pending.key,
        start_at=start_at,
        role=ROLE_INITIATOR,
    )
    for_target = protocol.introduction(
        introduction_id=pending.introduction_id,
        request_id=None,
        peer_id=pending.requester_id,
        peer_endpoints=pending.endpoints,
        peer_nat_mapping=pending.nat_mapping,
        key=pending.key,
        start_at=start_at,
        role=ROLE_RESPONDER,
    )
    return for_requester, for_target
