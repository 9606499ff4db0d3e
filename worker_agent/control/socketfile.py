"""Where the control socket lives, and how it is made without a window for anyone else.

The path: `RENDEZVOUS_CONTROL_SOCKET`; else beside the credential file (`identity.json` ->
`identity.sock`), where the worker's secrets already are; else `$XDG_RUNTIME_DIR/
rendezvous-worker.sock`; else `/tmp/rendezvous-worker-<uid>/control.sock`, in a folder of the
user's own (0700), as tmux and ssh-agent do.

Made safely: one agent per socket, held by an exclusive lock on `<socket>.lock` for the agent's
life (a second agent is refused at start, and the socket a crashed agent left is known stale
and replaced); the socket is bound inside a private temporary folder, made 0600, then renamed
into place, so it is never reachable with looser permissions; a folder writable by others (not
sticky), or a path or lock owned by another user, is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..service.credentials import numbered

MAX_PATH = 107  # bytes of a Unix socket's path (sun_path, with its terminating zero)


class SocketFileError(OSError):
    """The control socket cannot be served at this path; the message says why."""


def default_path(environ: Mapping[str, str], index: int = 0) -> Path:
    """The control socket of the agent at `index` (of `--count N`) under this environment."""
    given = environ.get("RENDEZVOUS_CONTROL_SOCKET", "").strip()
    if given:
        path = Path(given)
    elif credential := environ.get("RENDEZVOUS_CREDENTIAL_FILE", "").strip():
        path = Path(credential).with_suffix(".sock")
    elif runtime := environ.get("XDG_RUNTIME_DIR", "").strip():
        path = Path(runtime) / "rendezvous-worker.sock"
    else:
        path = Path(tempfile.gettempdir()) / f"rendezvous-worker-{os.getuid()}" / "control.sock"
    return Path(numbered(path, index)).absolute() if index else path.absolute()


class ControlSocket:
    """The listening socket at `path`, and the lock that makes it this agent's alone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def open(self, backlog: int = 16) -> socket.socket:
        staging = len(os.fsencode(self.path.parent)) + len("/.rvctl-xxxxxxxx/s")
        if max(len(os.fsencode(self.path)), staging) > MAX_PATH:
            raise SocketFileError(
                f"the control socket path {self.path} is longer than {MAX_PATH} bytes: "
                "set RENDEZVOUS_CONTROL_SOCKET to a shorter one"
            )
        _private_folder(self.path.parent)
        self._lock()
        try:
            self._remove_stale()
            self.sock = _bind_privately(self.path)
            self.sock.listen(backlog)
            info = self.path.stat()
            self._inode = (info.st_dev, info.st_ino)
        except BaseException:
            self.close()
            raise
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()  # ours still: not one a later agent made
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None

    def _lock(self) -> None:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SocketFileError(f"cannot open the lock {lock}: {exc.strerror or exc}") from None
        if os.fstat(fd).st_uid != os.getuid():
            os.close(fd)
            raise SocketFileError(f"{lock} belongs to another user: not using it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SocketFileError(
                f"another agent already serves {self.path} (process {holder}): one agent per "
                "socket; stop it, or give this one RENDEZVOUS_CONTROL_SOCKET"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _remove_stale(self) -> None:
        """With the lock held, whatever socket is at the path was left by an agent that died."""
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return
        if info.st_uid != os.getuid():
            raise SocketFileError(f"{self.path} belongs to another user: not replacing it")
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketFileError(f"{self.path} exists and is not a socket: not replacing it")
        self.path.unlink()


def _private_folder(folder: Path) -> None:
    """The socket's folder: made (0700) when missing; refused when another user owns it or
    anyone else may write in it without the sticky bit (they could swap the socket)."""
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise SocketFileError(f"{folder} is not a folder")
    if info.st_uid not in (os.getuid(), 0):
        raise SocketFileError(f"{folder} belongs to another user: not serving a socket there")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise SocketFileError(f"{folder} is writable by others: not serving a socket there")


def _bind_privately(path: Path) -> socket.socket:
    """Bind in a fresh 0700 folder beside `path`, make it 0600, rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=".rvctl-", dir=path.parent))
    try:
        temporary = staging / "s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fsencode(temporary))
            os.chmod(temporary, 0o600)
            os.rename(temporary, path)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        with contextlib.suppress(OSError):
            (staging / "s").unlink()
        with contextlib.suppress(OSError):
            staging.rmdir()
