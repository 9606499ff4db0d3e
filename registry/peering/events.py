"""Peer events: who joined and who left, pushed to the workers that subscribed.

Every instance's command channel joins one channel-layer group; registrations and closes are
batched (a flush every FLUSH_DELAY seconds) into one group message, which each instance fans
out to its own subscribers. So a fleet on several instances sees every join and leave, and a
burst of 1,000 registrations costs a handful of layer messages, not 1,000.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from channels.layers import get_channel_layer

from registry.core import peer_policy, protocol
from registry.models import decode_tags
from registry.ops import metrics
from registry.peering import rules

log = logging.getLogger("registry.peers")

GROUP = "rendezvous.peers"
# Group membership expires (channels-redis group_expiry, a day by default): renew it this often
# while this instance has subscribers.
RENEW_EVERY = 3600.0
EVENTS = "peers.events"  # the group message type (runtime._listen routes it here)
FLUSH_DELAY = 0.05
JOINED = "joined"
LEFT = "left"

Send = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class Subscription:
    worker_id: str
    tag: str | None
    send: Send
    subject: peer_policy.Subject | None = None  # the subscriber, as the peer policy sees it
    # Whom the subscriber may reach under `_reach_of` (worked out once per policy, not per event).
    _reach: peer_policy.Reach | None = field(default=None, repr=False)
    _reach_of: peer_policy.Policy | None = field(default=None, repr=False)

    def reach(self, policy: peer_policy.Policy) -> peer_policy.Reach:
        if self._reach is None or self._reach_of is not policy:
            subscriber = self.subject or peer_policy.Subject.of(self.worker_id)
            self._reach, self._reach_of = rules.reach_from(policy, subscriber), policy
        return self._reach


class PeerHub:
    def __init__(self, channel_name: str, spawn: Callable[..., None]) -> None:
        self.channel_name = channel_name
        self._spawn = spawn
        self._subscriptions: dict[int, Subscription] = {}
        self._pending: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self._renewing = False

    # ---- subscribers on this instance ------------------------------------------------------------

    async def subscribe(self, connection_id: int, subscription: Subscription) -> None:
        if not self._renewing:
            # Once per instance, not per subscriber (a restart makes thousands subscribe at once,
            # and each group_add would hold a Redis connection); renewed while subscribers remain,
            # since group membership expires (channels-redis group_expiry).
            await get_channel_layer().group_add(GROUP, self.channel_name)
            if not self._renewing:
                self._renewing = True
                self._spawn(self._renew(), what="peer group renewal")
        self._subscriptions[connection_id] = subscription

    async def _renew(self) -> None:
        try:
            while self._subscriptions:
                await asyncio.sleep(RENEW_EVERY)
                if self._subscriptions:
                    await get_channel_layer().group_add(GROUP, self.channel_name)
        finally:
            self._renewing = False

    def unsubscribe(self, connection_id: int) -> bool:
        return self._subscriptions.pop(connection_id, None) is not None

    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    # ---- events from this instance's connections -----------------------------------------------

    def joined(self, worker_id: str, tags: str) -> None:
        self._queue({"event": JOINED, "worker_id": worker_id, "tags": tags})

    def left(self, worker_id: str, tags: str) -> None:
        self._queue({"event": LEFT, "worker_id": worker_id, "tags": tags})

    def _queue(self, event: dict[str, Any]) -> None:
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._spawn(self._flush(), what="peer events")

    async def _flush(self) -> None:
        await asyncio.sleep(FLUSH_DELAY)
        self._flush_scheduled = False
        events, self._pending = self._pending, []
        if events:
            await get_channel_layer().group_send(GROUP, {"type": EVENTS, "events": events})

    # ---- events from every instance, to this instance's subscribers ------------------------------

    async def dispatch(self, events: list[dict[str, Any]]) -> int:
        """Send each subscriber the events it asked for, of the workers it may reach. Returns how
        many frames were sent."""
        sent = 0
        frames = [_frame(event) for event in events]  # encoded once, for every subscriber
        policy = await _policy()
        for subscription in list(self._subscriptions.values()):
            for event, frame in zip(events, frames, strict=True):
                if frame is None or not _wanted(subscription, event, policy):
                    continue
                try:
                    await subscription.send(frame)
                    sent += 1
                except Exception:  # a closing socket must not stop the others' events
                    log.debug("peer event to %s not sent", subscription.worker_id, exc_info=True)
        return sent


async def _policy() -> peer_policy.Policy:
    """The rules the events are filtered by; when they cannot be read, nobody hears anything."""
    try:
        return await rules.current()
    except Exception:
        log.warning("peer events: the peer rules cannot be read; none sent", exc_info=True)
        metrics.policy_error()
        return peer_policy.DENY_ALL


def _frame(event: dict[str, Any]) -> str | None:
    worker_id = event.get("worker_id")
    if not isinstance(worker_id, str):
        return None
    if event.get("event") == JOINED:
        return protocol.peer_joined(worker_id, decode_tags(event.get("tags") or ""))
    if event.get("event") == LEFT:
        return protocol.peer_left(worker_id)
    return None


def _wanted(subscription: Subscription, event: dict[str, Any], policy: peer_policy.Policy) -> bool:
    if event.get("worker_id") == subscription.worker_id:
        return False  # nobody is told about itself
    tags = decode_tags(event.get("tags") or "")
    if subscription.tag is not None and subscription.tag not in tags:
        return False
    if policy.mode == peer_policy.ALLOW_ALL:
        return True
    return subscription.reach(policy).matches(peer_policy.Subject.of(str(event["worker_id"]), tags))
