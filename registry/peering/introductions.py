"""Introductions: how two workers are told about each other, and what they get from it.

A asks to reach B (`connect_request`); the service asks B (`introduction_request`), on whichever
instance holds it; B accepts or refuses at once. On acceptance both sides get an `introduction`:
from then on the service relays their binary frames (relay.py) and their ICE candidates, and each
side has TURN credentials of its own when TURN is configured. While B decides, the request waits
in B's consumer (pending.py); afterwards each side's consumer keeps a `PeerLink` to the other
(links.py). No state is shared between instances: consumers talk through the channel layer.

`PeerSide` is one connection's part in all of this, made of the parts in requester.py (A),
target.py (B) and side.py (what both share); the consumer hands it the peer messages its worker
sends and the messages other consumers send it. What happens on a link once introduced (ICE
candidates, path reports, the close, a rule change, relay frames) is here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from registry.core import protocol
from registry.core.certificates import Certificate
from registry.core.peer_policy import Policy, Subject
from registry.ops import metrics
from registry.peering import records, rules
from registry.peering.links import PeerLink
from registry.peering.relay import (
    DROP_NOT_INTRODUCED,
    DROP_PEER_SLOW,
    ReadWindow,
    RelayPort,
    SendWindow,
)
from registry.peering.requester import Requester
from registry.peering.side import (
    FRAME,
    INTRODUCED,
    INTRODUCTION_REQUEST,
    LINK_CLOSED,
    LINK_USED,
    ConnectionSide,
    Send,
    log,
)
from registry.peering.target import Target
from registry.presence.runtime import InstanceRuntime


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
        self.side = ConnectionSide(
            worker_id=worker_id,
            connection_id=connection_id,
            runtime=runtime,
            send=send,
            certificate=certificate,
            tags=tags,
        )
        self.requester = Requester(self.side)
        self.target = Target(self.side)
        self.links = self.side.links
        self.relay = RelayPort(
            links=self.links,
            forward=self._forward,
            bytes_per_second=config["RELAY_BYTES_PER_SECOND"],
            frames_per_second=config["RELAY_FRAMES_PER_SECOND"],
        )
        self._send_bytes = send_bytes
        self._base_send = base_send
        self._window: SendWindow | None = None
        self._window_tried = False
        self._reading = ReadWindow.attach(base_send)

    async def handle(self, message: protocol.ClientMessage) -> str | None:
        """A message from this connection's worker about its peers; the reply to send, if any."""
        match message:
            case protocol.ConnectRequest():
                return await self.requester.request(message)
            case protocol.IntroductionAccept() | protocol.IntroductionReject():
                return await self.target.answer(message)
            case protocol.IceCandidates():
                await self.ice_candidates(message)
                return None  # passed on; the peer answers with its own
            case protocol.PathReport():
                return await self.path_report(message)
            case protocol.PeerClose():
                await self.close(message)
                return None  # the teardown sent `peer_closed`
        raise AssertionError(f"not a peer message: {message!r}")

    async def delivered(self, message: dict[str, Any]) -> None:
        """A message from another consumer through the channel layer (runtime.DELIVER)."""
        event = message.get("event")
        if event == FRAME:
            await self.side.send(message["frame"])
        elif event == INTRODUCTION_REQUEST:
            await self.target.requested(message)
        elif event == INTRODUCED:
            await self.requester.introduced(message)
        elif event == LINK_CLOSED:
            await self.link_closed(message)
        elif event == LINK_USED:
            await self.link_used(message)

    # ---- once introduced ----------------------------------------------------------------------

    async def ice_candidates(self, message: protocol.IceCandidates) -> None:
        """Pass the candidates on to the peer; nothing is answered when that works."""
        link = self.side.link(message.introduction_id)
        if await self._use(link):
            await self.side.tell_peer(link, event=FRAME, frame=protocol.ice_candidates(message))

    async def path_report(self, report: protocol.PathReport) -> str:
        side = self.side
        link = side.link(report.introduction_id)
        if not await self._use(link):
            raise protocol.InvalidField("no introduction under that id on this connection")
        metrics.peer_path(report.kind)
        requester, target = (
            (side.worker_id, link.peer_id) if link.initiator else (link.peer_id, side.worker_id)
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
            side.worker_id,
            report.introduction_id,
            link.peer_id,
            report.kind,
            f" via {report.remote}" if report.remote else "",
        )
        return protocol.path_report_recorded(report.introduction_id, report.kind)

    async def close(self, request: protocol.PeerClose) -> None:
        """This connection's worker ends the link."""
        link = self.side.link(request.introduction_id)
        await self.side.end_link(link, request.reason or f"closed by {self.side.worker_id}")

    async def _use(self, link: PeerLink) -> bool:
        """This worker sent something on `link`; False if that ended it (TOO_MANY_PEERS)."""
        return link.used or await self.side.use(link)

    async def link_used(self, message: dict[str, Any]) -> None:
        """The peer's worker sent something on the link: it is in use here too, if it fits."""
        link = self.links.get(message["introduction_id"])
        if link is not None and not link.used:
            await self.side.take_up(link)

    async def link_closed(self, message: dict[str, Any]) -> None:
        """The peer ended the link (or went offline: then its agent may resume it)."""
        link = self.links.get(message["introduction_id"])
        if link is not None:
            code = protocol.PeerClosedCode(message.get("code") or protocol.PeerClosedCode.CLOSED)
            await self.side.end_link(link, message["reason"], code=code, peer_knows=True)

    async def policy_changed(self, policy: Policy) -> int:
        """End the links the new rules no longer allow (and the relaying for them); both sides
        are told. Returns how many ended here."""
        me, ended = self.side.subject, 0
        for link in list(self.links):
            peer = Subject.of(link.peer_id, link.peer_tags)
            decision = rules.decide(policy, *((me, peer) if link.initiator else (peer, me)))
            if decision.allowed:
                continue
            reason = f"the peer policy no longer allows it: {decision.reason}"
            code = protocol.PeerClosedCode.POLICY_DENIED
            # False: ended meanwhile (by the peer, or by a reload before this one).
            if await self.side.end_link(link, reason, code=code):
                metrics.policy_link_ended()
                ended += 1
        return ended

    async def disconnected(self) -> None:
        """The connection ended: its pending requests fail and its peers are told."""
        await self.target.disconnected()
        for link in self.links.drain():
            reason = f"worker {self.side.worker_id} went offline"
            self.side.record_end(link, reason)
            await self.side.tell_peer(
                link, event=LINK_CLOSED, reason=reason, code=protocol.PeerClosedCode.PEER_OFFLINE
            )

    # ---- relay frames -------------------------------------------------------------------------

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
            metrics.relay_dropped(DROP_PEER_SLOW)
            return
        await self._send_bytes(frame)

    async def _forward(self, link: PeerLink, frame: bytes) -> bool:
        if not await self._use(link):
            return False  # ended at once: this side holds too many links in use
        runtime = self.side.runtime
        return await runtime.relay_to(link.peer_channel, link.peer_connection_id, frame)
