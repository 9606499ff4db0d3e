"""`python manage.py create_api_token --name prometheus`: an API token for the JSON views and
/metrics in secured mode. Prints the token alone on stdout (shown once, not stored)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from registry.security import api_access


class Command(BaseCommand):
    help = "Create an API token and print it (shown once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", required=True, help="What or who the token is for.")

    def handle(self, *args: Any, **options: Any) -> None:
        token, secret = api_access.create_api_token(name=options["name"])
        self.stderr.write(f"API token {token.prefix}… ({token.name})")
        self.stdout.write(secret)
