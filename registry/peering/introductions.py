"""Introductions: how two workers are told about each other, and what they get from it.

A asks to reach B (`connect_request`); the service asks B (`introduction_request`), on whichever
instance holds it; B accepts or refuses at once. On acceptance both sides get an `introduction`:
from then on the service relays their binary frames (registry/relay.py) and their ICE candidates,
and each side has TURN credentials of its own when TURN is configured. While B decides, the
request waits in B's consumer (`Pending`); afterwards each side's consumer keeps a `PeerLink`
to the other. No state is shared between instances: consumers talk through the channel layer.

`PeerSide` is one connection's part in all of this; the consumer hands it the peer messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from registry.core import protocol, turn
from registry.core.certificates import Certificate
from registry.core.peer_policy import ALLOW_ALL, NOT_EVALUATED, Decision, Policy, Subject
from registry.core.ratelimit import TokenBucket
from registry.models import decode_tags
from registry.ops import metrics
from registry.ops.logs import InstanceLogAdapter
from registry.peering import reach, records, rules
from registry.peering.relay import (
    DROP_NOT_INTRODUCED,
    PeerLink,
    PeerLinks,
    ReadWindow,
    RelayPort,
    SendWindow,
)
from registry.presence import selectors
from registry.presence.runtime import DELIVER, InstanceRuntime, get_runtime

log = InstanceLogAdapter(
    logging.getLogger("registry.introductions"), lambda: get_runtime().instance_id
)

# B's agent answers an introduction request at once (accepting needs no network work); one that
# has not answered by then is taken as unresponsive, so A hears within 2 s either way.
ANSWER_TIMEOUT = 1.5
MAX_PENDING = 32  # per connection: a worker cannot be made to hold unbounded state
# Connect requests per connection: a burst, then one a second.
REQUEST_RATE = 1.0
REQUEST_BURST = 5

ROLE_INITIATOR = "initiator"
ROLE_RESPONDER = "responder"

# What one consumer asks another through the channel layer (runtime.DELIVER `event`).
FRAME = "frame"  # pass a text frame to the worker
INTRODUCTION_REQUEST = "introduction_request"  # A's request, for B to decide
INTRODUCED = "introduced"  # B accepted: A's link and A's introduction frame
LINK_CLOSED = "link_closed"  # the other side ended the introduction

Send = Callable[[str], Awaitable[None]]


def new_introduction_id() -> str:
    return uuid.uuid4().hex


def outdated(version: int) -> bool:
    return version < protocol.PEER_PROTOCOL_VERSION


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
        }


class PendingIntroductions:
    """Requests waiting for this connection's answer. Each is removed by its answer or by its
    expiry timer (`PeerSide._expire`), which tells the requester."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def add(self, pending: Pending) -> bool:
        if len(self._pending) >= MAX_PENDING:
            return False
        self._pending[pending.introduction_id] = pending
        return True

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


