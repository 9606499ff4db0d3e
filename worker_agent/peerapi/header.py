"""The start of every peer-API stream, and the messages on it.

The opener writes `MAGIC`, a version byte and one message (the request: `{"kind": "forward",
...}`); the answering agent replies with one message (`{"ok": true, ...}` or `{"ok": false,
"code": ..., "reason": ...}`), and after an acceptance the stream carries what the kind says. A
message is a 4-byte big-endian length and that many bytes of UTF-8 JSON, at most
MAX_MESSAGE (a file offer lists every file).

`MAGIC` starts with 0xFF, a byte UTF-8 text never holds, so a stream of the host program's
(text, or most binary protocols) is told apart by its first byte and handed on at once; only a
stream whose first bytes are a prefix of `MAGIC` is waited for, at most PEEK_TIMEOUT.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from ..connection import PeerStream
from ..errors import PeerClosed
from .errors import BadRequest, Interrupted, NotServed, PeerApiError, UnsupportedVersion, from_reply

MAGIC = b"\xffRVZ"
VERSION = 1
MAX_MESSAGE = 16 * 1024 * 1024
PEEK_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0  # a reply can wait on the peer's disk (hashing a partial file, say)
_LENGTH = struct.Struct(">I")


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise BadRequest(f"a message of {len(body)} bytes is over the limit of {MAX_MESSAGE}")
    return _LENGTH.pack(len(body)) + body


def request_bytes(request: dict[str, Any]) -> bytes:
    """What the opener of a stream writes first."""
    return MAGIC + bytes([VERSION]) + encode(request)


def write(stream: PeerStream, message: dict[str, Any], *, timeout: float | None = 30.0) -> None:
    stream.sendall(encode(message), timeout=timeout)


def read(stream: PeerStream, *, timeout: float | None = REPLY_TIMEOUT) -> dict[str, Any] | None:
    """The next message; None when the stream ended cleanly where a message would start."""
    head = _read_exactly(stream, _LENGTH.size, timeout, eof_ok=True)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_MESSAGE:
        raise BadRequest(f"a message of {length} bytes is over the limit of {MAX_MESSAGE}")
    body = _read_exactly(stream, length, timeout, eof_ok=False)
    assert body is not None
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"a message that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadRequest("a message that is not a JSON object")
    return message


def _read_exactly(
    stream: PeerStream, size: int, timeout: float | None, *, eof_ok: bool
) -> bytes | None:
    parts: list[bytes] = []
    missing = size
    while missing:
        part = stream.recv(min(missing, 1 << 20), timeout=timeout)
        if not part:
            if eof_ok and missing == size:
                return None
            raise Interrupted(f"the stream ended {missing} bytes into a message")
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def is_peer_api(stream: PeerStream, *, timeout: float = PEEK_TIMEOUT) -> bool:
    """Whether the stream starts with MAGIC: then MAGIC is consumed; otherwise whatever was
    read is put back, for the host program. False too when the first bytes are a prefix of
    MAGIC and nothing more came within `timeout`."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(MAGIC):
        left = deadline - time.monotonic()
        try:
            part = stream.recv(len(MAGIC) - len(got), timeout=max(0.0, left)) if left > 0 else b""
        except TimeoutError:
            part = b""
        got += part
        if not part or not MAGIC.startswith(got):
            stream.unread(got)
            return False
    return True


def read_request(stream: PeerStream) -> dict[str, Any]:
    """The request after MAGIC: its version checked, its kind a string."""
    version = _read_exactly(stream, 1, PEEK_TIMEOUT, eof_ok=False)
    assert version is not None
    if version[0] != VERSION:
        raise UnsupportedVersion(
            f"peer API version {version[0]}; this agent speaks version {VERSION}"
        )
    request = read(stream, timeout=PEEK_TIMEOUT)
    if request is None or not isinstance(request.get("kind"), str):
        raise BadRequest("a request without a kind")
    return request


def read_reply(stream: PeerStream, peer_id: str, *, timeout: float = REPLY_TIMEOUT) -> dict:
    """The answer to a request: the acceptance's fields, or the refusal raised as its kind.
    A peer that answers anything else (its host program took the stream) does not serve the
    peer API."""
    try:
        reply = read(stream, timeout=timeout)
    except TimeoutError:
        raise NotServed(f"{peer_id} did not answer within {timeout:g}s") from None
    except (BadRequest, Interrupted, PeerClosed) as exc:
        raise NotServed(
            f"{peer_id} does not serve the peer API (its program takes the connections "
            f"itself?): {exc}"
        ) from None
    if reply is None or not isinstance(reply.get("ok"), bool):
        raise NotServed(f"{peer_id} does not serve the peer API (its program answered)")
    if not reply["ok"]:
        raise from_reply(reply, peer_id)
    return reply


def refusal(exc: PeerApiError) -> dict[str, Any]:
    """The reply that refuses, from the exception that says why (the one place this is made)."""
    return {"ok": False, "code": exc.code, "reason": str(exc)}
