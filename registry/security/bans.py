"""Bans: worker ids an operator disabled, refused at every handshake in every mode until they are
enabled again. These functions write the rows only; closing a disabled worker's live session as
well is ops/control.py (`disable_and_disconnect`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from registry.models import Worker


def mark_disabled(
    worker_ids: Iterable[str], *, reason: str = "", now: datetime | None = None
) -> list[str]:
    """Refuse these ids from now on. Returns the ids newly disabled; their live connections stay
    open unless the caller closes them (ops/control.py closes them with WORKER_DISABLED)."""
    ids = list(worker_ids)
    with transaction.atomic():
        newly = list(
            Worker.objects.filter(id__in=ids, disabled_at__isnull=True).values_list("id", flat=True)
        )
        Worker.objects.filter(id__in=newly).update(
            disabled_at=now or timezone.now(), disabled_reason=reason[:200]
        )
    return newly


def mark_enabled(worker_ids: Iterable[str]) -> int:
    """Accept these ids again. Returns how many were disabled."""
    return Worker.objects.filter(id__in=list(worker_ids), disabled_at__isnull=False).update(
        disabled_at=None, disabled_reason=""
    )
