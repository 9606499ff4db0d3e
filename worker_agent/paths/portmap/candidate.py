"""A port mapping as an ICE candidate (aioice's `Candidate`)."""

from __future__ import annotations

import aioice
from aioice.candidate import candidate_foundation, candidate_priority

from .manager import Mapping


def mapped_candidate(mapping: Mapping, base: aioice.Candidate) -> aioice.Candidate:
    """The mapped address as a server-reflexive candidate of `base` (the host socket it maps):
    RFC 8445 section 5.1.1.2 treats an address a NAT maps for the agent like one. Its foundation
    is its own (not the STUN candidate's of the same base), so both are checked."""
    host, port = mapping.external
    return aioice.Candidate(
        foundation=candidate_foundation("srflx", "udp", host),
        component=base.component,
        transport="udp",
        priority=candidate_priority(base.component, "srflx"),
        host=host,
        port=port,
        type="srflx",
        related_address=base.host,
        related_port=base.port,
    )
