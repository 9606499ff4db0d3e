"""Who may reach whom among the workers the registry holds: the peers a worker may ask for
(`list_peers`), a worker as the policy sees it, the workers one may reach or be reached by, and
what a rule names that the registry does not know (the admin, the management command). The
rules come from peering/rules.py."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from channels.db import database_sync_to_async

from registry.core import peer_policy
from registry.core.peer_policy import Subject
from registry.models import Worker, decode_tags
from registry.peering import rules
from registry.presence import selectors


async def reachable_peers(
    me: Subject, *, tag: str | None, offline: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    """`list_peers`: the connected workers `me` may reach (with `offline`, the others too), by
    the rules this process holds, and whether the list was cut."""
    policy = await rules.current()
    return await database_sync_to_async(selectors.list_peers)(
        exclude=me.worker_id, tag=tag, reach=rules.reach_from(policy, me), offline=offline
    )


def subject(worker_id: str) -> Subject:
    """A worker as the policy sees it; an unknown id has no tags."""
    tags = Worker.objects.filter(id=worker_id).values_list("tags", flat=True).first()
    return Subject.of(worker_id, decode_tags(tags or ""))


def worker_reach(
    worker_id: str, tags: Iterable[str], *, outward: bool, limit: int
) -> tuple[list[str], int]:
    """The workers of the registry `worker_id` may reach (`outward`), or that may reach it,
    under the rules as they are now: the first `limit` ids, and how many in all. One query
    each way, whatever the size of the registry."""
    me = Subject.of(worker_id, tags)
    policy = rules.load()
    reach = rules.reach_from(policy, me) if outward else rules.reach_to(policy, me)
    workers = Worker.objects.within(reach).exclude(id=worker_id)
    return list(workers.order_by("id").values_list("id", flat=True)[:limit]), workers.count()


def known_tags() -> set[str]:
    rows = Worker.objects.exclude(tags="").values_list("tags", flat=True).distinct()
    return {tag for tags in rows for tag in decode_tags(tags)}


def rule_warnings(sources: str, destinations: str) -> list[str]:
    """What an operator should know about a rule: tags no worker carries, ids no worker has."""
    return rules_warnings([(sources, destinations)])[0]


def rules_warnings(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """`rule_warnings` for each of `pairs` (sources, destinations), in two queries for all."""
    parsed: list[tuple[peer_policy.Selector, ...] | str] = []
    for sources, destinations in pairs:
        try:
            parsed.append(peer_policy.parse_side(sources) + peer_policy.parse_side(destinations))
        except peer_policy.InvalidRule as exc:
            parsed.append(str(exc))
    selectors_ = [s for side in parsed if not isinstance(side, str) for s in side]
    named = {s.value for s in selectors_ if s.kind == "worker"}
    existing = (
        set(Worker.objects.filter(id__in=named).values_list("id", flat=True)) if named else set()
    )
    tags = known_tags() if any(s.kind == "tag" for s in selectors_) else set()
    found = []
    for side in parsed:
        if isinstance(side, str):
            found.append([side])
            continue
        warnings = [
            f"no worker carries tag:{s.value}"
            if s.kind == "tag"
            else f"no worker {s.value} in the registry"
            for s in side
            if (s.kind == "tag" and s.value not in tags)
            or (s.kind == "worker" and s.value not in existing)
        ]
        found.append(list(dict.fromkeys(warnings)))
    return found
