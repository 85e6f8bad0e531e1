"""Per-offer back-off after the provider refused a launch (capacity, quota, any provider error).

The refused offer waits OFFER_BACKOFF_S, doubling to OFFER_BACKOFF_MAX_S on each further refusal,
while the next-best offer takes the instances; a launch that succeeds clears it. The instances of
one tick fail together (one batch), so refusals while already backing off do not count again.
Shared by the reconciler and the fleet simulator.
"""

from __future__ import annotations

OFFER_BACKOFF_S = 30.0
OFFER_BACKOFF_MAX_S = 1800.0


class OfferBackoff:
    def __init__(self) -> None:
        self._state: dict[str, tuple[int, float]] = {}  # offer key -> (consecutive refusals, not before)

    def blocked(self, key: str, now: float) -> bool:
        return self._state.get(key, (0, 0.0))[1] > now

    def until(self, key: str) -> float:
        """When the offer may be tried again (0: now)."""
        return self._state.get(key, (0, 0.0))[1]

    def refused(self, key: str, now: float) -> float | None:
        """Record a refusal; returns the new delay, or None when already backing off."""
        count, until = self._state.get(key, (0, 0.0))
        if until > now:
            return None
        delay = min(OFFER_BACKOFF_MAX_S, OFFER_BACKOFF_S * 2.0**count)
        self._state[key] = (count + 1, now + delay)
        return delay

    def succeeded(self, key: str) -> None:
        self._state.pop(key, None)

    def consecutive(self, key: str) -> int:
        return self._state.get(key, (0, 0.0))[0]
