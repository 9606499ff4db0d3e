"""System checks: misconfiguration is caught at start, not discovered in production.

Registered by `RegistryConfig.ready()` (registry/apps.py)."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning

from registry.core import turn


def check_rendezvous_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    problems: list[Any] = []
    config = settings.RENDEZVOUS
    shared_backend = bool(settings.REDIS_URL) or settings.DATABASES["default"]["ENGINE"] != (
        "django.db.backends.sqlite3"
    )
    if shared_backend and not settings.SECRET_KEY_FROM_ENVIRONMENT:
        problems.append(
            Warning(
                "SECRET_KEY is not set: each instance made its own, so admin sessions will not "
                "carry from one instance to another.",
                hint="Set SECRET_KEY to the same secret on every instance.",
                id="rendezvous.W001",
            )
        )
    if config["INSTANCE_DEAD_AFTER"] < 3 * config["HOUSEKEEPING_INTERVAL"]:
        problems.append(
            Error(
                "RENDEZVOUS_INSTANCE_DEAD_AFTER must be at least 3 x "
                "RENDEZVOUS_HOUSEKEEPING_INTERVAL, or live instances would be declared dead.",
                id="rendezvous.E001",
            )
        )
    if config["HEARTBEAT_INTERVAL"] <= 0 or config["HOUSEKEEPING_INTERVAL"] <= 0:
        problems.append(
            Error("Heartbeat and housekeeping intervals must be positive.", id="rendezvous.E002")
        )
    if settings.INSTALLED_APPS.index("registry") > settings.INSTALLED_APPS.index("channels"):
        problems.append(
            Error(
                "'registry' must come before 'channels' in INSTALLED_APPS, or channels' "
                "runworker hides the worker agent's.",
                id="rendezvous.E003",
            )
        )
    for entry in config["STUN_SERVERS"]:
        host, _, port = entry.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            problems.append(
                Error(
                    f"RENDEZVOUS_STUN_SERVERS entry {entry!r} is not host:port.",
                    hint="e.g. RENDEZVOUS_STUN_SERVERS=stun1.example.com:3478,198.51.100.2:3479",
                    id="rendezvous.E004",
                )
            )
    problems += _turn_problems(config)
    problems += _peering_problems(config)
    return problems


def _turn_problems(config: dict[str, Any]) -> list[Any]:
    problems: list[Any] = []
    for entry in config["TURN_SERVERS"]:
        if turn.parse_server(entry) is None:
            problems.append(
                Error(
                    f"RENDEZVOUS_TURN_SERVERS entry {entry!r} is not host:port.",
                    hint="e.g. RENDEZVOUS_TURN_SERVERS=turn.example.com:3478",
                    id="rendezvous.E005",
                )
            )
    servers, secret = config["TURN_SERVERS"], config["TURN_SECRET"]
    if servers and not secret:
        problems.append(
            Error(
                "RENDEZVOUS_TURN_SERVERS is set but RENDEZVOUS_TURN_SECRET is not: the service "
                "cannot mint TURN credentials.",
                hint="Set RENDEZVOUS_TURN_SECRET to coturn's --static-auth-secret.",
                id="rendezvous.E006",
            )
        )
    elif secret and len(secret) < turn.MIN_SECRET_LENGTH:
        problems.append(
            Error(
                f"RENDEZVOUS_TURN_SECRET is shorter than {turn.MIN_SECRET_LENGTH} characters: "
                "whoever guesses it mints TURN credentials.",
                hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                id="rendezvous.E006",
            )
        )
    if secret and not servers:
        problems.append(
            Warning(
                "RENDEZVOUS_TURN_SECRET is set but RENDEZVOUS_TURN_SERVERS is empty: no TURN "
                "credentials are minted.",
                id="rendezvous.W002",
            )
        )
    if config["TURN_TTL"] < 60:
        problems.append(
            Error(
                "RENDEZVOUS_TURN_TTL must be at least 60 seconds: shorter credentials expire "
                "before a TURN allocation is refreshed.",
                id="rendezvous.E007",
            )
        )
    return problems


def _peering_problems(config: dict[str, Any]) -> list[Any]:
    """The records' retention and how long an unused introduction may wait."""
    problems: list[Any] = []
    retention = config["PEER_CONNECTION_RETENTION_DAYS"]
    if not math.isfinite(retention) or not 0 < retention <= 36500:
        problems.append(
            Error(
                "RENDEZVOUS_PEER_CONNECTION_RETENTION_DAYS must be a number of days above 0 (and "
                f"at most 36500), not {retention!r}: at 0 or below every ended record would be "
                "deleted at once.",
                id="rendezvous.E008",
            )
        )
    unused = config["UNUSED_INTRODUCTION_TIMEOUT"]
    if not math.isfinite(unused) or not 5 < unused <= 3600:
        problems.append(
            Error(
                "RENDEZVOUS_UNUSED_INTRODUCTION_TIMEOUT must be a number of seconds above 5 (and "
                f"at most 3600), not {unused!r}: a pair without the relay may send its first ICE "
                "candidates only after 5 s of gathering, and would be ended before.",
                id="rendezvous.E009",
            )
        )
    return problems
