"""The peer policy as the database holds it: the enabled rules (PeerRule rows) read into a
`Policy` (core/peer_policy.py) that decisions are made with."""

from __future__ import annotations

import logging

from django.conf import settings

from registry.core import peer_policy
from registry.core.peer_policy import Policy
from registry.models import PeerRule
from registry.ops import metrics

# The logger's name is the one operators' log pipelines know (docs/operations.md).
log = logging.getLogger("registry.selectors")


def load(mode: str | None = None) -> Policy:
    """The policy as the database holds it now: the enabled rules, by id. A stored rule that
    cannot be read (written around the admin's form) allows nothing; it is logged and counted."""
    mode = mode or settings.RENDEZVOUS["PEER_POLICY"]
    if mode == peer_policy.ALLOW_ALL:
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
