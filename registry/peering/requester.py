"""A connection as the one asking (A): a connect request checked (itself, its agent's version, its
rate, its links, its identity), decided by the peer policy before anything reveals whether the
target is online, and passed to the target's consumer on whichever instance holds it; later the
introduction, when the target accepted.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from registry.core import protocol
from registry.core.peer_policy import Decision
from registry.core.ratelimit import TokenBucket
from registry.peering import records
from registry.peering.links import PeerLink
from registry.peering.pending import Pending
from registry.peering.side import (
    FRAME,
    INTRODUCTION_REQUEST,
    ConnectionSide,
    log,
    new_introduction_id,
    no_identity,
    outdated,
    too_many,
)
from registry.presence import selectors
from registry.presence.selectors import PeerTarget

# Connect requests per connection: a burst, then one a second.
REQUEST_RATE = 1.0
REQUEST_BURST = 5

Refusal = tuple[protocol.ConnectFailure, str]


class Requester:
    def __init__(self, side: ConnectionSide) -> None:
        self.side = side
        self._requests = TokenBucket(rate=REQUEST_RATE, burst=REQUEST_BURST)

    async def request(self, request: protocol.ConnectRequest) -> str:
        """This worker (A) asks to reach `request.peer_id` (B): ask B, on whichever instance."""
        refusal = self._refusal(request)
        if refusal is not None:
            return self._failed(request, *refusal)
        # The policy first: a worker that may not reach B does not learn whether B is online.
        decision = await self.side.decide(self.side.subject, request.peer_id)
        if not decision.allowed:
            self._record_refusal(request.peer_id, decision)
            return self._failed(request, protocol.ConnectFailure.POLICY_DENIED, decision.reason)
        target = await database_sync_to_async(selectors.peer_target)(request.peer_id)
        if target is None:
            return self._failed(
                request,
                protocol.ConnectFailure.PEER_UNAVAILABLE,
                f"worker {request.peer_id} is not connected",
            )
        pending = await self._ask(request, target, decision)
        return protocol.connect_pending(
            request_id=request.request_id,
            introduction_id=pending.introduction_id,
            peer_id=request.peer_id,
        )

    def _refusal(self, request: protocol.ConnectRequest) -> Refusal | None:
        """Why this connection may not ask now, whoever the peer; checked in this order (a
        request refused earlier spends no token of the rate limit)."""
        side = self.side
        if request.peer_id == side.worker_id:
            return protocol.ConnectFailure.NOT_YOURSELF, "a worker cannot reach itself"
        if outdated(request.protocol_version):
            return (
                protocol.ConnectFailure.AGENT_OUTDATED,
                f"this service speaks peer protocol {protocol.PEER_PROTOCOL_VERSION} (ICE and a "
                "relay); this agent is older: upgrade rendezvous-worker-agent",
            )
        if not self._requests.take():
            return (
                protocol.ConnectFailure.RATE_LIMITED,
                f"at most {REQUEST_RATE:g} connect request a second; slow down",
            )
        if side.links.full(asked=True):
            return protocol.ConnectFailure.TOO_MANY_PEERS, too_many(side.worker_id)
        if request.transport == protocol.Transport.QUIC and side.certificate is None:
            return protocol.ConnectFailure.NO_IDENTITY, no_identity(side.worker_id)
        return None

    def _failed(
        self, request: protocol.ConnectRequest, code: protocol.ConnectFailure, reason: str
    ) -> str:
        self.side.failed(code, reason, peer_id=request.peer_id, introduction_id="")
        return protocol.connect_failed(
            request_id=request.request_id, peer_id=request.peer_id, code=code, reason=reason
        )

    def _record_refusal(self, peer_id: str, decision: Decision) -> None:
        self.side.runtime.spawn(
            database_sync_to_async(records.record_failed_introduction)(
                introduction_id=new_introduction_id(),
                requester_id=self.side.worker_id,
                target_id=peer_id,
                code=protocol.ConnectFailure.POLICY_DENIED,
                reason=decision.reason,
                decided_by=decision.by,
            ),
            what="record of a refused introduction",
        )

    async def _ask(
        self, request: protocol.ConnectRequest, target: PeerTarget, decision: Decision
    ) -> Pending:
        """Hand the request to B's consumer; if B is gone by then, its instance sends back the
        `connect_failed` this connection's worker gets instead."""
        side = self.side
        pending = Pending(
            introduction_id=new_introduction_id(),
            requester_id=side.worker_id,
            requester_channel=side.runtime.channel_name,
            requester_connection_id=side.connection_id,
            request_id=request.request_id,
            transport=request.transport,
            requester_certificate=side.certificate,
            requester_tags=tuple(sorted(side.subject.tags)),
            decided_by=decision.by,
            resumes=request.resumes,
        )
        gone = protocol.connect_failed(
            request_id=request.request_id,
            peer_id=request.peer_id,
            code=protocol.ConnectFailure.PEER_UNAVAILABLE,
            reason=f"worker {request.peer_id} went offline",
            introduction_id=pending.introduction_id,
        )
        await side.tell(
            target.channel_name,
            target.connection_id,
            event=INTRODUCTION_REQUEST,
            **pending.as_message(),
            bounce=side.bounce(event=FRAME, frame=gone),
        )
        log.info(
            "worker=%s introduction=%s asks to reach %s",
            side.worker_id,
            pending.introduction_id,
            request.peer_id,
        )
        return pending

    async def introduced(self, message: dict[str, Any]) -> None:
        """B accepted: hold the link and pass B's introduction on, unless this connection's
        links filled up while B was deciding."""
        link = PeerLink.from_message(message["link"])
        if not self.side.links.add(link):
            code = protocol.PeerClosedCode.TOO_MANY_PEERS
            await self.side.end_link(link, too_many(self.side.worker_id), code=code, held=False)
            return
        await self.side.send(message["frame"])
