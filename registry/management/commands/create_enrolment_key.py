"""`python manage.py create_enrolment_key`: what the admin's "Add enrolment key" does, for
scripts and CI. Prints the key alone on stdout (it is not stored and cannot be shown again)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from registry.core import protocol
from registry.security import enrolment

_DURATION = re.compile(r"\A(\d+)([smhd])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise CommandError(f"--expires-in must be like 30m, 12h or 90d, not {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    help = "Create an enrolment key and print it (shown once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", required=True, help="What or who the key is for.")
        parser.add_argument("--reusable", action="store_true", help="Enrol any number of workers.")
        parser.add_argument(
            "--ephemeral", action="store_true", help="Remove enrolled workers once long offline."
        )
        parser.add_argument("--tag", action="append", default=[], help="Repeatable.")
        parser.add_argument("--expires-in", default="1d", help="e.g. 30m, 12h, 90d (default 1d)")

    def handle(self, *args: Any, **options: Any) -> None:
        bad = [tag for tag in options["tag"] if not protocol.is_valid_tag(tag)]
        if bad:
            raise CommandError(f"not valid tags: {', '.join(bad)} ({protocol.TAG_RULE})")
        try:
            key, secret = enrolment.create_enrolment_key(
                name=options["name"],
                reusable=options["reusable"],
                ephemeral=options["ephemeral"],
                tags=options["tag"],
                expires_in=parse_duration(options["expires_in"]),
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        self.stderr.write(
            f"enrolment key {key.prefix}… ({key.name}): "
            f"{'reusable' if key.reusable else 'single-use'}"
            f"{', ephemeral' if key.ephemeral else ''}, expires {key.expires_at.isoformat()}"
        )
        self.stdout.write(secret)
