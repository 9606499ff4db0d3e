"""The service relay's binary frames (docs/protocol.md, "The service relay").

A relay frame is one binary WebSocket frame:
  byte 0        RELAY_DATA (1)
  bytes 1-16    the introduction id, as 16 raw bytes
  then          one or more datagrams, each a 2-byte big-endian length and that many bytes
The service checks the header and the packing and forwards the frame unchanged to the peer of
that introduction, whose agent unpacks it. Small datagrams ride together in one frame.
"""

from __future__ import annotations

from registry.core.protocol.errors import ErrorCode, RelayError

RELAY_DATA = 1
RELAY_HEADER_BYTES = 17
RELAY_LENGTH_BYTES = 2
# Frames up to this size are relayed; daphne's transport limit (manage.py serve) sits above it,
# so a larger frame still gets RELAY_FRAME_TOO_LARGE rather than a dropped connection.
RELAY_MAX_FRAME_BYTES = 65536
MAX_DATAGRAM_BYTES = RELAY_MAX_FRAME_BYTES - RELAY_HEADER_BYTES - RELAY_LENGTH_BYTES


def relay_frame_id(frame: bytes) -> str:
    """The introduction id in the header of a relay frame already checked (as it is relayed)."""
    return frame[1:RELAY_HEADER_BYTES].hex()


def relay_frame_introduction(frame: bytes, *, max_bytes: int = RELAY_MAX_FRAME_BYTES) -> str:
    """The introduction a relay frame is for, once its header and packing check out; or the
    RelayError that says what is wrong. The datagrams themselves are never looked into."""
    size = len(frame)
    introduction_id = relay_frame_id(frame) if size >= RELAY_HEADER_BYTES else None
    if size > max_bytes:
        raise RelayError(
            f"relay frames are limited to {max_bytes} bytes",
            code=ErrorCode.RELAY_FRAME_TOO_LARGE,
            introduction_id=introduction_id,
        )
    if introduction_id is None or frame[0] != RELAY_DATA:
        raise RelayError(
            "a relay frame starts with byte 1 and a 16-byte introduction id",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    offset = RELAY_HEADER_BYTES
    if offset == size:
        raise RelayError(
            "a relay frame carries at least one datagram",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    while offset < size:
        if offset + RELAY_LENGTH_BYTES > size:
            break
        offset += RELAY_LENGTH_BYTES + int.from_bytes(frame[offset : offset + RELAY_LENGTH_BYTES])
    if offset != size:
        raise RelayError(
            "the datagram lengths in a relay frame do not add up to its size",
            code=ErrorCode.RELAY_MALFORMED,
            introduction_id=introduction_id,
        )
    return introduction_id
