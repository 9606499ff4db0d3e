"""A connection's introduced peers: one `PeerLink` per accepted introduction, on each side, saying
where the peer's consumer is and how much has been relayed to it. Consumers on different
instances exchange links through the channel layer, as plain values.

A connection's links are limited per kind: those it asked for, in use or not, and those others
asked for once in use (either side sent something on them). Others' requests that go unused
count against their requesters only, and end after a few seconds (target.py), so that workers
asking for a connection they never use cannot lock the target out of its own or anyone else's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from registry.ops import metrics


@dataclass(slots=True)
class PeerLink:
    """One side of an accepted introduction: where the peer's consumer is."""

    introduction_id: str
    peer_id: str
    peer_channel: str
    peer_connection_id: int
    initiator: bool  # this side asked for the introduction
    relay: bool = True  # the service relays this pair's frames
    peer_tags: tuple[str, ...] = ()  # for the peer policy, when its rules change
    opened_at: float = field(default_factory=time.monotonic)
    used: bool = False  # either side sent something on it (relay, ICE, a path report)
    relayed_bytes: int = 0
    relayed_frames: int = 0

    def as_message(self) -> dict[str, Any]:
        """For the channel layer: plain values only."""
        return {
            "introduction_id": self.introduction_id,
            "peer_id": self.peer_id,
            "peer_channel": self.peer_channel,
            "peer_connection_id": self.peer_connection_id,
            "initiator": self.initiator,
            "relay": self.relay,
            "peer_tags": list(self.peer_tags),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PeerLink:
        return cls(
            introduction_id=message["introduction_id"],
            peer_id=message["peer_id"],
            peer_channel=message["peer_channel"],
            peer_connection_id=message["peer_connection_id"],
            initiator=message["initiator"],
            relay=message.get("relay", True),
            peer_tags=tuple(message.get("peer_tags") or ()),
        )


class PeerLinks:
    """A connection's introduced peers: at most `limit` it asked for, and at most `limit` others
    asked for that are in use (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._links: dict[str, PeerLink] = {}

    def full(self, *, asked: bool) -> bool:
        """Whether no more links of a kind fit: those this connection `asked` for (in use or
        not), or those others asked for that are in use."""
        return self.count(asked=asked) >= self.limit

    def count(self, *, asked: bool) -> int:
        if asked:
            return sum(1 for link in self._links.values() if link.initiator)
        return sum(1 for link in self._links.values() if not link.initiator and link.used)

    def add(self, link: PeerLink) -> bool:
        """Hold `link`; False when it is one this connection asked for and those are full
        (others' links are checked when they are accepted, and again when first used)."""
        if link.introduction_id not in self._links and link.initiator and self.full(asked=True):
            return False
        if link.introduction_id not in self._links:
            metrics.peer_link_opened()
        self._links[link.introduction_id] = link
        return True

    def get(self, introduction_id: str) -> PeerLink | None:
        return self._links.get(introduction_id)

    def pop(self, introduction_id: str) -> PeerLink | None:
        link = self._links.pop(introduction_id, None)
        if link is not None:
            metrics.peer_link_closed()
        return link

    def drain(self) -> list[PeerLink]:
        links = list(self._links.values())
        for link in links:
            self.pop(link.introduction_id)
        return links

    def __len__(self) -> int:
        return len(self._links)

    def __iter__(self) -> Iterator[PeerLink]:
        return iter(list(self._links.values()))
