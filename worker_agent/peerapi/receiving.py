"""Receiving files: nothing is written unless a `receive` command waits for them (its folder,
one transfer) or the agent was started with an inbox (`RENDEZVOUS_INBOX`: every transfer).

Each file is written to its partial file (`files.PARTIAL_DIR`) and moves into place only once
its SHA-256 matched the sender's; without `--overwrite` it never replaces a file (a hard link,
which fails when the name is taken). A full disk, or a transfer cut short, keeps the partial
file for the next attempt and says so; a damaged one is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeerError
from . import header
from .errors import (
    BadRequest,
    ChecksumMismatch,
    Exists,
    FileChanged,
    Interrupted,
    NoSpace,
    NotReceiving,
    PeerApiError,
    WriteFailed,
)
from .files import ABORT, CHUNK, END, LENGTH, PARTIAL_DIR, Offered, check_offer, digest_of, human
from .files import inside as path_inside
from .router import Request

logger = logging.getLogger("worker_agent")

Event = Callable[[dict[str, Any]], None]
PROGRESS_EVERY = 0.2  # seconds between progress events


@dataclass
class Inbox:
    """A folder files are written to, and who may send there."""

    root: Path
    from_peer: str | None = None
    overwrite: bool = False
    event: Event | None = None  # what the `receive` command shows
    lasting: bool = False  # the agent's own inbox: every transfer, not one
    outcome: dict[str, Any] | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def tell(self, message: dict[str, Any]) -> None:
        if self.event is not None:
            with contextlib.suppress(Exception):  # the command went away: the transfer goes on
                self.event(message)


class Inboxes:
    def __init__(self, default: Path | None = None) -> None:
        self.default = None if default is None else Inbox(default, lasting=True)
        self._lock = threading.Lock()
        self._waiting: list[Inbox] = []

    def open(self, inbox: Inbox) -> None:
        with self._lock:
            self._waiting.append(inbox)

    def close(self, inbox: Inbox) -> None:
        with self._lock:
            if inbox in self._waiting:
                self._waiting.remove(inbox)

    def claim(self, peer_id: str) -> Inbox | None:
        """The newest waiting `receive` for this peer (taken: it receives one transfer), else
        the agent's own inbox, else None."""
        with self._lock:
            for inbox in reversed(self._waiting):
                if inbox.from_peer in (None, peer_id):
                    self._waiting.remove(inbox)
                    return inbox
        return self.default

    def listed(self) -> list[dict[str, Any]]:
        with self._lock:
            waiting = [
                {"dir": str(i.root), "from": i.from_peer, "overwrite": i.overwrite}
                for i in self._waiting
            ]
        if self.default is not None:
            waiting.append({"dir": str(self.default.root), "from": None, "inbox": True})
        return waiting


def serve_files(request: Request, inboxes: Inboxes) -> None:
    inbox = inboxes.claim(request.peer_id)
    if inbox is None:
        raise NotReceiving(
            "not receiving files: its operator runs `rendezvous-worker receive` there (or "
            "starts the agent with RENDEZVOUS_INBOX)"
        )
    transfer = _Transfer(request, inbox)
    try:
        transfer.run()
    except PeerApiError as exc:
        transfer.outcome.setdefault("code", exc.code)
        transfer.outcome.setdefault("error", str(exc))
        raise
    except Exception as exc:
        transfer.outcome.setdefault("code", "INTERRUPTED")
        transfer.outcome.setdefault("error", str(exc))
        raise
    finally:
        transfer.outcome["ok"] = "error" not in transfer.outcome
        inbox.outcome = transfer.outcome
        inbox.finished.set()


@dataclass
class _Plan:
    offered: Offered
    target: Path
    partial: Path
    action: str  # write, resume or exists
    offset: int = 0
    digest: Any = None  # the hashlib object of what the partial file holds


