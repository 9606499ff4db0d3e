"""Which side of an introduction probes for a hard NAT (RENDEZVOUS_HARD_NAT_PROBING=on).

ICE punches endpoint-independent NATs; it cannot reach a worker behind an endpoint-dependent
("symmetric") NAT from one that filters by address and port. When exactly one side's NAT report
says endpoint-dependent and the other's endpoint-independent, each side's introduction says its
part (`hard_nat`: `hard` or `easy`) and the agents probe (worker_agent/paths/probing.py: at most
a few hundred datagrams, three seconds). Two symmetric NATs, or a mapping not yet reported, get
nothing: probing cannot help them.
"""

from __future__ import annotations

from registry.core import protocol

HARD = "hard"
EASY = "easy"

_DEPENDENT = protocol.NatMapping.ENDPOINT_DEPENDENT.value
_INDEPENDENT = protocol.NatMapping.ENDPOINT_INDEPENDENT.value


def roles(requester_mapping: str, target_mapping: str) -> tuple[str | None, str | None]:
    """(the requester's role, the target's role) from their reported NAT mappings."""
    pair = (requester_mapping, target_mapping)
    if pair == (_DEPENDENT, _INDEPENDENT):
        return HARD, EASY
    if pair == (_INDEPENDENT, _DEPENDENT):
        return EASY, HARD
    return None, None
