"""`python manage.py disconnect <worker_id>`: what the admin's disconnect action does."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from registry.ops import control


class Command(BaseCommand):
    help = (
        "Close a connected worker's socket (code 4001), on whichever instance holds it. "
        "Reaching another process needs the Redis channel layer (REDIS_URL)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("worker_id")

    def handle(self, *args: Any, worker_id: str, **options: Any) -> None:
        if not control.disconnect_worker(worker_id):
            raise CommandError(f"worker {worker_id!r} is not connected")
        self.stdout.write(f"disconnect sent to worker {worker_id}")