class _Transfer:
    def __init__(self, request: Request, inbox: Inbox) -> None:
        self.request = request
        self.stream = request.stream
        self.reader = _Reader(request.stream)
        self.inbox = inbox
        self.peer_id = request.peer_id
        # bytes: done so far, counting what partial files held and files the sender skipped
        self.outcome: dict[str, Any] = {"peer": self.peer_id, "files": [], "bytes": 0}
        self._told = 0.0

    def run(self) -> None:
        root = self.inbox.root
        if not root.is_dir():
            raise NotReceiving(f"{root} is not a folder")
        offered, dirs = check_offer(self.request.ask.get("files"), self.request.ask.get("dirs"))
        plans = [self._plan(root, item) for item in offered]
        folders = [path_inside(root, d) for d in dirs]
        self.request.accept(
            plan=[{"action": p.action, "offset": p.offset, "sha256": _hex(p.digest)} for p in plans]
        )
        total = sum(p.offered.size for p in plans)
        self.outcome["bytes"] = sum(p.offered.size for p in plans if p.action == "exists")
        self.inbox.tell({"event": "receiving", "peer": self.peer_id, "files": len(plans),
                         "bytes": total})  # fmt: skip
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        while (message := self.reader.message()) is not None:
            if "cancel" in message:
                self.outcome["cancelled"] = str(message["cancel"])
                break
            index, start = message.get("file"), message.get("start")
            if not isinstance(index, int) or not 0 <= index < len(plans):
                raise BadRequest(f"no file {index!r} in this transfer")
            result = self._receive(index, plans[index], start)
            if result is not None:
                header.write(self.stream, result)
        self.stream.shutdown_write()
        _tidy(root / PARTIAL_DIR)

    def _plan(self, root: Path, offered: Offered) -> _Plan:
        target = path_inside(root, offered.name)
        partial = path_inside(root, f"{PARTIAL_DIR}/{offered.name}")
        plan = _Plan(offered, target, partial, "write")
        if target.exists():
            if not target.is_file():
                raise Exists(f"{offered.name} is a folder there")
            if not self.inbox.overwrite:
                plan.action, plan.digest = "exists", digest_of(target)
                return plan
        if partial.is_file() and 0 < partial.stat().st_size <= offered.size:
            plan.action, plan.offset = "resume", partial.stat().st_size
            plan.digest = digest_of(partial, plan.offset)
        return plan

    def _receive(self, index: int, plan: _Plan, start: Any) -> dict[str, Any] | None:
        """One file's bytes, to its partial file; its result (None when one was sent already)."""
        name, size = plan.offered.name, plan.offered.size
        if start not in (0, plan.offset) or plan.action == "exists":
            raise BadRequest(f"{name}: cannot start at {start!r}")
        plan.partial.parent.mkdir(parents=True, exist_ok=True)
        digest = plan.digest.copy() if start and plan.digest is not None else hashlib.sha256()
        self.inbox.tell({"event": "file", "name": name, "size": size, "start": start})
        self.outcome["bytes"] += start  # what the partial file held counts as done
        copy = _Copy(index, name, size, start, digest)
        fd = os.open(plan.partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.ftruncate(fd, start)
            os.lseek(fd, start, os.SEEK_SET)
            self._copy(fd, copy)
            closing = self.reader.message() or {}
        except (PeerError, TimeoutError) as exc:
            self._record(copy, Interrupted(f"{name}: the transfer broke off: {exc}"))
            raise
        finally:
            os.close(fd)
        if copy.error is not None:
            return self._record(copy, copy.error)
        if copy.aborted:
            reason = f"the sender stopped: {closing.get('reason')}"
            return self._record(copy, FileChanged(reason, code=str(closing.get("code"))))
        if copy.written != size or digest.hexdigest() != closing.get("sha256"):
            plan.partial.unlink(missing_ok=True)
            copy.written = 0
            damaged = f"{name} arrived damaged (SHA-256 {digest.hexdigest()[:16]}…): deleted"
            return self._record(copy, ChecksumMismatch(damaged))
        try:
            self._place(plan)
        except PeerApiError as exc:
            return self._record(copy, exc)
        self.outcome["files"].append({"name": name, "ok": True, "bytes": size, "start": start})
        self.inbox.tell({"event": "done", "name": name, "size": size, "start": start})
        logger.info("received %s (%s) from %s", plan.target, human(size), self.peer_id)
        return {"file": index, "ok": True, "sha256": digest.hexdigest()}

    def _copy(self, fd: int, copy: _Copy) -> None:
        """Chunks to the file until the sender's end or abort; after a write error the rest is
        read and dropped (the sender stops once it hears of it, at once)."""
        while True:
            length = LENGTH.unpack(self.reader.exactly(LENGTH.size))[0]
            if length in (END, ABORT):
                copy.aborted = length == ABORT
                return
            if length > 4 * CHUNK:
                raise BadRequest(f"{copy.name}: a chunk of {length} bytes")
            for data in self.reader.chunks(length):
                if copy.error is None:
                    done, failure = _write(fd, data)
                    copy.digest.update(data[:done])
                    copy.written += done
                    if failure is not None:
                        copy.error = self._failed(copy, failure)
                        header.write(self.stream, _result(copy.index, copy.error, copy.written))
                        copy.answered = True
                self._progress(copy.name, len(data))

    def _failed(self, copy: _Copy, error: OSError) -> PeerApiError:
        where = f"after {human(copy.written)} of {human(copy.size)}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(
                f"the disk is full {where}; the partial file is kept: free space and send "
                "again to resume"
            )
        return WriteFailed(f"cannot write {where}: {error.strerror or error}")

    def _record(self, copy: _Copy, error: PeerApiError) -> dict[str, Any] | None:
        name, kept = copy.name, copy.written
        self.outcome["files"].append(
            {"name": name, "ok": False, "code": error.code, "error": str(error), "kept": kept}
        )
        self.outcome.setdefault("code", error.code)
        self.outcome.setdefault("error", str(error))
        self.inbox.tell(
            {"event": "failed", "name": name, "code": error.code, "error": str(error),
             "kept": kept}
        )  # fmt: skip
        logger.warning("receiving %s from %s: %s (%s)", name, self.peer_id, error, error.code)
        return None if copy.answered else _result(copy.index, error, kept)

    def _place(self, plan: _Plan) -> None:
        """The checked file into place: replacing one only with `--overwrite`."""
        plan.target.parent.mkdir(parents=True, exist_ok=True)
        if self.inbox.overwrite:
            os.replace(plan.partial, plan.target)
            return
        try:
            os.link(plan.partial, plan.target)
        except FileExistsError:
            raise Exists(
                f"{plan.offered.name} appeared on the receiver meanwhile; the partial file is kept"
            ) from None
        except OSError:  # no hard links on this file system
            if plan.target.exists():
                raise Exists(f"{plan.offered.name} exists on the receiver") from None
            os.rename(plan.partial, plan.target)
            return
        plan.partial.unlink()

    def _progress(self, name: str, count: int) -> None:
        self.outcome["bytes"] += count
        now = time.monotonic()
        if now - self._told >= PROGRESS_EVERY:
            self._told = now
            self.inbox.tell({"event": "progress", "name": name, "bytes": self.outcome["bytes"]})


