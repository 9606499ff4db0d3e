"""Files between two agents: what a transfer offers, the names a receiver accepts, and the
framing of the bytes.

One stream per `send`: the sender offers every file (relative names with `/`, sizes) and the
empty folders; the receiver answers with a plan per file (`write`; `resume` at an offset, with
the SHA-256 of what it holds; `exists`, with the SHA-256 of the file it has), before any byte
moves. Then, for each file it sends, the sender writes `{"file": i, "start": offset}`, the bytes
from there in chunks (a 4-byte length, then the bytes), and an end (length 0, then
`{"sha256": ...}` of the whole file) or an abort (length 0xFFFFFFFF, then `{"code", "reason"}`).
The receiver answers each file with `{"file": i, "ok": ...}` once it has checked the digest.

Resuming needs no state besides the partial file: the receiver hashes what it holds, the sender
hashes the same prefix of its file (it must, for the whole file's digest), and sends from the
offset when they match, from the start otherwise. Partial files wait in `PARTIAL_DIR` inside the
receiving directory, under their own names, so none is ever taken for a file of the user's.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadName

PARTIAL_DIR = ".rendezvous-partial"
CHUNK = 1024 * 1024
LENGTH = struct.Struct(">I")
END = 0
ABORT = 0xFFFFFFFF
MAX_NAME = 4096
MAX_PART = 255  # bytes of one path component, as most file systems allow


@dataclass(frozen=True)
class Offered:
    name: str
    size: int


@dataclass(frozen=True)
class Local:
    """A file the sender offers: its name for the receiver, and where it is here."""

    name: str
    path: Path
    size: int


def check_name(name: Any) -> str:
    """A relative name of `/`-separated components that stays inside the receiving directory:
    no absolute path, no `..`, no empty or `.` component, no control character, no backslash,
    nothing in the receiver's partial-file folder. BadName says which rule it broke."""
    if not isinstance(name, str) or not name:
        raise BadName(f"{name!r} is not a file name")
    shown = repr(name[:200])
    if len(name) > MAX_NAME:
        raise BadName(f"{shown}: longer than {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or "\\" in name:
        raise BadName(f"{shown}: control characters and backslashes are not allowed in names")
    if name.startswith("/"):
        raise BadName(f"{shown}: an absolute path; names are relative to the receiving folder")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BadName(f"{shown}: empty, '.' and '..' components are not allowed")
        if len(part.encode()) > MAX_PART:
            raise BadName(f"{shown}: a component longer than {MAX_PART} bytes")
    if parts[0] == PARTIAL_DIR:
        raise BadName(f"{shown}: {PARTIAL_DIR} is where partial files wait")
    return name


def check_offer(files: Any, dirs: Any) -> tuple[list[Offered], list[str]]:
    """The offer's files and folders, every name and size checked, no name twice."""
    if not isinstance(files, list) or not isinstance(dirs, list):
        raise BadName("an offer lists `files` and `dirs`")
    offered: list[Offered] = []
    for entry in files:
        if not isinstance(entry, dict):
            raise BadName("each offered file is an object with a name and a size")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadName(f"{entry.get('name')!r}: the size must be a whole number of bytes")
        offered.append(Offered(check_name(entry.get("name")), size))
    folders = [check_name(d) for d in dirs]
    names = [f.name for f in offered]
    if len(set(names)) != len(names) or set(names) & set(folders):
        raise BadName("the offer names something twice")
    return offered, folders


def inside(root: Path, name: str) -> Path:
    """Where `name` goes under `root`, refused if any existing part of the way (a symbolic link
    the receiver's user made, say) leads outside it."""
    target = root / name
    resolved_root = root.resolve()
    probe = target.parent
    while not probe.exists() and probe != root:
        probe = probe.parent
    if not probe.resolve().is_relative_to(resolved_root):
        raise BadName(f"{name!r} would be written outside {root}")
    if target.is_symlink():
        raise BadName(f"{name!r} is a symbolic link in {root}")
    return target


def collect(paths: list[str]) -> tuple[list[Local], list[str], list[str]]:
    """What `send PATH...` offers: each file under its own name, each folder's files under
    `folder/relative/path` (links and special files skipped, and said), empty folders; and
    the skipped paths. FileNotFoundError / BadName for what cannot be sent at all."""
    files: list[Local] = []
    dirs: list[str] = []
    skipped: list[str] = []
    for given in paths:
        path = Path(given)
        info = path.lstat()  # FileNotFoundError when it is not there
        base = path.resolve().name if path.name in ("", ".", "..") else path.name
        if stat.S_ISREG(info.st_mode):
            files.append(Local(check_name(base), path, info.st_size))
        elif stat.S_ISDIR(info.st_mode):
            _walk(path, check_name(base), files, dirs, skipped)
        else:
            skipped.append(str(path))
    names = [f.name for f in files] + dirs
    if len(set(names)) != len(names):
        raise BadName("two of the paths have the same name; send them separately")
    return files, dirs, skipped


def _walk(root: Path, base: str, files: list[Local], dirs: list[str], skipped: list[str]) -> None:
    for top, folders, names in os.walk(root):
        folders.sort()
        relative = Path(top).relative_to(root)
        prefix = base if relative == Path(".") else f"{base}/{relative.as_posix()}"
        if not folders and not names:
            dirs.append(prefix)
        for name in sorted(names):
            path = Path(top) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                files.append(Local(check_name(f"{prefix}/{name}"), path, info.st_size))
            else:
                skipped.append(str(path))
        for name in list(folders):
            if (Path(top) / name).is_symlink():
                skipped.append(str(Path(top) / name))
                folders.remove(name)


def digest_of(path: Path, size: int | None = None) -> Any:
    """SHA-256 of the file's first `size` bytes (all of it when None), as a hashlib object so
    that the caller can go on hashing what follows."""
    digest = hashlib.sha256()
    left = size
    with path.open("rb") as file:
        while left is None or left > 0:
            chunk = file.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest


def human(size: float) -> str:
    """Bytes for people: 812 B, 3.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
