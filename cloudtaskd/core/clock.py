"""The daemon's clock: the wall time read once, when the daemon starts, advanced by the monotonic
clock. Every time the queue stores and compares (lease expiry, retry due times, started/finished
times, event timestamps) is read here, so a step of the machine's wall clock while the daemon runs
(an NTP step, a VM resumed, an operator's `date -s`) neither expires every live lease at once nor
stalls retries and expiry for as long as it stepped back (issue 15).

Stored times still have to mean something across a restart, so the clock is anchored on the wall
clock: between restarts, it keeps the offset the wall clock had at start. A step that happened while
the daemon was down is met at start-up (`queue.rebase_after_restart`). CLOCK_MONOTONIC is slewed by
NTP like the wall clock, so the two do not drift apart; only steps separate them (shown by
`wall_offset_s`, logged by the dispatcher).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DaemonClock:
    """Wall time at construction + monotonic time elapsed since. Cannot step while it runs."""

    __slots__ = ("_mono0", "_monotonic", "_wall", "_wall0")

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._monotonic = wall, monotonic
        self._wall0, self._mono0 = wall(), monotonic()

    def now(self) -> float:
        return self._wall0 + (self._monotonic() - self._mono0)

    def wall_offset_s(self) -> float:
        """How far the machine's wall clock has stepped since the daemon started (+: forward)."""
        return self._wall() - self.now()
