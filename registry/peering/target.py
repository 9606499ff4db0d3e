"""A connection as the one asked (B): a request held while its worker decides, and the answer.
On acceptance, decided again by the rules this instance holds (one may have changed while B
decided), both sides get their link and their `introduction`, with TURN credentials of their own
when TURN is configured; otherwise the requester hears why not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from registry.core import protocol, turn
from registry.core.peer_policy import Decision, Subject
from registry.ops import metrics
from registry.peering import probing, records
from registry.peering.links import PeerLink
from registry.peering.pending import ANSWER_TIMEOUT, Pending, PendingIntroductions
from registry.peering.side import (
    INTRODUCED,
    LINK_CLOSED,
    ConnectionSide,
    log,
    no_identity,
    outdated,
    too_many,
)
from registry.presence import selectors

ROLE_INITIATOR = "initiator"
ROLE_RESPONDER = "responder"

Answer = protocol.IntroductionAccept | protocol.IntroductionReject
Refusal = tuple[protocol.ConnectFailure, str]


def turn_credentials(worker_id: str) -> dict[str, Any] | None:
    """This worker's TURN credentials for one introduction, or None without TURN."""
    config = settings.RENDEZVOUS
    credentials = turn.mint(
        servers=config["TURN_SERVERS"],
        secret=config["TURN_SECRET"],
        name=worker_id,
        ttl=config["TURN_TTL"],
    )
    return None if credentials is None else credentials.as_dict()