@dataclass
class _Copy:
    """One file being received: how far it got, and how it ended."""

    index: int
    name: str
    size: int
    written: int
    digest: Any
    error: PeerApiError | None = None
    aborted: bool = False
    answered: bool = False  # its result already went to the sender


def _tidy(partials: Path) -> None:
    """Remove the partial-file folders that hold nothing any more."""
    if not partials.is_dir():
        return
    for top, _, _ in sorted(os.walk(partials), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(top)  # only empty ones go


def _result(index: int, error: PeerApiError, kept: int) -> dict[str, Any]:
    return {"file": index, "ok": False, "code": error.code, "reason": str(error), "kept": kept}


def _write(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of `data`; how much was written, and the error that stopped it."""
    view, done = memoryview(data), 0
    try:
        while done < len(view):
            done += os.write(fd, view[done:])
    except OSError as exc:
        return done, exc
    return done, None


class _Reader:
    """The sender's side of the stream, read a MiB at a time and cut into frames here: a small
    read per frame header would cost the stream's buffer a move of everything behind it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._view = memoryview(b"")

    def chunks(self, length: int) -> Iterator[memoryview]:
        left = length
        while left:
            if not self._view:
                data = self.stream.recv(CHUNK, timeout=None)
                if not data:
                    raise Interrupted(f"the stream ended {left} bytes into a chunk")
                self._view = memoryview(data)
            piece, self._view = self._view[:left], self._view[left:]
            left -= len(piece)
            yield piece

    def exactly(self, size: int) -> bytes:
        return b"".join(bytes(piece) for piece in self.chunks(size))

    def message(self) -> dict[str, Any] | None:
        """The next message (header.py's framing); None when the stream ended cleanly."""
        if not self._view:
            data = self.stream.recv(CHUNK, timeout=None)
            if not data:
                return None
            self._view = memoryview(data)
        length = LENGTH.unpack(self.exactly(LENGTH.size))[0]
        if length > header.MAX_MESSAGE:
            raise BadRequest(f"a message of {length} bytes")
        try:
            message = json.loads(self.exactly(length))
        except ValueError:
            raise BadRequest("a message that is not JSON") from None
        if not isinstance(message, dict):
            raise BadRequest("a message that is not a JSON object")
        return message


def _hex(digest: Any) -> str | None:
    return None if digest is None else digest.hexdigest()
