"""`python manage.py runworker`: a worker agent (or several) against the local service.

Channels ships a `runworker` too, for channel-layer background workers; given channel names,
this command hands over to it, so `manage.py runworker <channel> ...` still does what the
Channels docs say. The registry app comes before `channels` in INSTALLED_APPS so that this
command is the one Django finds (system check rendezvous.E003 guards the order).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from channels.management.commands.runworker import Command as ChannelsRunworker
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from worker_agent.agents import run_agents
from worker_agent.cli import configure_logging, stop_on_signals


def local_service_url() -> str:
    host = "127.0.0.1" if settings.HOST in ("0.0.0.0", "::", "") else settings.HOST
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.PORT}"


def service_url(given: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """`--url`, else RENDEZVOUS_SERVICE_URL (the variable the standalone agent reads), else the
    local server at HOST:PORT."""
    return (
        (given or "").strip()
        or environ.get("RENDEZVOUS_SERVICE_URL", "").strip()
        or (local_service_url())
    )


class Command(BaseCommand):
    help = (
        "Run worker agents against a service: --url, else $RENDEZVOUS_SERVICE_URL, else the "
        "local server at HOST:PORT. "
        "Given channel names, run Channels' background worker for them instead."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "channels", nargs="*", help="Channel names: run Channels' worker for them instead."
        )
        parser.add_argument("--layer", default="default", help="(Channels' worker) layer alias")
        parser.add_argument(
            "--url",
            default=None,
            help="Service URL (default: $RENDEZVOUS_SERVICE_URL if set, else the local server "
            "at HOST:PORT)",
        )
        parser.add_argument("--count", type=int, default=1, help="Agents to run in this process")
        parser.add_argument(
            "--worker-id",
            default=None,
            help="Worker id; with --count N the ids are ID-1 .. ID-N (default: random UUIDs)",
        )
        parser.add_argument(
            "--ip-echo-url",
            default="",
            help="IP echo service for the public address (default: none, for local use)",
        )
        parser.add_argument("--health-port", type=int, default=None, help="Serve health here")
        parser.add_argument(
            "--enrolment-key",
            default=None,
            help="For a secured service: the key to enrol with (create_enrolment_key makes one)",
        )

    def handle(self, *args: Any, channels: list[str], **options: Any) -> None:
        if channels:
            ChannelsRunworker(stdout=self.stdout, stderr=self.stderr).handle(
                channels=channels, layer=options["layer"], verbosity=options["verbosity"]
            )
            return
        count = options["count"]
        if count < 1:
            raise CommandError("--count must be at least 1")
        worker_id = options["worker_id"]
        worker_ids = None
        if worker_id:
            worker_ids = (
                [worker_id] if count == 1 else [f"{worker_id}-{n}" for n in range(1, count + 1)]
            )
        url = service_url(options["url"])
        configure_logging(settings.LOG_LEVEL)
        self.stdout.write(f"Running {count} worker agent(s) against {url}; Ctrl-C stops them.")
        stop = threading.Event()
        restore = stop_on_signals(stop)
        try:
            ended = run_agents(
                url,
                None if worker_ids else count,
                worker_ids,
                stop_event=stop,
                health_port=options["health_port"],
                ip_echo_url=options["ip_echo_url"],
                enrolment_key=options["enrolment_key"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            restore()
        if ended == "refused":
            raise CommandError("the service refused every worker id")
