"""Who may reach whom: the peer policy (docs/peer-policy.md).

`RENDEZVOUS_PEER_POLICY` is `allow-all` (any worker may ask to reach any other) or `rules`
(nothing is reachable unless an enabled rule allows it). A rule
says "these sources may reach these destinations"; each side is a list of selectors: `*` (any
worker), `tag:<tag>` (the workers with that tag) or a worker id. Rules only ever allow, and only
one way: adding a rule never takes reachability away, and A may reach B says nothing of B
reaching A.

Plain functions over plain values: the rules come from the database (peering/rules.py), the
decisions are made here, and a decision that cannot be made is a refusal (`decide` never fails
open) that says so (`Decision.error`, `Reach.error`): the callers count it
(peering/rules.py: `decide`, `reach_from`, `reach_to`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from registry.core import protocol

log = logging.getLogger("registry.policy")

ALLOW_ALL = "allow-all"
RULES = "rules"
MODES = (ALLOW_ALL, RULES)

NOT_EVALUATED = "the peer policy could not be evaluated; refused"  # an error is a refusal

ANY = "*"
TAG_PREFIX = "tag:"
MAX_SELECTORS = 100
_SPLIT = re.compile(r"[\s,]+")


class InvalidRule(ValueError):
    """A side of a rule that cannot be read; the message says what is wrong, for the form."""


@dataclass(frozen=True, slots=True)
class Selector:
    """One entry of a rule's side: any worker, the workers with a tag, or one worker."""

    kind: str  # "any", "tag" or "worker"
    value: str = ""

    def matches(self, subject: Subject) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "tag":
            return self.value in subject.tags
        return self.value == subject.worker_id

    def __str__(self) -> str:
        if self.kind == "any":
            return ANY
        return f"{TAG_PREFIX}{self.value}" if self.kind == "tag" else self.value


def parse_side(text: str) -> tuple[Selector, ...]:
    """`*`, `tag:<tag>` and worker ids, separated by commas or spaces; InvalidRule otherwise."""
    entries = [entry for entry in _SPLIT.split(text.strip()) if entry]
    if not entries:
        raise InvalidRule("name at least one worker id, tag:<tag>, or * for any worker")
    if len(entries) > MAX_SELECTORS:
        raise InvalidRule(f"at most {MAX_SELECTORS} entries on one side of a rule")
    selectors: list[Selector] = []
    for entry in entries:
        if entry == ANY:
            selector = Selector("any")
        elif entry.lower().startswith(TAG_PREFIX):
            tag = entry[len(TAG_PREFIX) :]
            if not protocol.is_valid_tag(tag):
                raise InvalidRule(f"{entry!r} is not a tag: tag: then {protocol.TAG_RULE}")
            selector = Selector("tag", tag.lower())  # tags are case-insensitive
        elif protocol.is_valid_worker_id(entry):
            selector = Selector("worker", entry)
        else:
            raise InvalidRule(
                f"{entry!r} is neither a worker id (1-128 of A-Z a-z 0-9 . _ -, starting with a "
                "letter or digit), nor tag:<tag>, nor *"
            )
        if selector not in selectors:
            selectors.append(selector)
    return tuple(selectors)


def format_side(selectors: Iterable[Selector]) -> str:
    return ", ".join(str(selector) for selector in selectors)


@dataclass(frozen=True, slots=True)
class Subject:
    """A worker as the policy sees it: its id and its tags (lower case)."""

    worker_id: str
    tags: frozenset[str] = frozenset()

    @classmethod
    def of(cls, worker_id: str, tags: Iterable[str] = ()) -> Subject:
        return cls(worker_id, frozenset(tag.lower() for tag in tags))


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    description: str
    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]

    def allows(self, source: Subject, destination: Subject) -> bool:
        return any(s.matches(source) for s in self.sources) and any(
            d.matches(destination) for d in self.destinations
        )

    def __str__(self) -> str:
        return f"rule #{self.id}" + (f" ({self.description})" if self.description else "")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: Rule | None = None
    error: bool = False  # no decision could be made (a refusal, which the caller counts)

    @property
    def by(self) -> str:
        """What decided, as the admin and the records show it."""
        if self.rule is not None:
            return str(self.rule)[:200]
        return self.reason[:200]


@dataclass(frozen=True, slots=True)
class Policy:
    mode: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def decide(self, source: Subject, destination: Subject) -> Decision:
        """May `source` ask to reach `destination`? Never raises: an error is a refusal."""
        try:
            return self._decide(source, destination)
        except Exception:
            log.exception(
                "peer policy: no decision for %s -> %s; refused",
                source.worker_id,
                destination.worker_id,
            )
            return Decision(False, NOT_EVALUATED, error=True)

    def _decide(self, source: Subject, destination: Subject) -> Decision:
        if self.mode == ALLOW_ALL:
            return Decision(True, "RENDEZVOUS_PEER_POLICY is allow-all")
        if self.mode != RULES:
            raise ValueError(f"unknown peer policy mode {self.mode!r}")
        for rule in self.rules:
            if rule.allows(source, destination):
                return Decision(True, f"allowed by {rule}", rule)
        return Decision(
            False,
            f"no peer policy rule lets {source.worker_id} reach {destination.worker_id}",
        )

    def allows(self, source: Subject, destination: Subject) -> bool:
        return self.decide(source, destination).allowed

    def reach_from(self, source: Subject) -> Reach:
        """Whom `source` may reach: the destinations of every rule one of whose sources it is.
        `reach_from(a).matches(b)` is `allows(a, b)`, in a form a query can use."""
        return self._reach(source, lambda rule: (rule.sources, rule.destinations))

    def reach_to(self, destination: Subject) -> Reach:
        """Who may reach `destination`: the sources of every rule it is a destination of."""
        return self._reach(destination, lambda rule: (rule.destinations, rule.sources))

    def _reach(
        self,
        subject: Subject,
        sides: Callable[[Rule], tuple[tuple[Selector, ...], tuple[Selector, ...]]],
    ) -> Reach:
        try:
            if self.mode == ALLOW_ALL:
                return Reach(any=True)
            if self.mode != RULES:
                raise ValueError(f"unknown peer policy mode {self.mode!r}")
            far: list[Selector] = []
            for rule in self.rules:
                near, other = sides(rule)
                if any(selector.matches(subject) for selector in near):
                    far.extend(other)
            return Reach.of(far)
        except Exception:
            log.exception("peer policy: no reach for %s; nobody", subject.worker_id)
            return Reach(error=True)


@dataclass(frozen=True, slots=True)
class Reach:
    """The workers across the rules from one worker (whom it may reach, or who may reach it),
    as selectors a database query can use: any worker, or these ids and these tags."""

    any: bool = False
    worker_ids: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    error: bool = False  # it could not be worked out: nobody (which the caller counts)

    @classmethod
    def of(cls, selectors: Iterable[Selector]) -> Reach:
        ids: set[str] = set()
        tags: set[str] = set()
        for selector in selectors:
            if selector.kind == "any":
                return cls(any=True)
            (tags if selector.kind == "tag" else ids).add(selector.value)
        return cls(worker_ids=frozenset(ids), tags=frozenset(tags))

    @property
    def nobody(self) -> bool:
        return not (self.any or self.worker_ids or self.tags)

    def matches(self, subject: Subject) -> bool:
        return (
            self.any
            or subject.worker_id in self.worker_ids
            or not self.tags.isdisjoint(subject.tags)
        )


DENY_ALL = Policy(RULES)  # what an instance holds when it cannot read the rules: nothing
