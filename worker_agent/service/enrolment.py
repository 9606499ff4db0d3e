"""Who this worker is to the service: its id, its credential, and the file that keeps them.

A credential file decides the worker id (it is the identity the service knows). Against a
secured service the agent makes its credential itself and presents it with the enrolment key:
the service binds it, so nobody else holding the same key can redo the enrolment, and a lost
welcome costs nothing. Every later handshake presents the credential alone (docs/security.md).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .. import wire
from . import credentials

Identity = Any  # secure.identity.WorkerIdentity, or None without the p2p extra


class Enrolment:
    """The credential's state: made here or issued, bound or not; thread-safe."""

    def __init__(
        self,
        *,
        worker_id: str | None,
        service_url: str,
        enrolment_key: str | None,
        credential: str | None,
        credential_file: str | os.PathLike[str] | None,
        make_identity: Callable[[credentials.Identity | None, str], Identity],
    ) -> None:
        self.credential_file = credential_file
        stored = credentials.load(credential_file) if credential_file is not None else None
        if stored is not None and worker_id is not None and stored.worker_id != worker_id:
            raise ValueError(
                f"credential file {credential_file} belongs to worker {stored.worker_id!r}, "
                f"not {worker_id!r}"
            )
        if stored is not None:
            worker_id = stored.worker_id
        self.worker_id = str(uuid.uuid4()) if worker_id is None else worker_id
        self.service_url = service_url
        # Where it registers; ValueError says what is wrong with the URL or the id.
        self.url = wire.websocket_url(service_url, self.worker_id)
        self.enrolment_key = enrolment_key
        self._lock = threading.Lock()
        self._credential = credential or (stored.credential if stored else None) or None
        self._enrolled = bool(credential) or (stored is not None and stored.enrolled)
        if self._credential is None and enrolment_key:
            self._credential, self._enrolled = credentials.new_credential(), False
        self._key_fallback_used = False
        self.identity = make_identity(stored, self.worker_id)
        self._loaded = stored

    def persist(self) -> None:
        """Write the credential file if it does not hold what this agent will present: before
        any enrolment starts, so a crash cannot lose a credential the service bound."""
        if self.credential_file is not None and self._stored() != self._loaded:
            credentials.save(self.credential_file, self._stored())
            self._loaded = self._stored()

    @property
    def credential(self) -> str | None:
        with self._lock:
            return self._credential

    @property
    def enrolled(self) -> bool:
        with self._lock:
            return self._enrolled

    def headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The handshake's headers: `extra`, then what proves who we are. Headers, never the
        URL: URLs end up in access logs."""
        headers = dict(extra)
        with self._lock:
            credential, enrolled = self._credential, self._enrolled
        if credential and (enrolled or not self.enrolment_key):
            headers["Authorization"] = f"Bearer {credential}"
        elif self.enrolment_key:
            headers["Authorization"] = f"Bearer {self.enrolment_key}"
            if credential:
                headers[wire.CREDENTIAL_HEADER] = credential  # ours, to be bound
        if self.identity is not None:
            headers[wire.CERTIFICATE_HEADER] = self.identity.header_value()
        return headers

    def welcomed(self, issued: Any) -> tuple[int, str] | None:
        """A welcome came: keep the credential it issued, or mark ours as bound. Returns what
        to log (level, text) when that changed something, else None."""
        with self._lock:
            self._key_fallback_used = False
            if isinstance(issued, str) and issued:
                credential = issued  # a service that makes credentials itself
            elif not self._enrolled and self._credential and self.enrolment_key:
                credential = self._credential  # ours is bound now
            else:
                return None
            self._credential, self._enrolled = credential, True
        if self.credential_file is None:
            return logging.INFO, "enrolled: credential kept in memory only"
        try:
            credentials.save(self.credential_file, self._stored())
        except OSError as exc:
            return logging.ERROR, (
                f"enrolled, but the credential could not be written to {self.credential_file} "
                f"({exc}): kept in memory; after a restart this worker id cannot reconnect"
            )
        return logging.INFO, f"enrolled: credential stored in {self.credential_file}"

    def fall_back_to_key(self) -> tuple[bool, str | None]:
        """A refused credential, with an enrolment key at hand: enrol again, once, with a new
        credential (the operator may have made the service forget the old one because it
        leaked, so it must not be bound again). Whether it will, and what to log if the new
        credential could not be written."""
        with self._lock:
            if not (
                self._credential is not None
                and self._enrolled
                and self.enrolment_key is not None
                and not self._key_fallback_used
            ):
                return False, None
            self._credential, self._enrolled = credentials.new_credential(), False
            self._key_fallback_used = True
        if self.credential_file is not None:
            try:
                credentials.save(self.credential_file, self._stored())
            except OSError as exc:
                return True, f"cannot write {self.credential_file}: {exc}"
        return True, None

    def _stored(self) -> credentials.Identity:
        """What the credential file holds for this agent now."""
        identity = self.identity
        return credentials.Identity(
            worker_id=self.worker_id,
            credential=self._credential or "",
            service_url=self.service_url,
            enrolled=self._enrolled,
            private_key=identity.private_key_pem.decode() if identity else "",
            certificate=identity.certificate_pem.decode() if identity else "",
        )
