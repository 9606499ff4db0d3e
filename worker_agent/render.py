"""What the command line prints: plain functions from the agent's replies to lines of text,
and the progress of a transfer (a bar with rate and ETA on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from .peerapi.files import human

BAR_WIDTH = 24
PLAIN_EVERY = 10.0  # seconds between progress lines when not on a terminal


def pong(event: dict[str, Any]) -> str:
    if event["event"] == "timeout":
        return f"timeout: no pong from {event['peer']} within {event['after']:g} s"
    address = event.get("address")
    via = event["kind"] + (f" {endpoint(address)}" if address else "")
    return f"pong from {event['peer']} via {via} in {event['ms']:.1f} ms"


def endpoint(address: Iterable[Any] | str | None) -> str:
    if address is None:
        return "-"
    if isinstance(address, str):
        return address
    host, port = list(address)[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def status(reply: dict[str, Any], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    worker = reply["worker"]
    nat = worker.get("nat") or {}
    observed = worker.get("observed_ip")
    lines = [
        f"worker     {worker['worker_id']} ({worker['state']}"
        + (f", connection {worker['connection_id']})" if worker.get("connection_id") else ")"),
        f"service    {worker['service_url']}",
        "address    "
        + (f"seen by the service as {observed}:{worker.get('observed_port')}" if observed else "-")
        + (f"; public {worker['public_ip']}" if worker.get("public_ip") else ""),
        "NAT        "
        + (f"{nat['mapping']}, UDP {nat['mapped'] or '-'}" if nat else "not checked (no STUN)"),
        f"exposed    {', '.join(reply.get('exposed') or []) or 'nothing'}",
    ]
    receiving = reply.get("receiving") or []
    folders = [r["dir"] + (f" (from {r['from']})" if r.get("from") else "") for r in receiving]
    lines.append("receiving  " + (", ".join(folders) or "no"))
    connections = reply.get("connections") or []
    if not connections:
        return [*lines, "", "no peer connections"]
    rows = [["peer", "path", "address", "since", "sent", "received", "rtt", "for"]]
    for c in connections:
        rows.append(
            [
                c["peer_id"],
                c.get("kind") or "none",
                endpoint(c.get("remote_address")),
                duration(now - c["opened_at"]),
                human(c["bytes_sent"]),
                human(c["bytes_received"]),
                _rtt(c),
                f"{c['use']}, opened by {c['opened_by']}",
            ]
        )
    return [*lines, "", *table(rows)]


def _rtt(connection: dict[str, Any]) -> str:
    """The latest ping's round trip, else QUIC's estimate (marked ~)."""
    if connection.get("ping_ms") is not None:
        return f"{connection['ping_ms']:.1f} ms"
    if connection.get("rtt_ms") is not None:
        return f"~{connection['rtt_ms']:.0f} ms"
    return "-"


def peers(reply: dict[str, Any]) -> list[str]:
    found = reply.get("peers") or []
    if not found:
        return ["no workers this one may reach"]
    rows = [["peer", "online", "NAT", "tags"]]
    for peer in found:
        online = peer.get("online", True)
        seen = peer.get("last_seen")
        rows.append(
            [
                peer["worker_id"],
                "yes" if online else "no" + (f" (last seen {_when(seen)})" if seen else ""),
                peer.get("nat_mapping") or "-",
                ",".join(peer.get("tags") or []) or "-",
            ]
        )
    return table(rows)


def _when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def netcheck(report: dict[str, Any]) -> list[str]:
    udp = report.get("udp")
    lines = [f"UDP          {'yes' if udp else 'no' if udp is False else 'not tested (no STUN)'}"]
    if report.get("mapping"):
        lines.append(
            f"NAT mapping  {report['mapping']}"
            + (f" (public {report['public_endpoint']})" if report.get("public_endpoint") else "")
        )
    for n, stun in enumerate(report.get("stun") or []):
        answer = f"{stun['mapped']} in {stun['ms']:.1f} ms" if stun.get("mapped") else stun["error"]
        lines.append(f"{'STUN' if n == 0 else '':<12} {stun['server']}: {answer}")
    rtt = report.get("service_rtt_ms")
    relay = {True: "relays", False: "does not relay", None: "relay unknown"}[report.get("relay")]
    lines.append(f"service      {relay}; round trip {'-' if rtt is None else f'{rtt:.1f} ms'}")
    for n, turn in enumerate(report.get("turn") or []):
        label = "TURN" if n == 0 else ""
        if not turn["reachable"]:
            lines.append(f"{label:<12} {turn['server']}: unreachable ({turn['error']})")
            continue
        if turn["allocated"]:
            allocation = f"allocated {turn['relayed']} in {turn['allocate_ms']:.1f} ms"
        else:
            allocation = f"allocation: {turn['allocate_error']}"
        lines.append(
            f"{label:<12} {turn['server']}: reachable in {turn['reachable_ms']:.1f} ms; "
            + allocation
        )
    if not report.get("turn"):
        lines.append("TURN         none (the service names no TURN server)")
    for n, expect in enumerate(report.get("expect") or []):
        label = "expect" if n == 0 else ""
        lines.append(f"{label:<12} {expect['kind']}: {expect['expected']} ({expect['why']})")
    return lines


class Progress:
    """A transfer's progress: a bar redrawn in place on a terminal, or a plain line now and
    then; rate and ETA over the last few seconds."""

    def __init__(self, out: TextIO, total: int, *, terminal: bool) -> None:
        self.out = out
        self.total = total
        self.terminal = terminal
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=50)
        self._last_plain = self.started
        self._drawn = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        self._samples.append((now, done))
        if self.terminal:
            self.out.write("\r" + self.line(done, now))
            self._drawn = True
            self.out.flush()
        elif now - self._last_plain >= PLAIN_EVERY:
            self._last_plain = now
            self.out.write(self.line(done, now).strip() + "\n")
            self.out.flush()

    def line(self, done: int, now: float) -> str:
        fraction = done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * fraction)
        rate = self.rate(now)
        left = (self.total - done) / rate if rate else None
        return (
            f"{100 * fraction:5.1f}% [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{human(done)} / {human(self.total)}  {rate / 1e6:6.1f} MB/s  "
            f"ETA {'-' if left is None else duration(left)}   "
        )

    def rate(self, now: float) -> float:
        recent = [(t, d) for t, d in self._samples if now - t <= 5.0]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def say(self, text: str) -> None:
        """A line of its own (a file done), below the bar."""
        if self._drawn:
            self.out.write("\r" + " " * 79 + "\r")
            self._drawn = False
        self.out.write(text + "\n")
        self.out.flush()
