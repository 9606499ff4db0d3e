"""What the agent does after a connection ends: retry after a delay, or stop for good.

Plain data in, a decision out, so every rule is testable without a socket. The rules are the
ones `docs/agent.md` ("Connection life") documents.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire import FINAL_CLOSE_CODES, CloseCode
from .backoff import Backoff, Uniform

DEFAULT_SUPERSEDED_DELAY = 60.0
DEFAULT_MAX_SUPERSEDED = 3
# A connection held this long before being superseded is a takeover, not a fight: start counting
# again. It must exceed the longest superseded delay (1.5 x 60 s), or a fight would look stable.
DEFAULT_SUPERSEDED_RESET_AFTER = 600.0

FORBIDDEN = 403


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one connection attempt ended."""

    opened: bool = False  # the WebSocket handshake completed
    registered: bool = False  # the server's `welcome` arrived
    uptime: float = 0.0  # seconds the socket stayed open
    close_code: int | None = None  # from the `closing` frame, else the close frame
    close_reason: str | None = None
    handshake_status: int | None = None  # the HTTP status of a refused handshake


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay: float = 0.0
    final_state: str | None = None  # "refused" or "superseded" when retry is False
    reason: str = ""


class ReconnectPolicy:
    """Normal failures back off with full jitter; supersedes and refusals have their own rules."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        superseded_delay: float = DEFAULT_SUPERSEDED_DELAY,
        max_superseded: int | None = DEFAULT_MAX_SUPERSEDED,
        superseded_reset_after: float = DEFAULT_SUPERSEDED_RESET_AFTER,
        uniform: Uniform | None = None,
    ) -> None:
        if superseded_delay < 0:
            raise ValueError("superseded_delay must not be negative")
        if max_superseded is not None and max_superseded < 1:
            raise ValueError("max_superseded must be at least 1, or None for never")
        self.backoff = backoff or Backoff()
        self.superseded_delay = float(superseded_delay)
        self.max_superseded = max_superseded
        self.superseded_reset_after = float(superseded_reset_after)
        self.uniform: Uniform = uniform or self.backoff.uniform
        self.superseded_count = 0

    def after(self, outcome: Outcome) -> Decision:
        if outcome.handshake_status == FORBIDDEN:
            return Decision(
                retry=False,
                final_state="refused",
                reason="the server refused this worker id (HTTP 403)",
            )
        if outcome.close_code in FINAL_CLOSE_CODES:
            what = (
                "authentication failed"
                if outcome.close_code == CloseCode.AUTHENTICATION_FAILED
                else "this worker was disabled by an operator"
            )
            return Decision(
                retry=False,
                final_state="refused",
                reason=f"{what} (close {outcome.close_code}: "
                f"{outcome.close_reason or 'no reason given'})",
            )
        if outcome.close_code == CloseCode.SUPERSEDED:
            return self._after_superseded(outcome)
        if outcome.registered:
            # A session that ended for any other reason: whatever fight there was is over.
            self.superseded_count = 0
        if outcome.close_code != CloseCode.RATE_LIMITED:
            self.backoff.connection_lasted(outcome.uptime)
            if outcome.registered:
                self.backoff.registered_connection_ended()
        return Decision(retry=True, delay=self.backoff.next_delay(), reason=_describe(outcome))

    def _after_superseded(self, outcome: Outcome) -> Decision:
        if outcome.uptime >= self.superseded_reset_after:
            self.superseded_count = 0
        self.superseded_count += 1
        if self.max_superseded is not None and self.superseded_count >= self.max_superseded:
            return Decision(
                retry=False,
                final_state="superseded",
                reason=(
                    f"superseded {self.superseded_count} times in a row: another process "
                    "uses this worker id; giving it up"
                ),
            )
        delay = self.uniform(0.5 * self.superseded_delay, 1.5 * self.superseded_delay)
        return Decision(
            retry=True,
            delay=max(0.0, delay),
            reason=f"superseded by another connection ({self.superseded_count} in a row)",
        )


def _describe(outcome: Outcome) -> str:
    if outcome.handshake_status is not None:
        return f"handshake refused with HTTP {outcome.handshake_status}"
    if not outcome.opened:
        return "could not connect"
    if outcome.close_code is None:
        return "connection lost"
    try:
        name = CloseCode(outcome.close_code).name
    except ValueError:
        name = "close code"
    return f"closed by the server ({name} {outcome.close_code})"
