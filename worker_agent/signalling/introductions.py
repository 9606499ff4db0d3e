"""Signalling: peer discovery and introductions over the service session.

The host program asks to reach a peer (`introduce`: a `connect_request`, then the service's
`introduction` or the reason there is none); a peer asks to reach us (`introduction_request`,
answered at once). Each accepted introduction is carried by an object of the layer above (a
`Carrier`: the path and what runs on it), which this layer opens through `open` and hands every
frame of that introduction: ICE candidates, relayed datagrams, the peer's close. Discovery
(`list_peers`, peer events) needs nothing more. Standard library only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .. import wire
from ..errors import (
    PeerClosed,
    PeerError,
    PeerRefused,
    PeerUnavailable,
    PeerUnresponsive,
    PolicyDenied,
)
from .requests import Requests, request_id

logger = logging.getLogger("worker_agent")

ENDED_KEPT = 16  # introductions that ended lately, remembered to say why and to quiet late frames

_FAILURES: dict[str, type[PeerError]] = {
    wire.ConnectFailure.PEER_UNAVAILABLE: PeerUnavailable,
    wire.ConnectFailure.PEER_UNRESPONSIVE: PeerUnresponsive,
    wire.ConnectFailure.PEER_REFUSED: PeerRefused,
    wire.ConnectFailure.POLICY_DENIED: PolicyDenied,
}
_ANSWERS = (
    wire.ServerMessageType.INTRODUCTION,
    wire.ServerMessageType.CONNECT_FAILED,
    wire.ServerMessageType.PEER_CLOSED,
)

Send = Callable[[str], bool]


class Carrier(Protocol):
    """What carries one introduction (the agent's peer session). Every method is called on the
    service session's reading thread: it hands the work on and returns at once."""

    introduction_id: str
    peer_id: str

    @property
    def failure(self) -> PeerError | None: ...  # why it ended at once, if it did

    @property
    def closed_reason(self) -> str | None: ...

    def start(self) -> None: ...

    def ice_candidates(self, message: dict[str, Any]) -> None: ...

    def relayed(self, datagrams: list[bytes]) -> None: ...

    def peer_closed(self, reason: str) -> None: ...

    def relay_lost(self, reason: str, *, resumable: bool) -> None: ...

    def peer_offline(self, reason: str) -> None: ...

    def resume(self, introduction: dict[str, Any]) -> None: ...

    def end(self, reason: str) -> None: ...


Open = Callable[[dict[str, Any], float | None], Carrier]  # the introduction, when asked
Refusal = Callable[[str], str | None]  # transport -> why this worker refuses it, or None
Incoming = Callable[[Carrier], None]  # an introduction a peer asked for, carried now


class Signalling:
    def __init__(
        self,
        worker_id: str,
        send: Send,
        *,
        open_carrier: Open,
        refusal: Refusal,
        incoming: Incoming,
        stun_servers: Sequence[str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._send = send
        self._open = open_carrier
        self._refusal = refusal
        self._incoming = incoming
        self._configured_stun = list(stun_servers) if stun_servers else None
        self._advertised_stun: list[str] = []
        self.requests = Requests(send)
        self._lock = threading.Lock()
        # Introductions this worker accepted, until they arrive: a resumed carrier, or None.
        self._answering: dict[str, Carrier | None] = {}
        self._resuming: dict[str, Carrier] = {}  # request id -> the carrier it resumes
        self._carriers: dict[str, Carrier] = {}
        # Introductions that ended lately, so an `introduce` that looks its carrier up just
        # after it ended can say why (the last few only).
        self._ended: OrderedDict[str, Carrier] = OrderedDict()
        self._connects: dict[str, float] = {}  # request id -> when the introduction was asked
        self._subscription: tuple[bool, str | None] = (False, None)
        self.resumable = False  # the service resumes introductions (its welcome says so)

    # ---- the session with the service ---------------------------------------------------------

    def session_started(self, welcome: dict[str, Any]) -> None:
        """A new registration: the service's STUN servers, the subscription renewed; relay links
        of the previous connection are gone (direct routes carry on)."""
        advertised = welcome.get("stun_servers")
        if isinstance(advertised, list):
            self._advertised_stun = [s for s in advertised if isinstance(s, str)]
        version = welcome.get("protocol_version")
        self.resumable = isinstance(version, int) and version >= wire.RESUMING_PROTOCOL_VERSION
        subscribed, tag = self._subscription
        if subscribed:
            self._send(wire.subscribe_peers(tag))
        for carrier in self.carriers():
            carrier.relay_lost(
                "the connection to the service was renewed", resumable=self.resumable
            )

    def stun_servers(self) -> list[tuple[str, int]]:
        servers = []
        for text in self._configured_stun or self._advertised_stun:
            try:
                servers.append(wire.parse_host_port(text))
            except ValueError:
                logger.warning("worker=%s: ignoring STUN server %r", self.worker_id, text)
        return servers

    # ---- discovery -----------------------------------------------------------------------------

    def list_peers(
        self, *, tag: str | None = None, timeout: float = 5.0, offline: bool = False
    ) -> list[dict[str, Any]]:
        key = request_id()
        frame = wire.list_peers(request_id=key, tag=tag, offline=offline)
        reply = self.requests.ask(frame, key, timeout)
        peers = reply.get("peers")
        return peers if isinstance(peers, list) else []

    def subscribe(self, tag: str | None = None) -> None:
        """Peer events (`peer_joined`, `peer_left`) from now on, renewed after reconnects."""
        self._subscription = (True, tag)
        self._send(wire.subscribe_peers(tag))

    def unsubscribe(self) -> None:
        self._subscription = (False, None)
        self._send(wire.unsubscribe_peers())

    # ---- introductions we ask for ---------------------------------------------------------------

    def introduce(
        self, peer_id: str, transport: str, timeout: float, *, resumes: Carrier | None = None
    ) -> Carrier:
        """Ask the service to introduce us to `peer_id`; the carrier the introduction opened
        (or `resumes`, carrying on under the new introduction), or the PeerError that says why
        there is none."""
        key = request_id()
        with self._lock:
            self._connects[key] = time.monotonic()
            if resumes is not None:
                self._resuming[key] = resumes
        frame = wire.connect_request(
            peer_id=peer_id,
            request_id=key,
            transport=transport,
            resumes=resumes.introduction_id if resumes is not None else None,
        )
        try:
            reply = self.requests.ask(frame, key, timeout, until=_ANSWERS)
        finally:
            with self._lock:
                self._connects.pop(key, None)
                self._resuming.pop(key, None)
        kind = reply["type"]
        if kind == wire.ServerMessageType.CONNECT_FAILED:
            code = str(reply.get("code", ""))
            failure = _FAILURES.get(code, PeerError)
            raise failure(f"cannot reach {peer_id}: {reply.get('reason')}", code=code)
        if kind == wire.ServerMessageType.PEER_CLOSED:
            raise PeerClosed(f"cannot reach {peer_id}: {reply.get('reason')}")
        introduction_id = str(reply.get("introduction_id"))
        carrier = self.carrier(introduction_id)
        if carrier is None:  # ended between the introduction and now
            with self._lock:
                ended = self._ended.get(introduction_id)
            if ended is not None and ended.failure is not None:
                raise ended.failure
            reason = ended.closed_reason if ended is not None else None
            raise PeerClosed(f"the connection to {peer_id} ended at once: {reason or 'closed'}")
        return carrier

    # ---- frames from the service (on the session's reading thread: never block) -------------

    def handle(self, message: dict[str, Any]) -> bool:
        """Take a peer frame; False if it is not one of ours."""
        kind = message.get("type")
        introduction_id = message.get("introduction_id")
        if kind == wire.ServerMessageType.INTRODUCTION_REQUEST:
            self._requested(message)
        elif kind == wire.ServerMessageType.INTRODUCTION:
            self._introduced(message)
        elif kind == wire.ServerMessageType.ICE_CANDIDATES:
            carrier = self.carrier(introduction_id)
            if carrier is not None:
                carrier.ice_candidates(message)
        elif kind == wire.ServerMessageType.PEER_CLOSED:
            carrier = self.carrier(introduction_id)
            if carrier is None:
                self.requests.wake(message)
            elif message.get("code") == wire.PeerClosedCode.PEER_OFFLINE:
                carrier.peer_offline(f"the peer went offline: {message.get('reason')}")
            else:
                carrier.peer_closed(f"closed by the peer: {message.get('reason')}")
        elif kind == wire.ServerMessageType.CONNECT_FAILED:
            with self._lock:
                self._answering.pop(str(introduction_id), None)
            self.requests.wake(message)
        elif kind in (wire.ServerMessageType.PEERS, wire.ServerMessageType.CONNECT_PENDING):
            self.requests.wake(message)
        elif kind == wire.ServerMessageType.ERROR and self.ended_here(introduction_id):
            # Relay frames that were on their way when the connection to the peer closed.
            logger.debug(
                "worker=%s late frame of an ended introduction: %s", self.worker_id, message
            )
        else:
            return kind in (
                wire.ServerMessageType.PATH_REPORT_RECORDED,
                wire.ServerMessageType.INTRODUCTION_REJECTED,
            )
        return True

    def relay_frame(self, frame: bytes) -> None:
        """A binary frame: datagrams from a peer through the service relay."""
        try:
            introduction_id, datagrams = wire.parse_relay_frame(frame)
        except wire.ServerFrameError as exc:
            logger.warning("worker=%s: ignoring a binary frame: %s", self.worker_id, exc)
            return
        carrier = self.carrier(introduction_id)
        if carrier is not None:
            carrier.relayed(datagrams)

    def _requested(self, request: dict[str, Any]) -> None:
        """Another worker asks to reach this one: accept at once, or say why not. A request
        that resumes an introduction is accepted only for a carrier with that very peer."""
        introduction_id = str(request.get("introduction_id"))
        resumed = None
        if request.get("resumes") is not None:
            resumed = self.carrier(request.get("resumes"))
            reason = None
            if resumed is None or resumed.peer_id != request.get("peer_id"):
                resumed, reason = None, "nothing to resume under that introduction"
        else:
            reason = self._refusal(str(request.get("transport", wire.Transport.QUIC)))
        if reason is not None:
            self._send(wire.introduction_reject(introduction_id=introduction_id, reason=reason))
            return
        with self._lock:
            self._answering[introduction_id] = resumed
        self._send(wire.introduction_accept(introduction_id=introduction_id))

    def _introduced(self, introduction: dict[str, Any]) -> None:
        """Both sides get this: the carrier starts now, before any relayed datagram arrives."""
        introduction_id = str(introduction.get("introduction_id"))
        responder = introduction.get("role") == "responder"
        key = str(introduction.get("request_id"))
        with self._lock:
            answering = introduction_id in self._answering
            resumed = self._answering.pop(introduction_id, None)
            if not responder:
                resumed = self._resuming.get(key)
            started = self._connects.get(key)
        waited_for = self.requests.waiting(introduction.get("request_id"))
        if (responder and not answering) or (not responder and not waited_for):
            # Nobody here asked for it any more (connect() gave up): end it for the peer too.
            self._send(
                wire.peer_close(introduction_id=introduction_id, reason="the requester gave up")
            )
            return
        if resumed is not None:
            self._rekey(resumed, introduction)
        else:
            carrier = self._open(introduction, started)
            with self._lock:
                self._carriers[introduction_id] = carrier
            carrier.start()
            if responder:
                self._incoming(carrier)
        if not responder:
            self.requests.wake(introduction)

    def _rekey(self, carrier: Carrier, introduction: dict[str, Any]) -> None:
        """A carrier carries on under a new introduction (its old one is gone at the service)."""
        old = carrier.introduction_id
        carrier.resume(introduction)
        with self._lock:
            if self._carriers.get(old) is carrier:
                del self._carriers[old]
            self._carriers[carrier.introduction_id] = carrier
        logger.info(
            "worker=%s introduction=%s with %s resumed as %s",
            self.worker_id,
            old,
            carrier.peer_id,
            carrier.introduction_id,
        )

    # ---- the carriers ----------------------------------------------------------------------------

    def ended(self, carrier: Carrier) -> None:
        """A carrier ended (either side closed, or it failed): remembered for a while."""
        with self._lock:
            if self._carriers.get(carrier.introduction_id) is carrier:
                del self._carriers[carrier.introduction_id]
            self._ended[carrier.introduction_id] = carrier
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    def ended_here(self, introduction_id: Any) -> bool:
        """Whether this agent ended the introduction lately (its last packets may still reach
        the service after the service ended the link: their errors are no news)."""
        with self._lock:
            return isinstance(introduction_id, str) and introduction_id in self._ended

    def carrier(self, introduction_id: Any) -> Carrier | None:
        with self._lock:
            if not isinstance(introduction_id, str):
                return None
            return self._carriers.get(introduction_id)

    def carriers(self) -> list[Carrier]:
        with self._lock:
            return list(self._carriers.values())
