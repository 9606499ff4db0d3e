"""The command line's side of the control socket: one connection per command, its events as
they come, its final reply, and for a pipe the frames. Standard library only, and nothing of
the agent's own: a command starts in a blink and never becomes a second agent.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import protocol
from .protocol import ControlError


class NoAgent(ControlError):
    """Nothing serves the control socket: no agent runs (for this user, at this path)."""

    def __init__(self, message: str) -> None:
        super().__init__("NO_AGENT", message)


class AgentGone(ControlError):
    """The agent's side of the connection ended before its final reply: it stopped or
    restarted during the command."""

    def __init__(self, message: str) -> None:
        super().__init__("AGENT_GONE", message)


class Exchange:
    """One request and what the agent answers to it."""

    def __init__(
        self, path: Path, op: str, arguments: dict[str, Any] | None = None, **more: Any
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise NoAgent(
                f"no agent is running: nothing serves {path} (start one with `rendezvous-worker`,"
                " or point RENDEZVOUS_CONTROL_SOCKET at its socket)"
            ) from None
        except PermissionError:
            self.sock.close()
            raise NoAgent(f"{path}: permission denied (the agent runs as another user)") from None
        self.reader = self.sock.makefile("rb")
        self.final: dict[str, Any] | None = None
        self.sock.sendall(protocol.request(op, **(arguments or {}), **more))

    def events(self) -> Iterator[dict[str, Any]]:
        """Each event until the final reply (kept in `final`); AgentGone if none comes."""
        while True:
            try:
                line = self.reader.readline(protocol.MAX_LINE)
            except OSError as exc:
                raise self._gone(exc) from None
            if not line:
                raise self._gone(None)
            message = json.loads(line)
            if "event" in message:
                yield message
                continue
            self.final = message
            return

    def result(self) -> dict[str, Any]:
        """The final reply once every event was read: ControlError with its code if not ok."""
        for _ in self.events():
            pass
        return self.checked()

    def checked(self) -> dict[str, Any]:
        final = self.final or {}
        if not final.get("ok"):
            error = ControlError(str(final.get("code")), str(final.get("error")))
            error.reply = final  # type: ignore[attr-defined]
            raise error
        return final

    # ---- frames (a pipe) -------------------------------------------------------------------

    def send_frame(self, kind: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(protocol.frame(kind, payload))

    def read_frame(self) -> tuple[bytes, bytes]:
        head = self.reader.read(protocol.FRAME.size)
        if len(head) < protocol.FRAME.size:
            raise self._gone(None)
        kind, length = protocol.FRAME.unpack(head)
        payload = self.reader.read(length) if length else b""
        if len(payload) < length:
            raise self._gone(None)
        return kind, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        self.sock.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gone(self, exc: OSError | None) -> AgentGone:
        why = f" ({exc})" if exc else ""
        return AgentGone(
            f"the agent stopped during the command{why}: its connection at {self.path} closed"
            " before it answered"
        )
