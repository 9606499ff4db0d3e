"""Pipes, as dumbpipe has them: a stream between one command's standard input and output on
each side. The answering side takes a pipe only while a `pipe --accept` waits there (for this
peer, or for any); one pipe per waiting command.
"""

from __future__ import annotations

import threading

from .errors import NoListener
from .router import Request


class PipeListener:
    """One `pipe --accept`: the pipe a peer opens to it, once."""

    def __init__(self, from_peer: str | None) -> None:
        self.from_peer = from_peer
        self._arrived = threading.Condition()
        self.request: Request | None = None
        self._done = threading.Event()

    def wait(self, timeout: float | None) -> Request | None:
        with self._arrived:
            self._arrived.wait_for(lambda: self.request is not None, timeout)
            return self.request

    def finished(self) -> None:
        """The waiting command is done with the pipe (or gave up)."""
        self._done.set()

    def _hand(self, request: Request) -> None:
        with self._arrived:
            self.request = request
            self._arrived.notify_all()
        self._done.wait()


class Pipes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[PipeListener] = []

    def listen(self, from_peer: str | None) -> PipeListener:
        listener = PipeListener(from_peer)
        with self._lock:
            self._waiting.append(listener)
        return listener

    def withdraw(self, listener: PipeListener) -> None:
        with self._lock:
            if listener in self._waiting:
                self._waiting.remove(listener)
        listener.finished()

    def serve(self, request: Request) -> None:
        """A peer opens a pipe: the first command waiting for it takes it (this thread waits
        until that command is done with it)."""
        with self._lock:
            listener = next(
                (w for w in self._waiting if w.from_peer in (None, request.peer_id)), None
            )
            if listener is not None:
                self._waiting.remove(listener)
        if listener is None:
            raise NoListener("no `rendezvous-worker pipe --accept` is waiting there")
        listener._hand(request)
