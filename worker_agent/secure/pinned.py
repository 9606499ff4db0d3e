"""aioquic's `QuicConnection` with what the agent changes in it, each through a private part of
aioquic 1.7 (pinned in pyproject.toml; tests/test_quic.py checks each is still there):

- the server asks for the client's certificate (`tls._request_client_certificate`): mutual
  authentication, both sides pinned;
- MAX_STREAM_DATA grows as the reader consumes (`_write_stream_limits`), not by doubling what
  the application was handed: a slow reader keeps memory bounded;
- the certificate the peer proved is `tls._peer_certificate`, compared with the pin once the
  handshake completes, before any data is taken (`pin_check`);
- the loss recovery (`_loss`: its congestion controller `_cc`, `_pto_count`,
  `reschedule_data`) starts afresh when the route under the connection moves, which aioquic
  cannot see (`new_network_path`); its `bytes_in_flight` and smoothed round trip are read;
- what a stream's sender has not had acknowledged is its buffer's bounds (`unacknowledged`);
- PINGs not yet written into a packet are `_ping_pending` (the ping's clock starts when they
  leave);
- a PING is acknowledged at once (`_handle_ping_frame`), not after aioquic's ACK delay of a
  millisecond: `PeerConnection.ping()` measures the path's round trip, not the delay.
"""

from __future__ import annotations

import time
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicReceiveContext,
)
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.recovery import create_congestion_control

from ..errors import IdentityMismatch
from . import identity, pacing

STREAM_WINDOW = 4 * 1024 * 1024  # bytes a peer may send on a stream ahead of the reader
CLOSE_IDENTITY = 0x52560001  # "RV" 1: an application close code, outside the TLS alert range
CRYPTO_ERRORS = (0x100, 0x1FF)  # QUIC's range for TLS alerts (RFC 9000 section 20.1)


class PinnedConnection(QuicConnection):
    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        consumed: dict[int, int],
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        self._consumed = consumed  # stream id -> bytes the application has read
        pacing.install(self._loss, configuration.max_datagram_size)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True  # mutual authentication

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        """MAX_STREAM_DATA as the reader consumes: what it read plus STREAM_WINDOW."""
        if not stream.max_stream_data_local:
            return
        wanted = self._consumed.get(stream.stream_id, 0) + STREAM_WINDOW
        stream.max_stream_data_local = max(stream.max_stream_data_local, wanted)
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def new_network_path(self, algorithm: str, max_datagram_size: int, *, probe: bool) -> None:
        """Congestion control afresh (RFC 9000, 9.4), keeping what is in flight; `probe`: what
        was in flight is likely gone (a move down), so it is sent again at once instead of at
        the probe timeout."""
        recovery = self._loss
        fresh = create_congestion_control(algorithm, max_datagram_size=max_datagram_size)
        fresh.bytes_in_flight = recovery._cc.bytes_in_flight  # still owed their ACKs
        recovery._cc = fresh
        if probe and recovery.bytes_in_flight:
            recovery._pto_count = 0
            recovery.reschedule_data(now=time.monotonic())

    def in_flight(self) -> int:
        return self._loss.bytes_in_flight

    def smoothed_rtt(self) -> float | None:
        """The smoothed round trip (seconds), once there is a sample."""
        return self._loss._rtt_smoothed if self._loss._rtt_initialized else None

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes written to the stream that the peer has not acknowledged (aioquic keeps them
        in the sender's buffer until then); 0 once the stream was reset, since nothing will
        be acknowledged any more."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.sender._reset_error_code is not None:
            return 0
        return stream.sender._buffer_stop - stream.sender._buffer_start

    def pings_pending(self) -> bool:
        """Whether PINGs asked for have not been written into a packet yet."""
        return bool(self._ping_pending)

    def sending_reset(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.sender._reset_error_code is not None

    def _handle_ping_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        """Acknowledge the packet at the next send, which the session makes in this turn of
        its loop: the peer's ping then measures the route, not an ACK delay."""
        super()._handle_ping_frame(context, frame_type, buf)
        self._spaces[context.epoch].ack_at = context.time


def pin_check(
    quic: QuicConnection, expected: str, peer_id: str
) -> tuple[str | None, IdentityMismatch | None]:
    """The fingerprint the peer proved, and why it is refused when it is not the pinned one."""
    peer = quic.tls._peer_certificate
    presented = identity.fingerprint(identity.to_der(peer)) if peer is not None else None
    if presented == expected:
        return presented, None
    reason = (
        f"{peer_id} presented no certificate, not the introduced identity"
        if presented is None
        else f"{peer_id} presented certificate {presented[:16]}…, not the introduced "
        f"identity {expected[:16]}…"
    )
    return presented, IdentityMismatch(reason)


def pin_failure(error_code: int, reason: str, peer_id: str) -> IdentityMismatch | None:
    """Whether a connection's end says the pin failed: the peer refused our identity, or a TLS
    alert during the handshake (our own check, or the peer's check of ours)."""
    if error_code == CLOSE_IDENTITY:
        return IdentityMismatch(f"{peer_id} refused our identity: {reason}")
    if CRYPTO_ERRORS[0] <= error_code <= CRYPTO_ERRORS[1]:
        return IdentityMismatch(
            f"no pinned identity on the connection with {peer_id} (TLS: {reason})"
        )
    return None
