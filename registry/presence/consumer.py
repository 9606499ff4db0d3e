"""The WebSocket endpoint `/ws/register/<worker_id>`: one connection's life and nothing more.

What a registration means lives in `services`; what a frame means lives in `protocol`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError

from registry.core import certificates, protocol, tokens
from registry.core.addresses import observed_address
from registry.core.peer_policy import Policy, Subject
from registry.core.ratelimit import TokenBucket
from registry.models import decode_tags
from registry.ops import metrics
from registry.ops.logs import InstanceLogAdapter
from registry.peering import introductions, reach
from registry.peering.events import Subscription
from registry.peering.introductions import PeerSide
from registry.presence import reports, sessions
from registry.presence.runtime import SUPERSEDE, get_runtime
from registry.security import enrolment, identities
from registry.security.origins import origin_allowed

log = InstanceLogAdapter(logging.getLogger("registry.consumers"), lambda: get_runtime().instance_id)

# Dropped messages count towards the 4029 close only while the drops keep coming: a gap this
# long (seconds) without one starts the count again.
FLOOD_MEMORY = 10.0

# What a send to a socket that has just closed raises: ASGI asks servers for an OSError
# (uvicorn's ClientDisconnected), daphne lets autobahn's Disconnected through.
SEND_AFTER_CLOSE: tuple[type[Exception], ...] = (OSError, Disconnected)


class RegisterConsumer(AsyncWebsocketConsumer):
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

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its per-event `aclose_old_connections`.

        That call is a hop to the database thread for every frame and every disconnect (55% of
        the server's CPU while 10,000 workers disconnected in the benchmark). This consumer
        reaches the database only through database_sync_to_async and the coalescers, which
        close stale connections in the thread that owns them.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        # Channels' version ends with the same database-thread hop as its dispatch (no groups
        # to leave here either).
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def connect(self) -> None:
        self.worker_id = self.scope["url_route"]["kwargs"]["worker_id"]
        if not protocol.is_valid_worker_id(self.worker_id):
            log.warning("refused worker id %r: outside the id rule", self.worker_id[:200])
            await self.close()  # before accept: daphne answers the handshake with HTTP 403
            return
        config = settings.RENDEZVOUS
        if not origin_allowed(
            self.scope,
            allowed_hosts=settings.ALLOWED_HOSTS,
            allowed_origins=config["ALLOWED_ORIGINS"],
        ):
            log.warning("worker=%s refused: cross-site Origin", self.worker_id[:200])
            await self.close()  # before accept: HTTP 403
            return
        self.max_frame_bytes = config["MAX_FRAME_BYTES"]
        self.bucket = TokenBucket(rate=config["RATE_LIMIT"], burst=config["RATE_BURST"])
        self.dropped = 0
        self.last_drop = 0.0
        self.rate_limited_streak = False
        self.observed_ip, self.observed_port = observed_address(
            self.scope, config["TRUSTED_PROXIES"]
        )
        runtime = get_runtime()
        refusal = runtime.admission_refusal(self.observed_ip)
        if refusal is not None:
            log.warning("worker=%s from %s refused: %s", self.worker_id, self.observed_ip, refusal)
            await self.accept()
            await self.close_with(protocol.CloseCode.LIMIT_EXCEEDED, refusal)
            metrics.closed(protocol.CloseCode.LIMIT_EXCEEDED)
            return
        request = sessions.RegistrationRequest(
            worker_id=self.worker_id,
            channel_name=runtime.channel_name,
            observed_ip=self.observed_ip,
            observed_port=self.observed_port,
        )
        try:
            registration, credential = await self._register(request)
        except enrolment.AuthenticationFailed as exc:
            if not isinstance(exc, enrolment.WorkerDisabled):
                runtime.admission.authentication_failed(self.observed_ip)
            log.warning(
                "worker=%s from %s refused: %s", self.worker_id, self.observed_ip, exc.detail
            )
            metrics.authentication_refused(exc.code)
            await self.accept()
            await self.close_with(exc.code, exc.reason)
            metrics.closed(exc.code)
            return
        except DatabaseError as exc:
            log.error(
                "worker=%s registration failed, database unavailable: %s", self.worker_id, exc
            )
            await self.accept()
            await self.close_with(protocol.CloseCode.TRY_AGAIN_LATER)
            metrics.closed(protocol.CloseCode.TRY_AGAIN_LATER)
            return
        self.connection_id = registration.connection_id
        self.tags = registration.tags
        metrics.registered()
        await self.accept()
        await self.send(
            protocol.welcome(
                worker_id=self.worker_id,
                connection_id=self.connection_id,
                instance_id=runtime.instance_id,
                observed_ip=self.observed_ip,
                observed_port=self.observed_port,
                heartbeat_interval=config["HEARTBEAT_INTERVAL"],
                max_frame_bytes=self.max_frame_bytes,
                security_mode=config["SECURITY_MODE"],
                credential=credential,
                stun_servers=config["STUN_SERVERS"],
            )
        )
        # Held from here on, and nothing is awaited after it: a consumer cancelled before this
        # line leaves a row without a socket, which reconciliation closes; one cancelled after
        # an await here would leave a socket entry that nothing ever removes.
        runtime.attach(
            self.connection_id,
            self.close_with,
            self.observed_ip,
            deliver=self.deliver,
            relay=self.relayed_to_me,
            policy_changed=self.policy_changed,
        )
        runtime.peers.joined(self.worker_id, self.tags)
        log.info(
            "worker=%s connection=%s registered from %s:%s%s%s",
            self.worker_id,
            self.connection_id,
            self.observed_ip,
            self.observed_port,
            ", enrolled with a new credential" if credential else "",
            f", superseding connection={registration.superseded_connection_id}"
            if registration.superseded_connection_id
            else "",
        )
        if registration.superseded_channel and registration.superseded_connection_id:
            # In the background: a slow channel layer must not hold up this connection. If the
            # command is lost, the holder closes the old socket at its next housekeeping round.
            runtime.spawn(
                runtime.send_command(
                    registration.superseded_channel,
                    SUPERSEDE,
                    registration.superseded_connection_id,
                ),
                what=f"supersede of connection {registration.superseded_connection_id}",
            )

    async def _register(
        self, request: sessions.RegistrationRequest
    ) -> tuple[sessions.Registration, str | None]:
        """Authenticate (secured mode) and register; the credential issued on enrolment, if the
        service made it; the worker's certificate recorded when it is new."""
        runtime = get_runtime()
        headers = self.scope.get("headers", [])
        try:
            self.certificate = certificates.presented(headers)
        except certificates.InvalidCertificate as exc:
            raise enrolment.AuthenticationFailed(
                f"invalid certificate: {exc}", f"invalid certificate ({exc})"
            ) from None
        secured = settings.RENDEZVOUS["SECURITY_MODE"] == enrolment.SECURED
        grant = None
        if secured:
            grant = await runtime.authentications.submit(
                enrolment.Handshake(
                    worker_id=self.worker_id,
                    bearer=tokens.bearer_token(headers),
                    offered=tokens.header_value(headers, tokens.CREDENTIAL_HEADER),
                    certificate=self.certificate,
                )
            )
        if grant is enrolment.UNCONFIRMED:
            self._confirm_credential = True  # presenting it proves the worker has it
            grant = None
        if grant is None:
            registration = await runtime.registrations.submit(request)
        else:
            registration = await database_sync_to_async(self._enrol)(grant, request)
        if registration.refused:
            raise enrolment.WorkerDisabled(
                protocol.CLOSE_REASONS[protocol.CloseCode.WORKER_DISABLED], "worker is disabled"
            )
        if grant is not None:
            self._confirm_credential = True  # at its first frame after the welcome
        elif self._identity_is_new(registration.fingerprint, secured):
            assert self.certificate is not None
            runtime.spawn(
                runtime.identities.submit(
                    identities.Announcement(registration.connection_id or 0, self.certificate)
                ),
                what=f"identity of worker {self.worker_id}",
            )
        issued = grant.credential.secret if grant is not None and grant.issued else None
        return registration, issued

    def _identity_is_new(self, recorded: str, secured: bool) -> bool:
        """Whether this connection's certificate is to be recorded: in open mode whenever it
        changed, in secured mode only where none is bound (a bound one never changes here)."""
        if self.certificate is None or self.certificate.fingerprint == recorded:
            return False
        return not secured or not recorded

    @staticmethod
    def _enrol(
        grant: enrolment.Enrolment, request: sessions.RegistrationRequest
    ) -> sessions.Registration:
        instance_id = get_runtime().ensure_registered()
        return enrolment.enrol_and_register(grant, request, instance_id=instance_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.connection_id is None:
            return
        metrics.message_received()
        if text_data is None:
            # Binary frames are relay frames, budgeted by the relay, not the message rate limit.
            await self._relay(bytes_data or b"")
            return
        if not self.bucket.take():
            await self._drop_for_rate_limit()
            return
        self.rate_limited_streak = False
        try:
            await self._confirm()
            message = protocol.parse_client_message(text_data, max_bytes=self.max_frame_bytes)
            reply = await self.handle(message)
        except DatabaseError as exc:
            log.error(
                "worker=%s connection=%s not recorded: %s", self.worker_id, self.connection_id, exc
            )
            reply = protocol.error(
                protocol.Unavailable("registry unavailable; send it again later")
            )
            metrics.protocol_error(protocol.ErrorCode.UNAVAILABLE)
        except protocol.ProtocolError as exc:
            log.info(
                "worker=%s connection=%s %s: %s",
                self.worker_id,
                self.connection_id,
                exc.code,
                exc.message,
            )
            reply = protocol.error(exc)
            metrics.protocol_error(exc.code)
        except Exception:
            # The channel layer away (Redis), a full channel: this frame fails, the connection
            # stays. Escaping here would end the consumer without its disconnect clean-up.
            log.exception(
                "worker=%s connection=%s frame failed", self.worker_id, self.connection_id
            )
            reply = protocol.error(protocol.Unavailable("service busy; send it again later"))
            metrics.protocol_error(protocol.ErrorCode.UNAVAILABLE)
        if reply is not None:
            await self.send(reply)

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
            log.info(
                "worker=%s connection=%s %s: %s",
                self.worker_id,
                self.connection_id,
                refused.code,
                refused.message,
            )
            metrics.protocol_error(refused.code)
            await self.send(protocol.error(refused))

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
            case protocol.ListPeers(tag=tag, request_id=request_id):
                peer_list, truncated = await reach.reachable_peers(self.subject, tag=tag)
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
            case protocol.ConnectRequest():
                return await self.peer_side.request(message)
            case protocol.IntroductionAccept() | protocol.IntroductionReject():
                return await self.peer_side.answer(message)
            case protocol.IceCandidates():
                await self.peer_side.ice_candidates(message)
                return None  # passed on; the peer answers with its own
            case protocol.PathReport():
                return await self.peer_side.path_report(message)
            case protocol.PeerClose():
                return await self.peer_side.close(message)
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
        event = message.get("event")
        if event == introductions.FRAME:
            await self.send(message["frame"])
        elif event == introductions.INTRODUCTION_REQUEST:
            await self.peer_side.requested(message)
        elif event == introductions.INTRODUCED:
            await self.peer_side.introduced(message)
        elif event == introductions.LINK_CLOSED:
            await self.peer_side.link_closed(message)

    async def relayed_to_me(self, frame: bytes) -> None:
        """A relay frame from a peer of this worker (runtime.RELAY)."""
        await self.peer_side.relayed_to_me(frame)

    async def _drop_for_rate_limit(self) -> None:
        now = time.monotonic()
        if now - self.last_drop > FLOOD_MEMORY:
            self.dropped = 0  # a burst long ago does not count towards closing the connection
        self.last_drop = now
        self.dropped += 1
        if self.dropped >= settings.RENDEZVOUS["RATE_LIMIT_CLOSE_AFTER"]:
            log.warning(
                "worker=%s connection=%s closed for flooding", self.worker_id, self.connection_id
            )
            await self.close_with(protocol.CloseCode.RATE_LIMITED)
        elif not self.rate_limited_streak:
            # One error per streak of dropped messages: a flood is not answered with a flood.
            self.rate_limited_streak = True
            metrics.protocol_error(protocol.ErrorCode.RATE_LIMITED)
            await self.send(
                protocol.error(protocol.RateLimited("too many messages; this one was dropped"))
            )

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
