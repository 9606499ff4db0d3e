"""The secrets the service hands out: enrolment keys, worker credentials and API tokens.

Each is 256 random bits behind a prefix that says what it is (`rvk_`, `rvc_`, `rvt_`), so a
leaked one is recognisable in a secret scanner. Only a SHA-256 digest is stored: the secrets are
random, not chosen by people, so a fast hash is enough and no salt is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    ENROLMENT_KEY = "rvk_"
    WORKER_CREDENTIAL = "rvc_"
    API_TOKEN = "rvt_"


# The handshake header in which an enrolling agent presents the credential it made itself.
CREDENTIAL_HEADER = b"rendezvous-credential"

# Shown in the admin and in logs to tell secrets apart without revealing them.
DISPLAY_PREFIX_LENGTH = 12
MAX_LENGTH = 100


@dataclass(frozen=True, slots=True)
class Issued:
    secret: str  # given to its holder once, never stored
    digest: str
    display_prefix: str


def issue(kind: Kind) -> Issued:
    secret = kind.value + secrets.token_urlsafe(32)
    return Issued(
        secret=secret, digest=digest(secret), display_prefix=secret[:DISPLAY_PREFIX_LENGTH]
    )


def adopt(secret: str) -> Issued:
    """A secret made elsewhere (a worker's own credential), as if issued here."""
    return Issued(
        secret=secret, digest=digest(secret), display_prefix=secret[:DISPLAY_PREFIX_LENGTH]
    )


# A worker's own credential: the prefix and at least 32 URL-safe characters (192 bits and up).
_MIN_SECRET_CHARACTERS = 32


def is_well_formed(secret: str, kind: Kind) -> bool:
    body = secret[len(kind.value) :]
    return (
        secret.startswith(kind.value)
        and len(secret) <= MAX_LENGTH
        and len(body) >= _MIN_SECRET_CHARACTERS
        and all(c.isalnum() or c in "-_" for c in body)
    )


def header_value(headers: list[tuple[bytes, bytes]] | list[list[bytes]], name: bytes) -> str | None:
    """A handshake header's value (the first), if present."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip() or None
    return None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def kind_of(secret: str) -> Kind | None:
    for kind in Kind:
        if secret.startswith(kind.value):
            return kind
    return None


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def bearer_token(headers: list[tuple[bytes, bytes]] | list[list[bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header in an ASGI scope, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            return parse_bearer(value.decode("latin-1"))
    return None


def parse_bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_LENGTH:
        return None
    return token
