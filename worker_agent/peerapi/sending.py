"""Sending files and folders to a peer (`rendezvous-worker send`): offered in one go, checked
end to end with SHA-256, resumed where an earlier attempt stopped.

Before a byte moves, the receiver's plan is settled: a file it already has with the same
contents is skipped, one with other contents stops the transfer (`EXISTS`, nothing sent) unless
the receiver overwrites; a partial file whose contents match this file's start is resumed. A
file that vanishes or shrinks while it is sent is aborted (`FILE_CHANGED`) and the others still
go; a receiver's full disk stops the transfer (`NO_SPACE`, its partial file kept).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..connection import PeerStream
from ..errors import PeerError
from . import header
from .errors import BadRequest, Exists, FileChanged, Interrupted, PeerApiError
from .files import ABORT, CHUNK, END, LENGTH, Local, collect, digest_of, human
from .pool import Pool

logger = logging.getLogger("worker_agent")

Event = Callable[[dict[str, Any]], None]
PROGRESS_EVERY = 0.2
RESULT_TIMEOUT = 120.0  # after the last byte: the receiver checks and moves the last file
PLAN_TIMEOUT = 900.0  # the receiver hashes the files and partial files it has before its plan
STOPPING = ("NO_SPACE", "WRITE_FAILED")  # receiver failures after which no file can follow


@dataclass
class SendOutcome:
    peer_id: str
    files: list[dict[str, Any]] = field(default_factory=list)  # one entry per file
    total: int = 0  # bytes of every file offered
    sent: int = 0  # bytes that went over the connection this time
    skipped: list[str] = field(default_factory=list)  # paths that are not files or folders
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [f for f in self.files if not f["ok"]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer_id,
            "files": self.files,
            "total": self.total,
            "sent": self.sent,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


class _Results:
    """The receiver's answers, read while the bytes go out."""

    def __init__(self, stream: PeerStream) -> None:
        self.stream = stream
        self.by_file: dict[int, dict[str, Any]] = {}
        self.stop: str | None = None  # why no more files should be sent
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="worker-agent-send-results", daemon=True).start()

    def _read(self) -> None:
        try:
            while (message := header.read(self.stream, timeout=None)) is not None:
                index = message.get("file")
                if not isinstance(index, int):
                    raise BadRequest("a result without a file number")
                with self._changed:
                    self.by_file[index] = message
                    if not message.get("ok") and message.get("code") in STOPPING:
                        self.stop = str(message.get("reason"))
                    self._changed.notify_all()
        except (PeerError, TimeoutError) as exc:
            self.error = exc
        finally:
            self.ended.set()
            with self._changed:
                self._changed.notify_all()

    def failed(self, index: int) -> bool:
        result = self.by_file.get(index)
        return result is not None and not result.get("ok")

    def wait(self, indexes: list[int], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: all(i in self.by_file for i in indexes) or self.ended.is_set(), timeout
            )


def send_files(
    pool: Pool,
    peer_id: str,
    paths: list[str],
    event: Event,
    *,
    cancelled: threading.Event | None = None,
) -> SendOutcome:
    """Offer `paths` (files and folders) to `peer_id` and send what its plan asks for. The
    refusal (the peer's, or EXISTS) is raised; per-file failures are in the outcome."""
    started = time.monotonic()
    cancelled = cancelled or threading.Event()
    files, dirs, skipped = collect(paths)
    outcome = SendOutcome(peer_id, total=sum(f.size for f in files), skipped=skipped)
    for path in skipped:
        event({"event": "skipped", "path": path, "reason": "not a regular file or folder"})
    offer = {
        "kind": "files",
        "files": [{"name": f.name, "size": f.size} for f in files],
        "dirs": dirs,
    }
    with pool.stream(peer_id, offer, reply_timeout=PLAN_TIMEOUT) as (stream, reply):
        plan = reply.get("plan")
        if not isinstance(plan, list) or len(plan) != len(files):
            raise BadRequest(f"{peer_id} answered the offer with no plan for each file")
        starts = _settle(stream, files, plan, outcome, event)
        event({"event": "sending", "peer": peer_id, "files": len(files), "total": outcome.total})
        _Sender(stream, files, starts, outcome, event, cancelled).run()
    outcome.seconds = time.monotonic() - started
    return outcome


def _settle(
    stream: PeerStream,
    files: list[Local],
    plan: list[Any],
    outcome: SendOutcome,
    event: Event,
) -> dict[int, tuple[int, Any]]:
    """Where each file starts (offset, the digest of what precedes it); files the receiver
    already has are recorded as done. EXISTS, with nothing sent, on a conflict."""
    starts: dict[int, tuple[int, Any]] = {}
    for index, (local, step) in enumerate(zip(files, plan, strict=True)):
        action = step.get("action") if isinstance(step, dict) else None
        if action == "exists":
            if digest_of(local.path).hexdigest() == step.get("sha256"):
                outcome.files.append({"name": local.name, "ok": True, "unchanged": True})
                event({"event": "unchanged", "name": local.name, "size": local.size})
                continue
            reason = f"{local.name} exists on {outcome.peer_id} with other contents"
            header.write(stream, {"cancel": reason})
            raise Exists(f"{reason}: nothing was sent (its operator may `receive --overwrite`)")
        offset = step.get("offset") if action == "resume" else 0
        if not isinstance(offset, int) or not 0 <= offset <= local.size:
            raise BadRequest(f"{outcome.peer_id} planned {local.name} from {offset!r}")
        digest = digest_of(local.path, offset)
        if offset and digest.hexdigest() != step.get("sha256"):
            offset, digest = 0, digest_of(local.path, 0)  # its partial file is another file's
        starts[index] = (offset, digest)
    return starts


