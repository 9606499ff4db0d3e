"""`netcheck`: what this machine's network lets its agent do, before any peer is chosen, as
`tailscale netcheck` says it: UDP or not, how the NAT maps, each STUN server's answer and
latency, the service's round trip (the first hop of its relay), TURN reachable and allocatable,
and which path kinds to expect.

What it cannot test alone: a TURN allocation needs credentials, which the service mints per
introduction only; with an introduction at hand (a connection open, or `--peer`) its
credentials are used, otherwise the allocation is reported untested and why. The service relay
needs a peer at the other end: its round trip is the service's own, measured with a heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .paths import netcheck as stun_check
from .paths import turncheck
from .wire import NatMapping, parse_host_port

Endpoint = tuple[str, int]


async def check(
    *,
    stun_servers: Sequence[Endpoint],
    turn_servers: Sequence[str],
    credentials: turncheck.Credentials | None,
    use_udp: bool,
    timeout: float = stun_check.DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """The UDP half of the report (STUN and TURN), run on the agent's peer loop."""
    nat = None
    if use_udp and stun_servers:
        nat = await stun_check.classify_nat(list(stun_servers), timeout=timeout)
    turns = []
    if use_udp:
        targets = [parse_host_port(text) for text in turn_servers]
        turns = await asyncio.gather(*(turncheck.check(t, credentials, timeout) for t in targets))
    return {
        "nat": None if nat is None else nat.as_dict(),
        "turn": [_turn_row(t, credentials is not None) for t in turns],
    }


def _turn_row(result: turncheck.TurnCheck, had_credentials: bool) -> dict[str, Any]:
    row = asdict(result)
    row["server"] = _format(result.server)
    row["relayed"] = _format(result.relayed) if result.relayed else None
    if result.reachable and not had_credentials:
        row["allocate_error"] = (
            "not tried: the service hands out TURN credentials with introductions only (connect "
            "to a peer first, or run netcheck --peer PEER)"
        )
    return row


def report(
    udp_half: dict[str, Any],
    *,
    stun_servers: Sequence[Endpoint],
    service_rtt: float | None,
    relay: bool | None,
    use_udp: bool,
) -> dict[str, Any]:
    """The whole report: the UDP half, the service's round trip, and what to expect."""
    nat = udp_half["nat"]
    udp = bool(nat and nat["mapped"])
    return {
        "udp": udp if use_udp and stun_servers else None,
        "mapping": nat["mapping"] if nat else None,
        "public_endpoint": nat["mapped"] if nat else None,
        "local_endpoint": nat["local"] if nat else None,
        "stun": [_stun_row(r) for r in nat["results"]] if nat else [],
        "service_rtt_ms": None if service_rtt is None else round(1000 * service_rtt, 2),
        "relay": relay,
        "turn": udp_half["turn"],
        "expect": expectations(
            udp=udp,
            mapping=nat["mapping"] if nat else None,
            stun=bool(stun_servers),
            turn=udp_half["turn"],
            relay=relay,
            use_udp=use_udp,
        ),
    }


def _stun_row(result: dict[str, Any]) -> dict[str, Any]:
    elapsed = result.get("elapsed")
    return {
        "server": result["server"],
        "mapped": result["mapped"],
        "ms": None if elapsed is None else round(1000 * elapsed, 2),
        "error": result["error"],
    }


def expectations(
    *,
    udp: bool,
    mapping: str | None,
    stun: bool,
    turn: list[dict[str, Any]],
    relay: bool | None,
    use_udp: bool,
) -> list[dict[str, str]]:
    """Each path kind: `yes`, `likely`, `maybe`, `unlikely` or `no`, and why."""

    def row(kind: str, expected: str, why: str) -> dict[str, str]:
        return {"kind": kind, "expected": expected, "why": why}

    if not use_udp:
        off = "this agent sends no UDP (peer_udp=False)"
        rows = [row("lan", "no", off), row("direct", "no", off), row("turn", "no", off)]
    else:
        rows = [row("lan", "yes", "with peers on this machine's own networks")]
        if not stun:
            rows.append(row("direct", "maybe", "no STUN server to ask: the service names none"))
        elif not udp:
            rows.append(row("direct", "no", "no STUN server answered: UDP seems blocked"))
        elif mapping == NatMapping.ENDPOINT_INDEPENDENT:
            rows.append(row("direct", "yes", "the NAT maps one port for every destination"))
        elif mapping == NatMapping.ENDPOINT_DEPENDENT:
            rows.append(
                row("direct", "unlikely", "the NAT maps a new port per destination (symmetric): "
                    "only peers with an open or full-cone address are reached directly")
            )  # fmt: skip
        else:
            rows.append(row("direct", "maybe", "one STUN answer only: the mapping is unknown"))
        rows.append(_turn_expectation(turn))
    if relay is None:
        rows.append(row("relay", "maybe", "the service does not say (an older version)"))
    else:
        rows.append(
            row("relay", "yes", "the service relays over this agent's WebSocket")
            if relay
            else row("relay", "no", "the service does not relay (RENDEZVOUS_RELAY=off)")
        )
    return rows


def _turn_expectation(turn: list[dict[str, Any]]) -> dict[str, str]:
    if not turn:
        return {"kind": "turn", "expected": "no", "why": "the service names no TURN server"}
    first = turn[0]  # the agents use the first
    if not first["reachable"]:
        return {"kind": "turn", "expected": "no", "why": f"{first['server']}: {first['error']}"}
    if first["allocated"]:
        return {
            "kind": "turn",
            "expected": "yes",
            "why": f"{first['server']} granted an allocation",
        }
    if first["allocated"] is False:
        why = f"{first['server']} refused an allocation: {first['allocate_error']}"
        return {"kind": "turn", "expected": "no", "why": why}
    why = f"{first['server']} answers; the allocation was not tried (no credentials)"
    return {"kind": "turn", "expected": "likely", "why": why}


def _format(endpoint: tuple[Any, ...]) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
