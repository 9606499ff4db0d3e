"""One connection as introductions see it, and the steps every part of an introduction shares.

`ConnectionSide` knows who the connection is (its worker, tags, certificate), the peers it is
linked to, and how to reach another consumer through the channel layer. On it: a decision of the
peer policy, a failure counted, logged and recorded, and the one teardown of a link. The parts
that build on it: requester.py (A, asking), target.py (B, asked), introductions.py (both, once
introduced).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from registry.core import protocol
from registry.core.certificates import Certificate
from registry.core.peer_policy import ALLOW_ALL, NOT_EVALUATED, Decision, Subject
from registry.models import decode_tags
from registry.ops import metrics
from registry.ops.logs import InstanceLogAdapter
from registry.peering import reach, records, rules
from registry.peering.links import PeerLink, PeerLinks
from registry.peering.pending import Pending
from registry.presence.runtime import DELIVER, InstanceRuntime, get_runtime

log = InstanceLogAdapter(
    logging.getLogger("registry.introductions"), lambda: get_runtime().instance_id
)

# What one consumer asks another through the channel layer (runtime.DELIVER `event`).
FRAME = "frame"  # pass a text frame to the worker
INTRODUCTION_REQUEST = "introduction_request"  # A's request, for B to decide
INTRODUCED = "introduced"  # B accepted: A's link and A's introduction frame
LINK_CLOSED = "link_closed"  # the other side ended the introduction
LINK_USED = "link_used"  # the other side's worker sent something on the introduction

Send = Callable[[str], Awaitable[None]]


def new_introduction_id() -> str:
    return uuid.uuid4().hex


def outdated(version: int) -> bool:
    return version < protocol.MIN_PEER_PROTOCOL_VERSION


def too_many(worker_id: str) -> str:
    limit = settings.RENDEZVOUS["RELAY_MAX_PEERS"]
    return f"worker {worker_id} has {limit} peer connections already (RENDEZVOUS_RELAY_MAX_PEERS)"


def no_identity(worker_id: str) -> str:
    return (
        f"worker {worker_id} presented no certificate: encrypted connections need the agent's "
        "p2p extra on both sides"
    )


class ConnectionSide:
    def __init__(
        self,
        *,
        worker_id: str,
        connection_id: int,
        runtime: InstanceRuntime,
        send: Send,
        certificate: Certificate | None = None,
        tags: str = "",
    ) -> None:
        self.worker_id = worker_id
        self.subject = Subject.of(worker_id, decode_tags(tags))
        self.connection_id = connection_id
        self.certificate = certificate.encoded if certificate else None
        self.runtime = runtime
        self.send = send  # a text frame to this connection's worker
        self.links = PeerLinks(settings.RENDEZVOUS["RELAY_MAX_PEERS"])

    # ---- other consumers, through the channel layer -------------------------------------------

    async def tell(self, channel_name: str, connection_id: int, **message: Any) -> None:
        await self.runtime.send_command(channel_name, DELIVER, connection_id, **message)

    async def tell_peer(self, link: PeerLink, **message: Any) -> None:
        await self.tell(
            link.peer_channel,
            link.peer_connection_id,
            introduction_id=link.introduction_id,
            **message,
        )

    async def tell_requester(self, pending: Pending, frame: str) -> None:
        await self.tell(
            pending.requester_channel, pending.requester_connection_id, event=FRAME, frame=frame
        )

    def bounce(self, **message: Any) -> dict[str, Any]:
        """What the receiving instance sends back here if the addressee is gone."""
        return {
            "channel": self.runtime.channel_name,
            "connection_id": self.connection_id,
            "message": message,
        }

    # ---- the peer policy ----------------------------------------------------------------------

    async def decide(self, source: Subject, destination: Subject | str) -> Decision:
        """May `source` reach `destination` (a worker id: its tags are read, unless the policy is
        allow-all), by the rules this process holds? Refused when they cannot be read."""
        try:
            policy = await rules.current()
            if isinstance(destination, str):
                destination = (
                    Subject.of(destination)
                    if policy.mode == ALLOW_ALL
                    else await database_sync_to_async(reach.subject)(destination)
                )
            return rules.decide(policy, source, destination)
        except Exception:  # the rules or the tags cannot be read: refused (never fails open)
            log.exception("peer policy: the rules cannot be read; refusing introductions")
            metrics.policy_error()
            return Decision(False, NOT_EVALUATED)

    # ---- failures -----------------------------------------------------------------------------

    def failure(
        self,
        pending: Pending,
        code: protocol.ConnectFailure,
        reason: str,
        *,
        for_me: bool = False,
    ) -> str:
        """The `connect_failed` frame for a pending request: for its requester, or `for_me`."""
        return protocol.connect_failed(
            request_id=pending.request_id,
            peer_id=pending.requester_id if for_me else self.worker_id,
            code=code,
            reason=reason,
            introduction_id=pending.introduction_id,
        )

    def failed(
        self,
        code: protocol.ConnectFailure,
        reason: str,
        *,
        peer_id: str,
        introduction_id: str = "",
        pending: Pending | None = None,
        decided_by: str = "",
    ) -> None:
        """Count, log and (for an introduction B was asked about) record a failure; the record
        says what the policy decided: `decided_by`, else what it said at A's request."""
        metrics.introduction(code)
        log.info(
            "worker=%s introduction=%s with %s failed: %s %s",
            self.worker_id,
            pending.introduction_id if pending else introduction_id or "-",
            peer_id,
            code,
            reason,
        )
        if pending is not None:
            self.runtime.spawn(
                database_sync_to_async(records.record_failed_introduction)(
                    introduction_id=pending.introduction_id,
                    requester_id=pending.requester_id,
                    target_id=self.worker_id,
                    code=code,
                    reason=reason,
                    decided_by=decided_by or pending.decided_by,
                ),
                what=f"record of introduction {pending.introduction_id}",
            )

    # ---- links --------------------------------------------------------------------------------

    def link(self, introduction_id: str) -> PeerLink:
        """This connection's link under `introduction_id`, or the error the worker is told."""
        link = self.links.get(introduction_id)
        if link is None:
            raise protocol.InvalidField("no introduction under that id on this connection")
        return link

    async def end_link(
        self,
        link: PeerLink,
        reason: str,
        *,
        code: protocol.PeerClosedCode = protocol.PeerClosedCode.CLOSED,
        peer_knows: bool = False,
        held: bool = True,
    ) -> bool:
        """The one teardown of a link: ended here and recorded (if it was `held` here: False if
        it had ended already), the peer's consumer told (LINK_CLOSED) unless it ended the link
        itself (`peer_knows`), and this connection's worker sent `peer_closed` with `code`."""
        if held:
            if self.links.pop(link.introduction_id) is None:
                return False
            self.record_end(link, reason)
        if not peer_knows:
            await self.tell_peer(link, event=LINK_CLOSED, reason=reason, code=code)
        await self.send(
            protocol.peer_closed(
                introduction_id=link.introduction_id,
                peer_id=link.peer_id,
                reason=reason,
                code=code,
            )
        )
        return True

    async def use(self, link: PeerLink) -> bool:
        """This connection's worker sent something on `link`: the first time, the link is in use
        here and the peer's consumer is told (LINK_USED), so that neither side ends it as unused.
        False when this side cannot take it into use (too many links others asked for are in use
        here): then it is ended, TOO_MANY_PEERS."""
        if link.used:
            return True
        if not await self.take_up(link):
            return False
        await self.tell_peer(link, event=LINK_USED)
        return True

    async def take_up(self, link: PeerLink) -> bool:
        """Count `link` as in use here, if it fits; otherwise end it for both sides."""
        if not link.initiator and self.links.full(asked=False):
            code = protocol.PeerClosedCode.TOO_MANY_PEERS
            await self.end_link(link, too_many(self.worker_id), code=code)
            return False
        link.used = True
        return True

    def record_end(self, link: PeerLink, reason: str) -> None:
        log.info(
            "worker=%s introduction=%s with %s ended: %s (%d bytes relayed from this side)",
            self.worker_id,
            link.introduction_id,
            link.peer_id,
            reason,
            link.relayed_bytes,
        )
        self.runtime.spawn(
            database_sync_to_async(records.close_peer_connection)(
                introduction_id=link.introduction_id,
                reason=reason,
                relayed_bytes=link.relayed_bytes,
            ),
            what=f"record of the end of introduction {link.introduction_id}",
        )
