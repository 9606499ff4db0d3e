"""Introduction requests waiting for the target's answer, kept by the target's consumer: each is
removed by the answer or by its expiry, after which the requester hears that the target did not
answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from registry.core import protocol

# B's agent answers an introduction request at once (accepting needs no network work); one that
# has not answered by then is taken as unresponsive, so A hears within 2 s either way.
ANSWER_TIMEOUT = 1.5
MAX_PENDING = 32  # per connection: a worker cannot be made to hold unbounded state


@dataclass(frozen=True, slots=True)
class Pending:
    """An introduction request waiting for the target's answer, kept by the target's consumer."""

    introduction_id: str
    requester_id: str
    requester_channel: str
    requester_connection_id: int
    request_id: str
    transport: protocol.Transport = protocol.Transport.QUIC
    requester_certificate: str | None = None  # base64 DER, as the requester presented it
    requester_tags: tuple[str, ...] = ()
    decided_by: str = ""  # what the requester's instance found the peer policy to say
    resumes: str | None = None  # the introduction with the requester this one replaces
    expires_at: float = field(default_factory=lambda: time.monotonic() + ANSWER_TIMEOUT)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Pending:
        return cls(
            introduction_id=message["introduction_id"],
            requester_id=message["requester_id"],
            requester_channel=message["requester_channel"],
            requester_connection_id=message["requester_connection_id"],
            request_id=message["request_id"],
            transport=protocol.Transport(message["transport"]),
            requester_certificate=message["requester_certificate"],
            requester_tags=tuple(message.get("requester_tags") or ()),
            decided_by=message.get("decided_by") or "",
            resumes=message.get("resumes") or None,
        )

    def as_message(self) -> dict[str, Any]:
        return {
            "introduction_id": self.introduction_id,
            "requester_id": self.requester_id,
            "requester_channel": self.requester_channel,
            "requester_connection_id": self.requester_connection_id,
            "request_id": self.request_id,
            "transport": str(self.transport),
            "requester_certificate": self.requester_certificate,
            "requester_tags": list(self.requester_tags),
            "decided_by": self.decided_by,
            "resumes": self.resumes,
        }


class PendingIntroductions:
    """Requests waiting for this connection's answer. Each is removed by its answer or by its
    expiry timer (`Target._expire`), which tells the requester."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def add(self, pending: Pending) -> bool:
        if len(self._pending) >= MAX_PENDING:
            return False
        self._pending[pending.introduction_id] = pending
        return True

    def holds(self, introduction_id: str) -> bool:
        """Whether the request is here and may still be answered."""
        pending = self._pending.get(introduction_id)
        return pending is not None and pending.expires_at > time.monotonic()

    def take(self, introduction_id: str) -> Pending | None:
        """The request, to answer it; None if unknown, answered or expired (an expired one is
        left for its timer)."""
        pending = self._pending.get(introduction_id)
        if pending is None or pending.expires_at <= time.monotonic():
            return None
        return self._pending.pop(introduction_id)

    def expire(self, introduction_id: str) -> Pending | None:
        """The request, if it is still unanswered at its expiry (the answer timer's call)."""
        return self._pending.pop(introduction_id, None)

    def drain(self) -> list[Pending]:
        pending, self._pending = list(self._pending.values()), {}
        return pending
