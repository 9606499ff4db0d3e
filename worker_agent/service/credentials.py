"""The worker's identity on disk: its id, its credential, its key pair for peer connections.

The agent makes its credential itself before it enrols (the service binds the credential the
enrolling agent presents, so nobody else holding the enrolment key can redo that enrolment), and
its key pair and certificate (worker_agent/secure/identity.py); all of it is kept here, read at
every start, so a restarted worker comes back as itself without its enrolment key. The file is
created with mode 0600 and replaced atomically; it holds secrets, so keep it where only the
worker's user can read it. Files of format 1 (a credential the service issued, no key pair) are
still read.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 2
CREDENTIAL_PREFIX = "rvc_"


class CredentialFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Identity:
    worker_id: str
    credential: str
    service_url: str = ""
    # Whether the service has bound the credential (a welcome came back for it).
    enrolled: bool = True
    private_key: str = ""  # PEM: the worker's peer-connection key, never sent anywhere
    certificate: str = ""  # PEM: its self-signed certificate, sent to the service


def new_credential() -> str:
    """A credential made on the worker: 256 random bits, in the service's own format."""
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


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
            enrolled=bool(data.get("enrolled", True)),  # format 1: issued at enrolment
            private_key=str(data.get("private_key", "")),
            certificate=str(data.get("certificate", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialFileError(f"credential file {file} is not valid: {exc}") from exc
    if identity.credential and not identity.credential.startswith(CREDENTIAL_PREFIX):
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
            "enrolled": identity.enrolled,
            "private_key": identity.private_key,
            "certificate": identity.certificate,
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
