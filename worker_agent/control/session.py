"""One command's connection to the agent, as a handler uses it: events, the final reply, and
noticing when the command goes away (Ctrl-C). For a pipe, the command's standard input and
output travel in frames (`FramedEnd`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from . import protocol


class Session:
    """One command's connection, as a handler uses it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.gone = threading.Event()  # the command went away (or the agent is stopping)
        self.replied = False
        self.framed = False  # a pipe's bytes go in frames from its `connected` event on

    def event(self, message: dict[str, Any]) -> None:
        """An event line; OSError once the command is gone."""
        self.send(protocol.line(message))

    def reply(self, data: bytes) -> None:
        """The final reply (once): a line, or an `R` frame once the session carries frames."""
        with self._send_lock:  # the handler and the stopping agent may both try
            if self.replied:
                return
            self.replied = True
            if self.framed:
                data = protocol.frame(protocol.REPLY, data)
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def watch(self) -> None:
        """Notice when the command goes away (it sends nothing after its request)."""
        threading.Thread(target=self._watch, name="worker-agent-control-watch", daemon=True).start()

    def _watch(self) -> None:
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass
        self.gone.set()

    def read_exactly(self, size: int) -> bytes:
        """Bytes of the command's frames (a pipe); OSError when it went away mid-frame."""
        parts, missing = [], size
        while missing:
            part = self.sock.recv(min(missing, 1 << 20))
            if not part:
                raise ConnectionResetError("the command went away")
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)

    def still_there(self) -> bool:
        """Whether the command is still connected, without reading what it sent."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False


class FramedEnd:
    """The command's standard input and output, in frames over its connection: the local end
    of a pipe (`peerapi.splice.End`)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        session.framed = True

    def read(self, size: int) -> bytes:
        kind, length = protocol.FRAME.unpack(self.session.read_exactly(protocol.FRAME.size))
        if length > protocol.MAX_FRAME:
            raise ConnectionResetError(f"a frame of {length} bytes from the command")
        payload = self.session.read_exactly(length) if length else b""
        if kind == protocol.END:
            return b""
        if kind != protocol.DATA or not payload:
            raise ConnectionResetError(f"an unexpected frame {kind!r} from the command")
        return payload

    def write(self, data: bytes) -> None:
        self.session.send(protocol.frame(protocol.DATA, data))

    def end_write(self) -> None:
        with contextlib.suppress(OSError):
            self.session.send(protocol.frame(protocol.END))

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.session.sock.shutdown(socket.SHUT_RDWR)
