"""TURN credentials for the agents: time-limited, minted per introduction, never the secret.

coturn's TURN REST API scheme (`--use-auth-secret --static-auth-secret=S`): the username is
`<unix expiry>:<name>` and the password is base64(HMAC-SHA1(S, username)). coturn recomputes the
password from the username and refuses it once the expiry has passed, so the service mints
credentials without ever talking to coturn, and an agent learns nothing that outlives them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

# Shorter secrets are refused by system check rendezvous.E006: anyone who guesses it mints
# credentials for the TURN server.
MIN_SECRET_LENGTH = 16


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    servers: tuple[str, ...]
    username: str
    password: str
    expires_at: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "servers": list(self.servers),
            "username": self.username,
            "password": self.password,
            "expires_at": self.expires_at,
        }


def password_for(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def mint(
    *, servers: list[str], secret: str, name: str, ttl: float, now: float | None = None
) -> TurnCredentials | None:
    """Credentials valid for `ttl` seconds for the worker `name`; None when TURN is not set up."""
    if not servers or not secret:
        return None
    expires_at = int((time.time() if now is None else now) + ttl)
    username = f"{expires_at}:{name}"
    return TurnCredentials(
        servers=tuple(servers),
        username=username,
        password=password_for(secret, username),
        expires_at=expires_at,
    )


def parse_server(entry: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port` as (host, port); None when the entry is neither."""
    text = entry.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or (":" in host and not text.startswith("[")) or not port.isdigit():
        return None
    if not 1 <= int(port) <= 65535:
        return None
    return host, int(port)
