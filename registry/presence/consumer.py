"""The WebSocket endpoint `/ws/register/<worker_id>`: one connection's life and nothing more.

What a handshake means lives in handshake.py, what a frame means in core/protocol, what a peer
message means in peering/introductions.py; this class turns socket events into those calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autobahn.exception import Disconnected
from channels.db import database_sync_to_async
from channels.exceptions import DenyConnection
from django.conf import settings
from django.db import DatabaseError

from registry.core import certificates, protocol
from registry.core.addresses import observed_address
from registry.core.peer_policy import Policy, Subject
from registry.core.ratelimit import Flood, MessageRate
from registry.models import decode_tags
from registry.ops import metrics
from registry.ops.logs import InstanceLogAdapter
from registry.peering import reach
from registry.peering.events import Subscription
from registry.peering.introductions import PeerSide
from registry.presence import handshake, reports, sessions
from registry.presence.fair_consumer import FairConsumer
from registry.presence.runtime import SUPERSEDE, InstanceRuntime, get_runtime
from registry.security import enrolment
from registry.security.origins import origin_allowed

log = InstanceLogAdapter(logging.getLogger("registry.consumers"), lambda: get_runtime().instance_id)

# Dropped messages are one streak while the drops keep coming: a gap this long (seconds) without
# one ends it. A streak gets one error frame and one log line, and a streak of
# RATE_LIMIT_CLOSE_AFTER drops closes the connection (4029).
FLOOD_MEMORY = 10.0
# Why a text frame was dropped unanswered (the `reason` label of rendezvous_messages_dropped).
DROP_RATE_LIMITED = "rate_limited"
DROP_CLOSING = "closing"

# What a send to a socket that has just closed raises: ASGI asks servers for an OSError
# (uvicorn's ClientDisconnected), daphne lets autobahn's Disconnected through.
SEND_AFTER_CLOSE: tuple[type[Exception], ...] = (OSError, Disconnected)


class RegisterConsumer(FairConsumer):
    # No channel of its own: commands reach it through its instance's channel (runtime.py).
    channel_layer_alias = None
    worker_id: str = ""
    tags: str = ""
    connection_id: int | None = None
    certificate: certificates.Certificate | None = None
    _peer_side: PeerSide | None = None
    _confirm_credential = False
    _server_close_code: int | None = None
    _last_heartbeat: float | None = None

    async def connect(self) -> None:
        try:
            await self._open()
        except handshake.Refused as refusal:  # the one place a refusal becomes a close
            await self.accept()
            await self.close_with(refusal.code, refusal.reason)
            metrics.closed(refusal.code)

    async def _open(self) -> None:
        """Check the handshake, register, welcome the worker and hold its socket. Refusals
        before `accept` raise DenyConnection (daphne answers HTTP 403), after it
        handshake.Refused."""
        self.worker_id = self.scope["url_route"]["kwargs"]["worker_id"]
        config = settings.RENDEZVOUS
        self._check_handshake()
        self.max_frame_bytes = config["MAX_FRAME_BYTES"]
        self.rate = MessageRate(
            rate=config["RATE_LIMIT"],
            burst=config["RATE_BURST"],
            close_after=config["RATE_LIMIT_CLOSE_AFTER"],
            memory=FLOOD_MEMORY,
        )
        self.observed_ip, self.observed_port = observed_address(
            self.scope, config["TRUSTED_PROXIES"]
        )
        runtime = get_runtime()
        request = sessions.RegistrationRequest(
            worker_id=self.worker_id,
            channel_name=runtime.channel_name,
            observed_ip=self.observed_ip,
            observed_port=self.observed_port,
        )
        admitted = await handshake.admit(runtime, request, self.scope.get("headers", []))
        registration = admitted.registration
        self.connection_id = registration.connection_id
        self.tags = registration.tags
        self.certificate = admitted.certificate
        self._confirm_credential = admitted.confirm_credential
        metrics.registered()
        await self.accept()
        await self.send(self._welcome(admitted.credential))
        # Held from here on, and nothing is awaited after it: a consumer cancelled before this
        # line leaves a row without a socket, which reconciliation closes; one cancelled after
        # an await here would leave a socket entry that nothing ever removes.
        self._hold(runtime, registration, admitted.credential)

    def _check_handshake(self) -> None:
        """The worker id and the Origin, refused before `accept`: HTTP 403."""
        if not protocol.is_valid_worker_id(self.worker_id):
            log.warning("refused worker id %r: outside the id rule", self.worker_id[:200])
            raise DenyConnection
        if not origin_allowed(
            self.scope,
            allowed_hosts=settings.ALLOWED_HOSTS,
            allowed_origins=settings.RENDEZVOUS["ALLOWED_ORIGINS"],
        ):
            log.warning("worker=%s refused: cross-site Origin", self.worker_id[:200])
            raise DenyConnection

    def _welcome(self, credential: str | None) -> str:
        config = settings.RENDEZVOUS
        return protocol.welcome(
            worker_id=self.worker_id,
            connection_id=self.connection_id or 0,
            instance_id=get_runtime().instance_id,
            observed_ip=self.observed_ip,
            observed_port=self.observed_port,
            heartbeat_interval=config["HEARTBEAT_INTERVAL"],
            max_frame_bytes=self.max_frame_bytes,
            security_mode=config["SECURITY_MODE"],
            credential=credential,
            stun_servers=config["STUN_SERVERS"],
            turn_servers=config["TURN_SERVERS"] if config["TURN_SECRET"] else [],
            relay=bool(config["RELAY"]),
        )

    def _hold(
        self,
        runtime: InstanceRuntime,
        registration: sessions.Registration,
        credential: str | None,
    ) -> None:
        """Held by this instance, announced to peers, logged; the superseded socket closed."""
        assert self.connection_id is not None
        runtime.attach(
            self.connection_id,
            self.close_with,
            self.observed_ip,
            deliver=self.deliver,
            relay=self.relayed_to_me,
            policy_changed=self.policy_changed,
        )
        runtime.peers.joined(self.worker_id, self.tags)
        superseded = registration.superseded_connection_id
        log.info(
            "worker=%s connection=%s registered from %s:%s%s%s",
            self.worker_id,
            self.connection_id,
            self.observed_ip,
            self.observed_port,
            ", enrolled with a new credential" if credential else "",
            f", superseding connection={superseded}" if superseded else "",
        )
        if registration.superseded_channel and superseded:
            # In the background: a slow channel layer must not hold up this connection. If the
            # command is lost, the holder closes the old socket at its next housekeeping round.
            runtime.spawn(
                runtime.send_command(registration.superseded_channel, SUPERSEDE, superseded),
                what=f"supersede of connection {superseded}",
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.connection_id is None:
            return
        metrics.message_received()
        if self._server_close_code is not None:
            # The service is closing this socket (a flood, say): what still arrives is not read.
            metrics.message_dropped(DROP_CLOSING)
            return
        if text_data is None:
            # Binary frames are relay frames, budgeted by the relay, not the message rate limit.
            await self._relay(bytes_data or b"")
            return
        parsed = self._parse(text_data)
        if not self._answers_a_request(parsed):
            flood = self.rate.admit()
            if flood is not None:
                await self._dropped(flood)
                return
        reply = await self._reply(parsed)
        if reply is not None:
            await self.send(reply)

    def _parse(self, text: str) -> protocol.ClientMessage | protocol.ProtocolError:
        """The frame's message, or the refusal to answer it with (once within the rate limit)."""
        try:
            return protocol.parse_client_message(text, max_bytes=self.max_frame_bytes)
        except protocol.ProtocolError as exc:
            return exc
        except Exception:  # a bug in a parser: this frame fails, the connection stays
            log.exception(
                "worker=%s connection=%s frame failed", self.worker_id, self.connection_id
            )
            return protocol.Unavailable("service busy; send it again later")

    def _answers_a_request(self, message: protocol.ClientMessage | protocol.ProtocolError) -> bool:
        """An answer to an introduction request this connection holds costs nothing against its
        rate limit: others' requests must not use it up (they are bounded by the requesters'
        own rates and by MAX_PENDING, and each is answered once)."""
        return self._peer_side is not None and self._peer_side.target.awaits(message)

    async def _reply(self, message: protocol.ClientMessage | protocol.ProtocolError) -> str | None:
        """What a frame within the rate limit is answered with: its reply, or its error."""
        try:
            await self._confirm()
            if isinstance(message, protocol.ProtocolError):
                raise message
            return await self.handle(message)
        except DatabaseError as exc:
            log.error(
                "worker=%s connection=%s not recorded: %s", self.worker_id, self.connection_id, exc
            )
            return _error(protocol.Unavailable("registry unavailable; send it again later"))
        except protocol.ProtocolError as exc:
            self._log_refused(exc)
            return _error(exc)
        except Exception:
            # The channel layer away (Redis), a full channel: this frame fails, the connection
            # stays. Escaping here would end the consumer without its disconnect clean-up.
            log.exception(
                "worker=%s connection=%s frame failed", self.worker_id, self.connection_id
            )
            return _error(protocol.Unavailable("service busy; send it again later"))

    def _log_refused(self, exc: protocol.ProtocolError) -> None:
        log.info(
            "worker=%s connection=%s %s: %s",
            self.worker_id,
            self.connection_id,
            exc.code,
            exc.message,
        )

    async def _confirm(self) -> None:
        """An enrolment is confirmed by the first frame the enrolled worker sends."""
        if self._confirm_credential:
            await database_sync_to_async(enrolment.confirm_credential)(
                connection_id=self.connection_id
            )
            self._confirm_credential = False

    async def _relay(self, frame: bytes) -> None:
        try:
            await self._confirm()
            refused = await self.peer_side.relay_from_worker(frame)
        except DatabaseError as exc:
            log.error("worker=%s relay frame dropped: %s", self.worker_id, exc)
            return
        except Exception:  # the channel layer away: these datagrams are lost, as on UDP
            log.exception("worker=%s relay frame failed", self.worker_id)
            return
        if refused is not None:
            self._log_refused(refused)
            await self.send(_error(refused))

    @property
    def peer_side(self) -> PeerSide:
        """This connection's part in introductions and the relay, made on first use."""
        if self._peer_side is None:
            self._peer_side = PeerSide(
                worker_id=self.worker_id,
                connection_id=self.connection_id or 0,
                runtime=get_runtime(),
                send=self.send,
                send_bytes=self._send_bytes,
                base_send=self.base_send,
                certificate=self.certificate,
                tags=self.tags,
            )
        return self._peer_side

    @property
    def subject(self) -> Subject:
        """This worker as the peer policy sees it."""
        return Subject.of(self.worker_id, decode_tags(self.tags))

    async def policy_changed(self, policy: Policy) -> int:
        """The peer rules changed: end the links they no longer allow."""
        if self._peer_side is None:
            return 0
        return await self._peer_side.policy_changed(policy)

    async def _send_bytes(self, frame: bytes) -> None:
        await self.send(bytes_data=frame)

    async def handle(self, message: protocol.ClientMessage) -> str | None:
        match message:
            case protocol.RegisterPublicIp(ip=ip):
                await self._report(reports.Report(self.connection_id or 0, public_ip=ip))
                return protocol.public_ip_registered(ip)
            case protocol.Heartbeat():
                self._last_heartbeat = metrics.heartbeat(self._last_heartbeat)
                # No write: housekeeping refreshes last_seen of every held worker in one statement.
                return protocol.heartbeat_ack(time.time())
            case protocol.AgentInfo(info=info):
                await self._report(reports.Report(self.connection_id or 0, agent_info=info))
                return protocol.agent_info_recorded()
            case protocol.NatReport():
                await self._report(reports.Report(self.connection_id or 0, nat=message))
                return protocol.nat_report_recorded(message.mapping)
            case protocol.ListPeers(tag=tag, request_id=request_id, offline=offline):
                peer_list, truncated = await reach.reachable_peers(
                    self.subject, tag=tag, offline=offline
                )
                return protocol.peers(peer_list, request_id=request_id, truncated=truncated)
            case protocol.SubscribePeers(tag=tag):
                await get_runtime().peers.subscribe(
                    self.connection_id,
                    Subscription(
                        worker_id=self.worker_id, tag=tag, send=self.send, subject=self.subject
                    ),
                )
                return protocol.peers_subscribed(tag)
            case protocol.UnsubscribePeers():
                get_runtime().peers.unsubscribe(self.connection_id)
                return protocol.peers_unsubscribed()
            case (
                protocol.ConnectRequest()
                | protocol.IntroductionAccept()
                | protocol.IntroductionReject()
                | protocol.IceCandidates()
                | protocol.PathReport()
                | protocol.PeerClose()
            ):
                return await self.peer_side.handle(message)
        raise AssertionError(f"unhandled message {message!r}")

    async def _report(self, report: reports.Report) -> None:
        """Written with every other connection's reports in one batch (runtime.reports); counted,
        and logged at DEBUG only: an INFO line for every frame of a fleet is noise, not events."""
        stored = await get_runtime().reports.submit(report)
        metrics.report(report.kind, stored)
        log.debug(
            "worker=%s connection=%s reported %s%s",
            self.worker_id,
            self.connection_id,
            report.kind,
            "" if stored else " ignored: no longer the current connection",
        )

    # ---- from other consumers (runtime.DELIVER, runtime.RELAY) -------------------------------

    async def deliver(self, message: dict[str, Any]) -> None:
        """A message from another consumer through the channel layer (runtime.DELIVER)."""
        await self.peer_side.delivered(message)

    async def relayed_to_me(self, frame: bytes) -> None:
        """A relay frame from a peer of this worker (runtime.RELAY)."""
        await self.peer_side.relayed_to_me(frame)

    async def _dropped(self, flood: Flood) -> None:
        """A message over the rate limit was dropped: counted; said (and logged) once per streak;
        or, when the streak is long enough, the connection closed (and logged once)."""
        metrics.message_dropped(DROP_RATE_LIMITED)
        if flood is Flood.CLOSE:
            log.warning(
                "worker=%s connection=%s closed for flooding: %d messages dropped",
                self.worker_id,
                self.connection_id,
                self.rate.dropped,
            )
            await self.close_with(protocol.CloseCode.RATE_LIMITED)
        elif flood is Flood.WARN:
            refusal = protocol.RateLimited("too many messages; those beyond the limit are dropped")
            self._log_refused(refusal)
            await self.send(_error(refusal))

    async def disconnect(self, code: int) -> None:
        if self.connection_id is None:
            return
        by_server = self._server_close_code is not None
        final_code = self._server_close_code if by_server else code
        reason = protocol.describe_close(final_code, by_server=by_server)
        metrics.closed(final_code)
        runtime = get_runtime()
        if self._peer_side is not None:
            try:  # its peers hear at once; pending requests to it fail
                await self._peer_side.disconnected()
            except Exception:  # the channel layer away: their links end with their own sockets
                log.warning("worker=%s peers not told of the close", self.worker_id, exc_info=True)
        try:
            ended = await runtime.closes.submit(
                sessions.CloseRequest(self.connection_id, final_code or 1006, reason)
            )
        except DatabaseError as exc:
            # Housekeeping closes the row once the database is back (reconcile_instance).
            log.error(
                "worker=%s connection=%s close not recorded: %s",
                self.worker_id,
                self.connection_id,
                exc,
            )
            return
        finally:
            # Only now: until the close is written, reconciliation must see this socket as held,
            # or it would record the row as lost (1006) over the true code.
            runtime.detach(self.connection_id)
        # Ended here, or already by whoever asked the server to close (an operator, a ban,
        # housekeeping): either way the worker is gone, unless a newer connection took over.
        gone = ended or (by_server and final_code != protocol.CloseCode.SUPERSEDED)
        if gone:
            runtime.peers.left(self.worker_id, self.tags)
        log.info(
            "worker=%s connection=%s closed code=%s (%s)%s",
            self.worker_id,
            self.connection_id,
            final_code,
            reason,
            "" if gone else ", worker still held by a newer connection",
        )

    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        try:
            await super().send(text_data, bytes_data, close)
        except SEND_AFTER_CLOSE as exc:
            # The socket closed (or began to) while this frame was on its way: a normal race. Its
            # disconnect is queued behind this event and does the clean-up; raising here would
            # end the consumer without it.
            metrics.send_after_close()
            log.debug(
                "worker=%s connection=%s frame dropped, socket closed: %s",
                self.worker_id,
                self.connection_id,
                exc,
            )
            return
        metrics.message_sent()

    async def close_with(self, code: int, reason: str | None = None) -> None:
        """Close from the server side: say why in a `closing` frame, then close with `code`."""
        if self._server_close_code is not None:
            return
        self._server_close_code = int(code)
        await self.send(protocol.closing(protocol.CloseCode(code), reason))
        await self.close(code=int(code))


def _error(exc: protocol.ProtocolError) -> str:
    """The `error` frame for a refused frame, counted by its code."""
    metrics.protocol_error(exc.code)
    return protocol.error(exc)
