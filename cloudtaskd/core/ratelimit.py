"""A token bucket: the control API's per-client limit (http/access.py) and each agent connection's
message rate (core/hub.py)."""

from __future__ import annotations


class TokenBucket:
    """`per_s` on average, bursts of up to `burst`."""

    __slots__ = ("at", "burst", "per_s", "tokens")

    def __init__(self, per_s: float, burst: float, now: float) -> None:
        self.per_s = per_s
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> float:
        """0 and one token spent if there is one, else the seconds until there will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < 1.0:
            return (1.0 - self.tokens) / self.per_s
        self.tokens -= 1.0
        return 0.0