class _Sender:
    def __init__(
        self,
        stream: PeerStream,
        files: list[Local],
        starts: dict[int, tuple[int, Any]],
        outcome: SendOutcome,
        event: Event,
        cancelled: threading.Event,
    ) -> None:
        self.stream = stream
        self.files = files
        self.starts = starts
        self.outcome = outcome
        self.event = event
        self.cancelled = cancelled
        self.results = _Results(stream)
        self.done = sum(local.size for i, local in enumerate(files) if i not in starts)
        self._told = 0.0

    def run(self) -> None:
        begun: list[int] = []
        for index, (offset, digest) in self.starts.items():
            if self.cancelled.is_set() or self.results.stop or self.results.ended.is_set():
                break
            if self._file(index, offset, digest):
                begun.append(index)
        self.stream.shutdown_write(timeout=None)  # the receiver's reading ends there
        self.results.wait(begun, RESULT_TIMEOUT)
        for index in begun:
            self._conclude(index)
        if self.cancelled.is_set():
            raise Interrupted("the send was cancelled; run it again to resume")
        if self.results.error is not None and any(i not in self.results.by_file for i in begun):
            raise Interrupted(
                f"the transfer to {self.outcome.peer_id} broke off ({self.results.error}); "
                "run send again to resume"
            )

    def _file(self, index: int, offset: int, digest: Any) -> bool:
        """Send one file from `offset`; False when it could not even be opened."""
        local = self.files[index]
        try:
            file = local.path.open("rb")
        except OSError as exc:
            failure = FileChanged(f"{local.name} could not be opened: {exc.strerror or exc}")
            self._failed(local.name, failure)
            return False
        with file:
            header.write(self.stream, {"file": index, "start": offset}, timeout=None)
            self.event({"event": "file", "name": local.name, "size": local.size, "start": offset})
            self.done += offset
            file.seek(offset)
            sent = offset
            while sent < local.size:
                if self.cancelled.is_set() or self.results.failed(index):
                    why = "the send was cancelled" if self.cancelled.is_set() else "refused"
                    return self._abort(index, Interrupted(why))
                chunk = file.read(min(CHUNK, local.size - sent))
                if not chunk:
                    failure = FileChanged(
                        f"{local.name} shrank to {human(sent)} while it was sent "
                        f"({human(local.size)} when offered)"
                    )
                    return self._abort(index, failure)
                digest.update(chunk)
                self.stream.sendall(LENGTH.pack(len(chunk)) + chunk, timeout=None)
                sent += len(chunk)
                self.outcome.sent += len(chunk)
                self._progress(local.name, len(chunk))
        self.stream.sendall(LENGTH.pack(END) + header.encode({"sha256": digest.hexdigest()}))
        return True

    def _abort(self, index: int, failure: PeerApiError) -> bool:
        self.stream.sendall(
            LENGTH.pack(ABORT) + header.encode({"code": failure.code, "reason": str(failure)})
        )
        if not self.results.failed(index):
            self._failed(self.files[index].name, failure)
        return True

    def _conclude(self, index: int) -> None:
        name = self.files[index].name
        if any(f["name"] == name for f in self.outcome.files):
            return  # failed here already
        result = self.results.by_file.get(index)
        if result is None:
            self._failed(name, Interrupted(f"no answer from {self.outcome.peer_id} about {name}"))
        elif result.get("ok"):
            self.outcome.files.append({"name": name, "ok": True, "start": self.starts[index][0]})
            self.event({"event": "done", "name": name, "size": self.files[index].size})
        else:
            code, reason = str(result.get("code")), str(result.get("reason"))
            self.outcome.files.append({"name": name, "ok": False, "code": code, "error": reason})
            self.event({"event": "failed", "name": name, "code": code, "error": reason})

    def _failed(self, name: str, failure: PeerApiError) -> None:
        logger.warning("sending %s to %s: %s", name, self.outcome.peer_id, failure)
        self.outcome.files.append(
            {"name": name, "ok": False, "code": failure.code, "error": str(failure)}
        )
        self.event({"event": "failed", "name": name, "code": failure.code, "error": str(failure)})

    def _progress(self, name: str, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._told >= PROGRESS_EVERY:
            self._told = now
            self.event(
                {"event": "progress", "name": name, "done": self.done, "total": self.outcome.total}
            )
