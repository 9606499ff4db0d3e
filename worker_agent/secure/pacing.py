"""QUIC's pacing, in bursts the agent's asyncio loop can space.

aioquic's pacer (a `QuicPacketPacer` in its loss recovery, `_loss._pacer`; aioquic 1.7, pinned,
its parts checked by tests/test_quic.py) lets a burst carry at most 16 packets and then asks to
be woken a few microseconds later. asyncio's timers wake no sooner than a millisecond later
(epoll's resolution), so every timer-driven burst is 16 packets and a connection whose packets
the timer releases is held near 16 packets a millisecond, however wide its window; each of those
bursts also costs a turn of the loop, a send and a wake-up of the peer. `Pacer` keeps aioquic's
rate (window over smoothed RTT) and lets a burst carry at least PACING_BURST seconds of it: on a
slow path that is a few packets, as before; on a fast one, a whole window.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.recovery import QuicPacketPacer

# The shortest a pacing timer can wait on asyncio's loop (epoll counts whole milliseconds) is
# what a paced burst may carry at least, in seconds at the pacing rate; 0 keeps aioquic's pacer.
PACING_BURST = 0.002


class Pacer(QuicPacketPacer):
    """aioquic's pacer, with bursts of at least PACING_BURST seconds' worth."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        self.bucket_max = max(self.bucket_max, PACING_BURST)


def install(recovery: Any, max_datagram_size: int) -> None:
    """Put a `Pacer` in aioquic's loss recovery of one connection (unless PACING_BURST is 0)."""
    if PACING_BURST:
        recovery._pacer = Pacer(max_datagram_size=max_datagram_size)
