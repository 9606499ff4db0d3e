"""What goes over the control socket, version 1.

One request per connection, one JSON line: `{"v": 1, "op": "status", ...}`. The agent answers
with JSON lines: any number of events (`{"event": "pong", ...}`) and one final reply, `{"ok":
true, ...}` or `{"ok": false, "code": "...", "error": "..."}`, after which it closes. A request
that holds something open (a forward, an exposure, a `receive`) lasts as long as its connection:
the command's end (Ctrl-C) withdraws it.

A pipe needs bytes: after its `connected` event both sides switch to frames, a type byte and a
4-byte big-endian length: `D` data, `E` the end of that side's data, and from the agent last
`R`, the final reply as JSON.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
MAX_LINE = 1024 * 1024
OPS = frozenset(
    {
        "status",
        "peers",
        "netcheck",
        "ping",
        "forward",
        "expose",
        "pipe",
        "pipe_accept",
        "send",
        "receive",
    }
)
FRAME = struct.Struct(">cI")
DATA, END, REPLY = b"D", b"E", b"R"
MAX_FRAME = 4 * 1024 * 1024


class ControlError(Exception):
    """A request the agent refuses or failed, with its code (the command line's exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(op: str, **arguments: Any) -> bytes:
    return line({"v": VERSION, "op": op, **arguments})


def parse_request(text: bytes) -> dict[str, Any]:
    """The request, its version and operation checked (ControlError otherwise)."""
    try:
        message = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ControlError("BAD_REQUEST", "a request is one JSON object on one line") from None
    if not isinstance(message, dict):
        raise ControlError("BAD_REQUEST", "a request is one JSON object on one line")
    if message.get("v") != VERSION:
        raise ControlError(
            "UNSUPPORTED_VERSION",
            f"control protocol version {message.get('v')!r}; this agent speaks {VERSION} "
            "(the command line and the agent are different versions)",
        )
    if message.get("op") not in OPS:
        raise ControlError("BAD_REQUEST", f"unknown operation {message.get('op')!r}")
    return message


def ok(**fields: Any) -> bytes:
    return line({"ok": True, **fields})


def failed(code: str, message: str, **fields: Any) -> bytes:
    return line({"ok": False, "code": code, "error": message, **fields})


def event(name: str, **fields: Any) -> bytes:
    return line({"event": name, **fields})


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload
