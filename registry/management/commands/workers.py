"""`manage.py workers`: the registry as a table, or as `/api/workers/`'s JSON with `--json`."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.models import WorkerStatus
from registry.presence import selectors

COLUMNS = ("ID", "STATUS", "OBSERVED ADDRESS", "PUBLIC IP", "LAST SEEN", "INSTANCE")


def positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(raw)
    return int(raw)


def address(ip: str | None, port: int | None) -> str:
    if not ip:
        return "-"
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}" if port else host


def _short_time(iso: str | None) -> str:
    """`2026-11-25T14:32:26Z`: the API's UTC timestamps to the second."""
    return f"{iso[:19]}Z" if iso else "-"


def table_row(worker: dict[str, Any]) -> tuple[str, ...]:
    connection = worker["current_connection"] or {}
    return (
        worker["id"],
        worker["status"],
        address(worker["observed_ip"], worker["observed_port"]),
        worker["public_ip"] or "-",
        _short_time(worker["last_seen"]),
        connection.get("instance_id") or "-",
    )


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


class Command(BaseCommand):
    help = (
        "List the workers in the registry, by id: a table, or with --json the shape of "
        "/api/workers/ (without the next/previous links)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--status", choices=WorkerStatus.values, default=None)
        parser.add_argument("--page", type=positive_int, default=1)
        parser.add_argument(
            "--page-size",
            type=positive_int,
            default=settings.RENDEZVOUS["API_PAGE_SIZE"],
            help=f"at most {settings.RENDEZVOUS['API_MAX_PAGE_SIZE']}, as in the API",
        )
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="print JSON, for scripts"
        )

    def handle(
        self,
        *args: Any,
        status: str | None,
        page: int,
        page_size: int,
        as_json: bool,
        **options: Any,
    ) -> None:
        page_size = min(page_size, settings.RENDEZVOUS["API_MAX_PAGE_SIZE"])
        result = selectors.list_workers(
            status=WorkerStatus(status) if status else None, page=page, page_size=page_size
        )
        if page > result.num_pages:
            raise CommandError(f"page {page} is past the last page ({result.num_pages})")
        if as_json:
            self.stdout.write(_dumps(result))
            return
        if result.results:
            self.stdout.write(format_table([COLUMNS, *map(table_row, result.results)]))
        what = f"{status} workers" if status else "workers"
        self.stdout.write(
            f"{result.count} {what}; page {result.page} of {result.num_pages} "
            f"({result.page_size} a page)"
        )


def _dumps(result: selectors.Page) -> str:
    return json.dumps(
        {
            "count": result.count,
            "page": result.page,
            "page_size": result.page_size,
            "num_pages": result.num_pages,
            "results": result.results,
        },
        indent=2,
    )
