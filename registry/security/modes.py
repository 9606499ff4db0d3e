"""The two security modes (`RENDEZVOUS_SECURITY_MODE`, docs/security.md): `open`, where anyone
may register any worker id and read the registry, and `secured`, where workers enrol with a key
and reconnect with their credential and the JSON views need a staff session or an API token."""

from __future__ import annotations

OPEN = "open"
SECURED = "secured"


def mode_notice(mode: str) -> str:
    """The line the service starts with: which mode it is in and what that means."""
    if mode == OPEN:
        return (
            "security mode OPEN: anyone may register any worker id and read the registry; "
            "for a deployment set RENDEZVOUS_SECURITY_MODE=secured (docs/security.md)"
        )
    return (
        "security mode SECURED: workers enrol with an enrolment key and reconnect with their "
        "credential; the JSON views need a staff session or an API token"
    )