class PeerSide:
    """One connection's part in introductions: as requester (A), as target (B), and afterwards
    as one end of a peer link (ICE candidates, relay frames, path reports, the close)."""

    def __init__(
        self,
        *,
        worker_id: str,
        connection_id: int,
        runtime: InstanceRuntime,
        send: Send,
        send_bytes: Callable[[bytes], Awaitable[None]],
        base_send: Callable[..., Any],
        certificate: Certificate | None = None,
        tags: str = "",
    ) -> None:
        config = settings.RENDEZVOUS
        self.worker_id = worker_id
        self.subject = Subject.of(worker_id, decode_tags(tags))
        self.connection_id = connection_id
        self.certificate = certificate.encoded if certificate else None
        self.runtime = runtime
        self._send = send
        self._send_bytes = send_bytes
        self._base_send = base_send
        self._pending = PendingIntroductions()
        self._requests = TokenBucket(rate=REQUEST_RATE, burst=REQUEST_BURST)
        self.links = PeerLinks(config["RELAY_MAX_PEERS"])
        self.relay = RelayPort(
            links=self.links,
            forward=self._forward,
            bytes_per_second=config["RELAY_BYTES_PER_SECOND"],
            frames_per_second=config["RELAY_FRAMES_PER_SECOND"],
        )
        self._window: SendWindow | None = None
        self._window_tried = False
        self._reading = ReadWindow.attach(base_send)

    # ---- A: asking to reach a peer ---------------------------------------------------------

    async def request(self, request: protocol.ConnectRequest) -> str:
        """This worker (A) asks to reach `request.peer_id` (B): ask B, on whichever instance."""

        def failed(code: protocol.ConnectFailure, reason: str) -> str:
            self._failed(code, reason, peer_id=request.peer_id, introduction_id="")
            return protocol.connect_failed(
                request_id=request.request_id, peer_id=request.peer_id, code=code, reason=reason
            )

        if request.peer_id == self.worker_id:
            return failed(protocol.ConnectFailure.NOT_YOURSELF, "a worker cannot reach itself")
        if outdated(request.protocol_version):
            return failed(
                protocol.ConnectFailure.AGENT_OUTDATED,
                f"this service speaks peer protocol {protocol.PEER_PROTOCOL_VERSION} (ICE and a "
                "relay); this agent is older: upgrade rendezvous-worker-agent",
            )
        if not self._requests.take():
            return failed(
                protocol.ConnectFailure.RATE_LIMITED,
                f"at most {REQUEST_RATE:g} connect request a second; slow down",
            )
        if self.links.full():
            return failed(protocol.ConnectFailure.TOO_MANY_PEERS, self._too_many(self.worker_id))
        if request.transport == protocol.Transport.QUIC and self.certificate is None:
            return failed(protocol.ConnectFailure.NO_IDENTITY, _no_identity(self.worker_id))
        # The policy first: a worker that may not reach B does not learn whether B is online.
        decision = await self._decide(self.subject, request.peer_id)
        if not decision.allowed:
            self._record_refusal(request.peer_id, decision)
            return failed(protocol.ConnectFailure.POLICY_DENIED, decision.reason)
        target = await database_sync_to_async(selectors.peer_target)(request.peer_id)
        if target is None:
            return failed(
                protocol.ConnectFailure.PEER_UNAVAILABLE,
                f"worker {request.peer_id} is not connected",
            )
        pending = Pending(
            introduction_id=new_introduction_id(),
            requester_id=self.worker_id,
            requester_channel=self.runtime.channel_name,
            requester_connection_id=self.connection_id,
            request_id=request.request_id,
            transport=request.transport,
            requester_certificate=self.certificate,
            requester_tags=tuple(sorted(self.subject.tags)),
            decided_by=decision.by,
        )
        await self.runtime.send_command(
            target.channel_name,
            DELIVER,
            target.connection_id,
            event=INTRODUCTION_REQUEST,
            **pending.as_message(),
            bounce=self._bounce(
                event=FRAME,
                frame=protocol.connect_failed(
                    request_id=request.request_id,
                    peer_id=request.peer_id,
                    code=protocol.ConnectFailure.PEER_UNAVAILABLE,
                    reason=f"worker {request.peer_id} went offline",
                    introduction_id=pending.introduction_id,
                ),
            ),
        )
        log.info(
            "worker=%s introduction=%s asks to reach %s",
            self.worker_id,
            pending.introduction_id,
            request.peer_id,
        )
        return protocol.connect_pending(
            request_id=request.request_id,
            introduction_id=pending.introduction_id,
            peer_id=request.peer_id,
        )

    # ---- B: deciding ---------------------------------------------------------------------------

    async def requested(self, message: dict[str, Any]) -> None:
        """A's request reached this connection (B): hold it and ask the worker."""
        pending = Pending.from_message(message)
        if not self._pending.add(pending):
            await self._refuse(pending, "the peer has too many introductions pending")
            return
        self.runtime.spawn(self._expire(pending), what="introduction answer timeout")
        await self._send(
            protocol.introduction_request(
                introduction_id=pending.introduction_id,
                peer_id=pending.requester_id,
                transport=pending.transport,
            )
        )

    async def _expire(self, pending: Pending) -> None:
        await asyncio.sleep(max(0.0, pending.expires_at - time.monotonic()))
        if self._pending.expire(pending.introduction_id) is None:
            return  # answered (or failed otherwise)
        reason = f"worker {self.worker_id} did not answer within {ANSWER_TIMEOUT:g}s"
        code = protocol.ConnectFailure.PEER_UNRESPONSIVE
        await self._to_requester(pending, self._failure(pending, code, reason))
        self._failed(code, reason, peer_id=pending.requester_id, pending=pending)

    async def answer(
        self, answer: protocol.IntroductionAccept | protocol.IntroductionReject
    ) -> str:
        """This worker (B) answers: both sides get their `introduction`, or A is told why not."""
        pending = self._pending.take(answer.introduction_id)
        if pending is None:
            raise protocol.InvalidField("no introduction pending under that id (expired?)")
        if isinstance(answer, protocol.IntroductionReject):
            await self._refuse(pending, answer.reason or "the peer does not accept connections")
            return protocol.introduction_rejected(answer.introduction_id)
        if outdated(answer.protocol_version):
            code = protocol.ConnectFailure.AGENT_OUTDATED
            reason = f"worker {self.worker_id} runs an agent too old for peer connections"
            await self._to_requester(pending, self._failure(pending, code, reason))
            self._failed(code, reason, peer_id=pending.requester_id, pending=pending)
            raise protocol.ProtocolError(
                f"this service speaks peer protocol {protocol.PEER_PROTOCOL_VERSION}; "
                "upgrade rendezvous-worker-agent",
                code=protocol.ErrorCode.INVALID_FIELD,
            )
        refusal = None
        # Again, as B's instance reads the rules now: one may have changed while B decided.
        requester = Subject.of(pending.requester_id, pending.requester_tags)
        decision = await self._decide(requester, self.subject)
        if not decision.allowed:
            refusal = protocol.ConnectFailure.POLICY_DENIED, decision.reason
        elif self.links.full():
            refusal = protocol.ConnectFailure.TOO_MANY_PEERS, self._too_many(self.worker_id)
        elif pending.transport == protocol.Transport.QUIC and self.certificate is None:
            refusal = protocol.ConnectFailure.NO_IDENTITY, _no_identity(self.worker_id)
        if refusal is not None:
            code, reason = refusal
            await self._to_requester(pending, self._failure(pending, code, reason))
            self._failed(
                code, reason, peer_id=pending.requester_id, pending=pending, decided_by=decision.by
            )
            return self._failure(pending, code, reason, for_me=True)
        relay = bool(settings.RENDEZVOUS["RELAY"])
        mine = PeerLink(
            introduction_id=pending.introduction_id,
            peer_id=pending.requester_id,
            peer_channel=pending.requester_channel,
            peer_connection_id=pending.requester_connection_id,
            initiator=False,
            relay=relay,
            peer_tags=pending.requester_tags,
        )
        self.links.add(mine)
        theirs = PeerLink(
            introduction_id=pending.introduction_id,
            peer_id=self.worker_id,
            peer_channel=self.runtime.channel_name,
            peer_connection_id=self.connection_id,
            initiator=True,
            relay=relay,
            peer_tags=tuple(sorted(self.subject.tags)),
        )
        turn_a, turn_b = turn_credentials(pending.requester_id), turn_credentials(self.worker_id)
        if turn_a is not None:
            metrics.turn_credentials(2)
        await self.runtime.send_command(
            pending.requester_channel,
            DELIVER,
            pending.requester_connection_id,
            event=INTRODUCED,
            link=theirs.as_message(),
            frame=protocol.introduction(
                introduction_id=pending.introduction_id,
                request_id=pending.request_id,
                peer_id=self.worker_id,
                role=ROLE_INITIATOR,
                turn=turn_a,
                transport=pending.transport,
                peer_certificate=self.certificate,
                relay=relay,
            ),
            bounce=self._bounce(
                event=LINK_CLOSED,
                introduction_id=pending.introduction_id,
                reason=f"worker {pending.requester_id} went offline",
            ),
        )
        metrics.introduction(None)
        self.runtime.spawn(
            database_sync_to_async(records.record_introduction)(
                introduction_id=pending.introduction_id,
                requester_id=pending.requester_id,
                target_id=self.worker_id,
                requester_connection_id=pending.requester_connection_id,
                target_connection_id=self.connection_id,
                decided_by=decision.by,
            ),
            what=f"record of introduction {pending.introduction_id}",
        )
        log.info(
            "worker=%s introduction=%s introduced to %s%s",
            self.worker_id,
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
        )

    async def _refuse(self, pending: Pending, reason: str) -> None:
        code = protocol.ConnectFailure.PEER_REFUSED
        await self._to_requester(pending, self._failure(pending, code, reason))
        self._failed(code, reason, peer_id=pending.requester_id, pending=pending)

    # ---- A: the introduction arrives ----------------------------------------------------------

    async def introduced(self, message: dict[str, Any]) -> None:
        link = PeerLink.from_message(message["link"])
        if not self.links.add(link):  # filled up while B was deciding
            reason = self._too_many(self.worker_id)
            await self._tell_peer(link, event=LINK_CLOSED, reason=reason)
            await self._send(
                protocol.peer_closed(
                    introduction_id=link.introduction_id, peer_id=link.peer_id, reason=reason
                )
            )
            return
        await self._send(message["frame"])

    # ---- both: once introduced ------------------------------------------------------------------

    async def ice_candidates(self, message: protocol.IceCandidates) -> None:
        """Pass the candidates on to the peer; nothing is answered when that works."""
        link = self._link(message.introduction_id)
        await self._tell_peer(link, event=FRAME, frame=protocol.ice_candidates(message))

    async def path_report(self, report: protocol.PathReport) -> str:
        link = self._link(report.introduction_id)
        metrics.peer_path(report.kind)
        requester, target = (
            (self.worker_id, link.peer_id) if link.initiator else (link.peer_id, self.worker_id)
        )
        await database_sync_to_async(records.record_path)(
            introduction_id=report.introduction_id,
            requester_id=requester,
            target_id=target,
            kind=report.kind,
            remote=report.remote or "",
            setup_ms=report.setup_ms,
        )
        log.info(
            "worker=%s introduction=%s path to %s: %s%s",
            self.worker_id,
            report.introduction_id,
            link.peer_id,
            report.kind,
            f" via {report.remote}" if report.remote else "",
        )
        return protocol.path_report_recorded(report.introduction_id, report.kind)

    async def close(self, request: protocol.PeerClose) -> str:
        link = self._link(request.introduction_id)
        reason = request.reason or f"closed by {self.worker_id}"
        await self._end(link, reason)
        await self._tell_peer(link, event=LINK_CLOSED, reason=reason)
        return protocol.peer_closed(
            introduction_id=link.introduction_id, peer_id=link.peer_id, reason=reason
        )

    async def link_closed(self, message: dict[str, Any]) -> None:
        link = self.links.get(message["introduction_id"])
        if link is None:
            return
        await self._end(link, message["reason"])
        await self._send(
            protocol.peer_closed(
                introduction_id=link.introduction_id, peer_id=link.peer_id, reason=message["reason"]
            )
        )

    async def disconnected(self) -> None:
        """The connection ended: its pending requests fail and its peers are told."""
        for pending in self._pending.drain():
            reason = f"worker {self.worker_id} went offline"
            await self._to_requester(
                pending, self._failure(pending, protocol.ConnectFailure.PEER_UNAVAILABLE, reason)
            )
        for link in list(self.links.drain()):
            reason = f"worker {self.worker_id} went offline"
            await self._record_close(link, reason)
            await self._tell_peer(link, event=LINK_CLOSED, reason=reason)

    # ---- the peer policy changed ----------------------------------------------------------------

    async def policy_changed(self, policy: Policy) -> int:
        """End the links the new rules no longer allow (and the relaying for them); both sides
        are told. Returns how many ended here."""
        ended = 0
        for link in list(self.links):
            peer = Subject.of(link.peer_id, link.peer_tags)
            source, destination = (self.subject, peer) if link.initiator else (peer, self.subject)
            decision = policy.decide(source, destination)
            if decision.allowed:
                continue
            reason = f"the peer policy no longer allows it: {decision.reason}"
            if not await self._end(link, reason):
                continue  # ended meanwhile (by the peer, or by a reload before this one)
            await self._tell_peer(link, event=LINK_CLOSED, reason=reason)
            await self._send(
                protocol.peer_closed(
                    introduction_id=link.introduction_id, peer_id=link.peer_id, reason=reason
                )
            )
            metrics.policy_link_ended()
            ended += 1
        return ended

    async def _decide(self, source: Subject, destination: Subject | str) -> Decision:
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
            return policy.decide(source, destination)
        except Exception:  # the rules or the tags cannot be read: refused (never fails open)
            log.exception("peer policy: the rules cannot be read; refusing introductions")
            metrics.policy_error()
            return Decision(False, NOT_EVALUATED)

    def _record_refusal(self, peer_id: str, decision: Decision) -> None:
        self.runtime.spawn(
            database_sync_to_async(records.record_failed_introduction)(
                introduction_id=new_introduction_id(),
                requester_id=self.worker_id,
                target_id=peer_id,
                code=protocol.ConnectFailure.POLICY_DENIED,
                reason=decision.reason,
                decided_by=decision.by,
            ),
            what="record of a refused introduction",
        )

    # ---- relay frames ------------------------------------------------------------------------

    async def relay_from_worker(self, frame: bytes) -> protocol.RelayError | None:
        """A relay frame from this connection's worker: relayed, or the error to tell it."""
        try:
            return await self.relay.from_worker(frame)
        finally:
            if self._reading is not None:
                self._reading.handled()

    async def relayed_to_me(self, frame: bytes) -> None:
        """A relay frame for this connection's worker, unless its link has ended here (a rule
        change, a close: the sender's side may not know yet) or its socket is not keeping up."""
        if self.links.get(protocol.relay_frame_id(frame)) is None:
            metrics.relay_dropped(DROP_NOT_INTRODUCED)
            return
        if not self._window_tried:
            self._window_tried = True
            self._window = SendWindow.attach(self._base_send)
        if self._window is not None and self._window.paused:
            metrics.relay_dropped("peer_slow")
            return
        await self._send_bytes(frame)

    async def _forward(self, link: PeerLink, frame: bytes) -> bool:
        return await self.runtime.relay_to(link.peer_channel, link.peer_connection_id, frame)

    # ---- helpers -----------------------------------------------------------------------------

    def _link(self, introduction_id: str) -> PeerLink:
        link = self.links.get(introduction_id)
        if link is None:
            raise protocol.InvalidField("no introduction under that id on this connection")
        return link

    async def _end(self, link: PeerLink, reason: str) -> bool:
        """End the link here; False if it had ended already."""
        if self.links.pop(link.introduction_id) is None:
            return False
        await self._record_close(link, reason)
        return True

    async def _record_close(self, link: PeerLink, reason: str) -> None:
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

    async def _tell_peer(self, link: PeerLink, **message: Any) -> None:
        await self.runtime.send_command(
            link.peer_channel,
            DELIVER,
            link.peer_connection_id,
            introduction_id=link.introduction_id,
            **message,
        )

    async def _to_requester(self, pending: Pending, frame: str) -> None:
        await self.runtime.send_command(
            pending.requester_channel,
            DELIVER,
            pending.requester_connection_id,
            event=FRAME,
            frame=frame,
        )

    def _bounce(self, **message: Any) -> dict[str, Any]:
        """What the receiving instance sends back here if the addressee is gone."""
        return {
            "channel": self.runtime.channel_name,
            "connection_id": self.connection_id,
            "message": message,
        }

    def _failure(
        self,
        pending: Pending,
        code: protocol.ConnectFailure,
        reason: str,
        *,
        for_me: bool = False,
    ) -> str:
        return protocol.connect_failed(
            request_id=pending.request_id,
            peer_id=pending.requester_id if for_me else self.worker_id,
            code=code,
            reason=reason,
            introduction_id=pending.introduction_id,
        )

    def _failed(
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

    @staticmethod
    def _too_many(worker_id: str) -> str:
        limit = settings.RENDEZVOUS["RELAY_MAX_PEERS"]
        return (
            f"worker {worker_id} has {limit} peer connections already (RENDEZVOUS_RELAY_MAX_PEERS)"
        )


def _no_identity(worker_id: str) -> str:
    return (
        f"worker {worker_id} presented no certificate: encrypted connections need the agent's "
        "p2p extra on both sides"
    )
