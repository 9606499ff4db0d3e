"""The agent's side of the control socket: one thread per command connection, each request
handed to its handler (`handlers.py`), whatever goes wrong turned into the one final reply here.

Only the agent's own user (or root) may talk to it: the socket is 0600, and each connection's
peer credentials (SO_PEERCRED) are checked again. When the agent stops, every command still
connected is told (`AGENT_STOPPING`) before its connection closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PeerError
from ..peerapi.errors import code_of
from . import handlers, protocol
from .session import Session
from .socketfile import ControlSocket

if TYPE_CHECKING:
    from ..agent import WorkerAgent

logger = logging.getLogger("worker_agent")

REQUEST_TIMEOUT = 10.0  # a connection says what it wants within this


class ControlServer:
    def __init__(self, agent: WorkerAgent, path: Path) -> None:
        self.agent = agent
        self.socket_file = ControlSocket(path)
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def path(self) -> Path:
        return self.socket_file.path

    def start(self) -> None:
        """Serve (SocketFileError when the socket cannot be this agent's)."""
        listener = self.socket_file.open()
        threading.Thread(
            target=self._accept, args=(listener,), name="worker-agent-control", daemon=True
        ).start()
        logger.info("worker=%s: commands on %s", self.agent.worker_id, self.path)

    def stop(self) -> None:
        self._stopping.set()
        listener = self.socket_file.sock
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            # The reply first: once `gone` is set, the handler returns and its socket closes.
            session.reply(protocol.failed("AGENT_STOPPING", "the agent is stopping"))
            session.gone.set()
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
        self.socket_file.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(sock,), name="worker-agent-command", daemon=True
            ).start()

    def _serve(self, sock: socket.socket) -> None:
        session = Session(sock)
        with self._lock:
            self._sessions.add(session)
        try:
            self._handle(session)
        finally:
            with self._lock:
                self._sessions.discard(session)
            sock.close()

    def _handle(self, session: Session) -> None:
        op = "request"
        try:
            _check_peer(session.sock)
            request = protocol.parse_request(_read_line(session.sock))
            op = request["op"]
            handlers.HANDLERS[op](self.agent, session, request)
        except protocol.ControlError as exc:
            self._refused(op, exc.code, exc)
            session.reply(protocol.failed(exc.code, str(exc)))
        except (PeerError, TimeoutError) as exc:
            self._refused(op, code_of(exc), exc)
            session.reply(protocol.failed(code_of(exc), str(exc) or type(exc).__name__))
        except ValueError as exc:  # arguments the agent cannot use
            session.reply(protocol.failed("BAD_REQUEST", str(exc)))
        except OSError as exc:
            if not session.gone.is_set():
                logger.info("worker=%s: a command connection broke: %s", self.agent.worker_id, exc)
                session.reply(protocol.failed("LOCAL_ERROR", str(exc)))
        except Exception as exc:
            logger.exception("worker=%s: a command failed", self.agent.worker_id)
            session.reply(protocol.failed("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"))

    def _refused(self, op: str, code: str, exc: BaseException) -> None:
        logger.warning("worker=%s: command %s failed: %s (%s)", self.agent.worker_id, op, exc, code)


def _read_line(sock: socket.socket) -> bytes:
    sock.settimeout(REQUEST_TIMEOUT)
    data = b""
    try:
        while b"\n" not in data:
            part = sock.recv(65536)
            if not part:
                raise protocol.ControlError("BAD_REQUEST", "the connection ended before a request")
            data += part
            if len(data) > protocol.MAX_LINE:
                raise protocol.ControlError("BAD_REQUEST", "a request longer than 1 MiB")
    except TimeoutError:
        raise protocol.ControlError("BAD_REQUEST", "no request within 10 s") from None
    finally:
        sock.settimeout(None)
    first, _, rest = data.partition(b"\n")
    if rest:
        raise protocol.ControlError("BAD_REQUEST", "one request per connection")
    return first


def _check_peer(sock: socket.socket) -> None:
    """The command runs as the agent's user or as root (the socket's mode says so already)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    if uid not in (os.getuid(), 0):
        raise protocol.ControlError("FORBIDDEN", f"user {uid} may not command this agent")
