"""Bytes both ways between a local end (a TCP connection, a command's pipe) and a peer stream,
until both directions have ended: each side's end of input becomes the other's (half-close),
and a side that breaks (a reset, a connection refused mid-way, the peer gone) breaks the other
at once, so neither waits for bytes that will never come.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from ..connection import PeerStream
from ..errors import PeerError

CHUNK = 1024 * 1024  # as a program on the API writes; each write is a hop to the peer loop
RESET_LOCAL_FAILED = 0x5257  # the stream code when the local end broke


class End(Protocol):
    def read(self, size: int) -> bytes: ...  # b"" once the local side has no more to send

    def write(self, data: bytes) -> None: ...

    def end_write(self) -> None: ...  # no more bytes for the local side (half-close)

    def abort(self) -> None: ...  # both ways at once, from any thread


class SocketEnd:
    """A connected socket (TCP or Unix): shutdown for half-close, RST for an abort."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        return self.sock.recv(size)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def end_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv

    def close(self) -> None:
        self.sock.close()


@dataclass
class Spliced:
    sent: int = 0  # bytes from the local end to the peer
    received: int = 0  # bytes from the peer to the local end
    error: str | None = None  # what broke the exchange, if something did


def splice(end: End, stream: PeerStream) -> Spliced:
    """Copy both ways until both directions ended (blocks; one direction runs in a thread of
    its own)."""
    result = Spliced()
    up = threading.Thread(target=_upstream, args=(end, stream, result), daemon=True)
    up.start()
    _downstream(end, stream, result)
    up.join()
    return result


def _upstream(end: End, stream: PeerStream, result: Spliced) -> None:
    try:
        while data := end.read(CHUNK):
            stream.sendall(data, timeout=None)
            result.sent += len(data)
        stream.shutdown_write(timeout=None)
    except OSError as exc:
        result.error = result.error or f"the local side broke: {exc}"
        stream.reset(RESET_LOCAL_FAILED)
    except PeerError as exc:
        result.error = result.error or f"the peer's side broke: {exc}"
        end.abort()


def _downstream(end: End, stream: PeerStream, result: Spliced) -> None:
    try:
        while data := stream.recv(CHUNK, timeout=None):
            end.write(data)
            result.received += len(data)
        end.end_write()
    except OSError as exc:
        result.error = result.error or f"the local side broke: {exc}"
        stream.reset(RESET_LOCAL_FAILED)
        end.abort()
    except PeerError as exc:
        result.error = result.error or f"the peer's side broke: {exc}"
        end.abort()