class Target:
    def __init__(self, side: ConnectionSide) -> None:
        self.side = side
        self.pending = PendingIntroductions()

    async def requested(self, message: dict[str, Any]) -> None:
        """A's request reached this connection (B): hold it and ask the worker."""
        pending = Pending.from_message(message)
        if not self.pending.add(pending):
            await self._refuse(pending, "the peer has too many introductions pending")
            return
        self.side.runtime.spawn(self._expire(pending), what="introduction answer timeout")
        await self.side.send(
            protocol.introduction_request(
                introduction_id=pending.introduction_id,
                peer_id=pending.requester_id,
                transport=pending.transport,
                resumes=pending.resumes,
            )
        )

    async def _expire(self, pending: Pending) -> None:
        await asyncio.sleep(max(0.0, pending.expires_at - time.monotonic()))
        if self.pending.expire(pending.introduction_id) is None:
            return  # answered (or failed otherwise)
        reason = f"worker {self.side.worker_id} did not answer within {ANSWER_TIMEOUT:g}s"
        await self._fail(pending, protocol.ConnectFailure.PEER_UNRESPONSIVE, reason)

    def awaits(self, message: object) -> bool:
        """Whether `message` answers a request this connection holds (unanswered, in time)."""
        return isinstance(message, Answer) and self.pending.holds(message.introduction_id)

    async def answer(self, answer: Answer) -> str:
        """This worker (B) answers: both sides get their `introduction`, or A is told why not."""
        pending = self.pending.take(answer.introduction_id)
        if pending is None:
            raise protocol.InvalidField("no introduction pending under that id (expired?)")
        if isinstance(answer, protocol.IntroductionReject):
            await self._refuse(pending, answer.reason or "the peer does not accept connections")
            return protocol.introduction_rejected(answer.introduction_id)
        if outdated(answer.protocol_version):
            reason = f"worker {self.side.worker_id} runs an agent too old for peer connections"
            await self._fail(pending, protocol.ConnectFailure.AGENT_OUTDATED, reason)
            raise protocol.ProtocolError(
                f"this service speaks peer protocol {protocol.PEER_PROTOCOL_VERSION}; "
                "upgrade rendezvous-worker-agent",
                code=protocol.ErrorCode.INVALID_FIELD,
            )
        if pending.resumes and answer.protocol_version < protocol.RESUMING_PEER_PROTOCOL_VERSION:
            reason = f"worker {self.side.worker_id} runs an agent that cannot resume connections"
            await self._fail(pending, protocol.ConnectFailure.PEER_REFUSED, reason)
            return protocol.introduction_rejected(answer.introduction_id)
        # Again, as B's instance reads the rules now: one may have changed while B decided.
        requester = Subject.of(pending.requester_id, pending.requester_tags)
        decision = await self.side.decide(requester, self.side.subject)
        refusal = self._refusal(pending, decision)
        if refusal is None:
            return await self._accept(pending, decision)
        code, reason = refusal
        await self._fail(pending, code, reason, decided_by=decision.by)
        return self.side.failure(pending, code, reason, for_me=True)

    def _refusal(self, pending: Pending, decision: Decision) -> Refusal | None:
        side = self.side
        if not decision.allowed:
            return protocol.ConnectFailure.POLICY_DENIED, decision.reason
        if side.links.full(asked=False):
            return protocol.ConnectFailure.TOO_MANY_PEERS, too_many(side.worker_id)
        if pending.transport == protocol.Transport.QUIC and side.certificate is None:
            return protocol.ConnectFailure.NO_IDENTITY, no_identity(side.worker_id)
        return None

    async def _accept(self, pending: Pending, decision: Decision) -> str:
        """Both sides linked; A's introduction on its way to A's consumer, B's returned."""
        side = self.side
        relay = bool(settings.RENDEZVOUS["RELAY"])
        mine, theirs = self._link_both(pending, relay)
        side.runtime.spawn(self._end_if_unused(mine), what="unused introduction timeout")
        turn_a, turn_b = turn_credentials(pending.requester_id), turn_credentials(side.worker_id)
        probe_a, probe_b = await self._hard_nat_roles(pending)
        if turn_a is not None:
            metrics.turn_credentials(2)
        await side.tell(
            pending.requester_channel,
            pending.requester_connection_id,
            event=INTRODUCED,
            link=theirs.as_message(),
            frame=protocol.introduction(
                introduction_id=pending.introduction_id,
                request_id=pending.request_id,
                peer_id=side.worker_id,
                role=ROLE_INITIATOR,
                turn=turn_a,
                transport=pending.transport,
                peer_certificate=side.certificate,
                relay=relay,
                hard_nat=probe_a,
            ),
            bounce=side.bounce(
                event=LINK_CLOSED,
                introduction_id=pending.introduction_id,
                reason=f"worker {pending.requester_id} went offline",
                code=protocol.PeerClosedCode.PEER_OFFLINE,
            ),
        )
        metrics.introduction(None)
        self._record(pending, decision)
        log.info(
            "worker=%s introduction=%s introduced to %s%s",
            side.worker_id,
            pending.introduction_id,
            pending.requester_id,
            ", with TURN credentials" if turn_b else "",
        )
        return protocol.introduction(
            introduction_id=pending.introduction_id,
            request_id=None,
            peer_id=pending.requester_id,
            role=ROLE_RESPONDER,
            turn=turn_b,
            transport=pending.transport,
            peer_certificate=pending.requester_certificate,
            relay=relay,
            hard_nat=probe_b,
        )

    async def _hard_nat_roles(self, pending: Pending) -> tuple[str | None, str | None]:
        """Who probes for whose hard NAT (peering/probing.py); nothing unless it is on."""
        if not settings.RENDEZVOUS["HARD_NAT_PROBING"]:
            return None, None
        ids = (pending.requester_id, self.side.worker_id)
        mappings = await database_sync_to_async(selectors.nat_mappings)(ids)
        return probing.roles(mappings.get(ids[0], ""), mappings.get(ids[1], ""))

    def _link_both(self, pending: Pending, relay: bool) -> tuple[PeerLink, PeerLink]:
        """This side's link to A, held here; and A's link to this side, for A."""
        side = self.side
        mine = PeerLink(
            introduction_id=pending.introduction_id,
            peer_id=pending.requester_id,
            peer_channel=pending.requester_channel,
            peer_connection_id=pending.requester_connection_id,
            initiator=False,
            relay=relay,
            peer_tags=pending.requester_tags,
        )
        side.links.add(mine)
        return mine, PeerLink(
            introduction_id=pending.introduction_id,
            peer_id=side.worker_id,
            peer_channel=side.runtime.channel_name,
            peer_connection_id=side.connection_id,
            initiator=True,
            relay=relay,
            peer_tags=tuple(sorted(side.subject.tags)),
        )

    async def _end_if_unused(self, link: PeerLink) -> None:
        """Neither side has sent anything on the introduction in time (a requester that never
        meant to connect, say): ended for both, so it holds no slot and no state of either. A
        live pair's initiator reports its path as soon as the relay carries it, and sends ICE
        candidates within seconds when there is no relay."""
        timeout = settings.RENDEZVOUS["UNUSED_INTRODUCTION_TIMEOUT"]
        await asyncio.sleep(timeout)
        if link.used or self.side.links.get(link.introduction_id) is not link:
            return
        metrics.unused_introduction()
        reason = f"neither worker used the introduction within {timeout:g}s"
        await self.side.end_link(link, reason, code=protocol.PeerClosedCode.UNUSED)

    def _record(self, pending: Pending, decision: Decision) -> None:
        self.side.runtime.spawn(
            database_sync_to_async(records.record_introduction)(
                introduction_id=pending.introduction_id,
                requester_id=pending.requester_id,
                target_id=self.side.worker_id,
                requester_connection_id=pending.requester_connection_id,
                target_connection_id=self.side.connection_id,
                decided_by=decision.by,
            ),
            what=f"record of introduction {pending.introduction_id}",
        )

    async def _refuse(self, pending: Pending, reason: str) -> None:
        await self._fail(pending, protocol.ConnectFailure.PEER_REFUSED, reason)

    async def _fail(
        self,
        pending: Pending,
        code: protocol.ConnectFailure,
        reason: str,
        *,
        decided_by: str = "",
    ) -> None:
        """A is told why not; the failure is counted, logged and recorded."""
        await self.side.tell_requester(pending, self.side.failure(pending, code, reason))
        self.side.failed(
            code, reason, peer_id=pending.requester_id, pending=pending, decided_by=decided_by
        )

    async def disconnected(self) -> None:
        """This connection ended: the requests it held fail at once."""
        for pending in self.pending.drain():
            reason = f"worker {self.side.worker_id} went offline"
            await self.side.tell_requester(
                pending,
                self.side.failure(pending, protocol.ConnectFailure.PEER_UNAVAILABLE, reason),
            )
