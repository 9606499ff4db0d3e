"""The worker's identity on disk: its id and the credential the service bound to it.

Written once at enrolment, read at every start, so a restarted worker comes back as itself
without its enrolment key. The file is created with mode 0600 and replaced atomically; it holds
a secret, so keep it where only the worker's user can read it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
CREDENTIAL_PREFIX = "rvc_"


class CredentialFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Identity:
    worker_id: str
    credential: str
    service_url: str = ""


def load(path: str | os.PathLike[str]) -> Identity | None:
    """The identity stored at `path`, None if there is no file yet; CredentialFileError if the
    file is there but unusable (never silently enrol again over a damaged identity)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialFileError(f"cannot read credential file {file}: {exc}") from exc
    try:
        data = json.loads(text)
        identity = Identity(
            worker_id=str(data["worker_id"]),
            credential=str(data["credential"]),
            service_url=str(data.get("service_url", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialFileError(f"credential file {file} is not valid: {exc}") from exc
    if not identity.credential.startswith(CREDENTIAL_PREFIX):
        raise CredentialFileError(f"credential file {file} holds no worker credential")
    return identity


def save(path: str | os.PathLike[str], identity: Identity) -> None:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(
        {
            "version": FORMAT_VERSION,
            "worker_id": identity.worker_id,
            "credential": identity.credential,
            "service_url": identity.service_url,
        },
        indent=2,
    )
    fd, temporary = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def numbered(path: str | os.PathLike[str], index: int) -> Path:
    """The file of the index-th agent of a group: `worker.json`, `worker-2.json`, ..."""
    file = Path(path)
    return file if index == 0 else file.with_name(f"{file.stem}-{index + 1}{file.suffix}")
