"""The peer policy as the database holds it, and this process's one copy of it.

`load()` reads the enabled rules (PeerRule rows) into a `Policy` (core/peer_policy.py). Every
decision this process makes reads the rules through `current()`: the peer list, a connect
request, the target's answer, the peer events, and the links checked after a change. The copy
is read from the database again only once it is stale:

- a rule saved or deleted in this process (the receiver `rules_changed`, wired in apps.ready())
  marks it stale at once, so the very next decision here sees the change, and again once the
  change is committed, when every instance is told (POLICY_CHANGED, `announce_change`);
- an instance that hears POLICY_CHANGED marks its copy stale and applies the rules to the links
  it holds (`RulesWatch.reload`);
- a change nobody announced (a bulk update, a lost message) is found by each instance's periodic
  check, every POLICY_CHECK_EVERY seconds (`RulesWatch.run`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from registry.core import peer_policy
from registry.core.peer_policy import ALLOW_ALL, DENY_ALL, Decision, Policy, Reach, Subject
from registry.models import PeerRule
from registry.ops import metrics

# Logger names are the ones operators' log pipelines know (docs/operations.md): reading a rule
# logs as the registry's reads always have, watching the rules as the instance runtime.
log = logging.getLogger("registry.selectors")
watch_log = logging.getLogger("registry.runtime")

# Every instance's command channel is in this group, to hear POLICY_CHANGED.
POLICY_GROUP = "rendezvous.policy"
POLICY_CHANGED = "policy.changed"
POLICY_CHECK_EVERY = 5.0  # seconds between this instance's checks of the rules
POLICY_GROUP_RENEW_EVERY = 3600.0  # channels-redis group membership expires (a day)

_ALLOW_ALL = Policy(ALLOW_ALL)


def load(mode: str | None = None) -> Policy:
    """The policy as the database holds it now: the enabled rules, by id. A stored rule that
    cannot be read (written around the admin's form) allows nothing; it is logged and counted."""
    mode = mode or settings.RENDEZVOUS["PEER_POLICY"]
    if mode == ALLOW_ALL:
        return Policy(mode)
    rules = []
    for rule_id, description, sources, destinations in (
        PeerRule.objects.filter(enabled=True)
        .order_by("id")
        .values_list("id", "description", "sources", "destinations")
    ):
        try:
            sides = peer_policy.parse_side(sources), peer_policy.parse_side(destinations)
            rules.append(peer_policy.Rule(rule_id, description, *sides))
        except peer_policy.InvalidRule as exc:
            log.error("peer rule #%s cannot be read and allows nothing: %s", rule_id, exc)
            metrics.policy_error()
    return Policy(mode, tuple(rules))


def decide(policy: Policy, source: Subject, destination: Subject) -> Decision:
    """The policy's decision for the pair; one that could not be made (a refusal) is counted."""
    decision = policy.decide(source, destination)
    if decision.error:
        metrics.policy_error()
    return decision


def reach_from(policy: Policy, source: Subject) -> Reach:
    """Whom `source` may reach; a reach that could not be worked out (nobody) is counted."""
    return _counted(policy.reach_from(source))


def reach_to(policy: Policy, destination: Subject) -> Reach:
    """Who may reach `destination`; one that could not be worked out (nobody) is counted."""
    return _counted(policy.reach_to(destination))


def _counted(reach: Reach) -> Reach:
    if reach.error:
        metrics.policy_error()
    return reach


class PeerRules:
    """This process's copy of the rules. Stale until read; a copy read while it was being marked
    stale is returned to its reader but not kept. Thread-safe: the receiver runs in whichever
    thread saved the rule, the reads on the event loop and in database threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policy: Policy | None = None
        self._generation = 0  # counts the times the copy was marked stale

    def held(self, mode: str) -> Policy | None:
        """The copy, if it is current and of `mode`; None when it must be read."""
        policy = self._policy
        return policy if policy is not None and policy.mode == mode else None

    def mark_stale(self) -> None:
        with self._lock:
            self._policy = None
            self._generation += 1

    def read(self) -> Policy:
        """The copy, read from the database first when stale. Call it in a database thread."""
        policy = self.held(settings.RENDEZVOUS["PEER_POLICY"])
        return policy if policy is not None else self.refresh()

    def refresh(self) -> Policy:
        """The rules read from the database now, and kept. Call it in a database thread."""
        with self._lock:
            generation = self._generation
        policy = load()
        with self._lock:
            if generation == self._generation:
                self._policy = policy
        return policy


_rules = PeerRules()


async def current() -> Policy:
    """The rules every decision of this process reads: the copy held, or, when it is stale, the
    database's (read in a database thread). Under allow-all there is nothing to read."""
    mode = settings.RENDEZVOUS["PEER_POLICY"]
    if mode == ALLOW_ALL:
        return _ALLOW_ALL
    policy = _rules.held(mode)
    if policy is None:
        policy = await database_sync_to_async(_rules.read)()
    return policy


def mark_stale() -> None:
    """The next decision reads the rules from the database (a change was announced, or the
    database was emptied under the process, as between tests)."""
    _rules.mark_stale()


# ---- a change, announced ------------------------------------------------------------------------


def rules_changed(**_: object) -> None:
    """A peer rule was saved or deleted (post_save/post_delete): this process's copy is stale at
    once; once the change is committed it is stale again (a decision in between read the rows
    before the commit) and every instance is told."""
    _rules.mark_stale()
    transaction.on_commit(_committed)


def _committed() -> None:
    _rules.mark_stale()
    announce_change()


_announcing: set[asyncio.Task[None]] = set()


def announce_change() -> None:
    """Tell every instance that the peer rules changed: they read them again at once. From sync
    code or from a running loop; a failure is logged, and each instance's periodic check catches
    up within POLICY_CHECK_EVERY."""
    message = {"type": POLICY_CHANGED}
    layer = get_channel_layer()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    try:
        if loop is None:
            async_to_sync(layer.group_send)(POLICY_GROUP, message)
        else:
            task = loop.create_task(layer.group_send(POLICY_GROUP, message))
            _announcing.add(task)  # referenced until done: a bare task may be collected
            task.add_done_callback(_announcing.discard)
    except Exception:
        log.warning("the peer rules changed; instances will notice within %gs", POLICY_CHECK_EVERY)


# ---- an instance keeping up -------------------------------------------------------------------


class RulesWatch:
    """One instance keeping its copy of the rules current and the links it holds within them:
    the rules are read at start, on every change announced and every POLICY_CHECK_EVERY seconds,
    and each change is handed to `apply` (which ends the links no longer allowed)."""

    def __init__(
        self,
        *,
        channel_name: str,
        instance_id: Callable[[], str],
        apply: Callable[[Policy], Awaitable[int]],
    ) -> None:
        self._channel_name = channel_name
        self._instance_id = instance_id
        self._apply = apply
        self._applied: Policy | None = None  # what the links were last checked against
        self._lock: asyncio.Lock | None = None  # one reload at a time

    async def run(self) -> None:
        """Under `rules`, forever: stay in POLICY_GROUP and check the rules every few seconds."""
        if settings.RENDEZVOUS["PEER_POLICY"] == ALLOW_ALL:
            return  # rules do not matter: nothing to read, now or later
        layer = get_channel_layer()
        renewed: float | None = None  # not 0.0: the monotonic clock may start near zero
        while True:
            now = time.monotonic()
            if renewed is None or now - renewed > POLICY_GROUP_RENEW_EVERY:
                try:
                    await layer.group_add(POLICY_GROUP, self._channel_name)
                    renewed = now
                except Exception:
                    watch_log.warning(
                        "instance=%s cannot join the policy group", self._instance_id()
                    )
            await self.reload(only_if_changed=True)
            await asyncio.sleep(POLICY_CHECK_EVERY)

    async def reload(self, *, only_if_changed: bool = False) -> Policy:
        """Read the rules again and apply them to every connection held here: links the new
        rules no longer allow are ended."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._reload(only_if_changed)

    async def _reload(self, only_if_changed: bool) -> Policy:
        try:
            policy = await database_sync_to_async(_rules.refresh)()
        except Exception:
            watch_log.exception(
                "instance=%s cannot read the peer rules; kept the last", self._instance_id()
            )
            metrics.policy_error()
            return self._applied or DENY_ALL
        if only_if_changed and policy == self._applied:
            return policy
        self._applied = policy
        metrics.policy_reloaded()
        ended = await self._apply(policy)
        watch_log.info(
            "instance=%s peer policy %s: %d rule(s); %d link(s) no longer allowed, ended",
            self._instance_id(),
            policy.mode,
            len(policy.rules),
            ended,
        )
        return policy
