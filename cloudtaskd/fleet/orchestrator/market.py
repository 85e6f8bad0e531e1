"""The market: every offer the configured providers can sell, priced from the catalog, ranked for a
task's needs. One owner for what the reconciler buys and what `cloudtaskctl prices` shows, so the
table a user sees is the choice the daemon makes.
"""

from __future__ import annotations

from typing import Any

import structlog

from cloudtaskd.core.store import Store
from cloudtaskd.fleet import catalog, interruptions
from cloudtaskd.fleet.orchestrator.selection import Candidate, Needs, Policy, rank
from cloudtaskd.fleet.providers.base import Offer, Provider

log = structlog.get_logger("cloudtaskd.market")

RATES_TTL_S = 60.0  # interruption rates move slowly; one read a minute, not one per tick


class Market:
    def __init__(self, store: Store, providers: list[Provider], fetchers: dict[str, catalog.Fetcher]) -> None:
        """providers in order of preference; fetchers: provider name -> its catalog fetch."""
        self.store = store
        self.providers = providers
        self.fetchers = fetchers
        self.rates: dict[str, float] = {}  # interruptions per instance-hour by offer key
        self._rates_at = float("-inf")

    async def observe(self, now: float | None = None, *, force: bool = False) -> None:
        """Re-read the interruption rates observed per offer (at most once a minute unless forced:
        a new notice forces it, so the next launch already avoids that offer)."""
        now = self.store.clock.now() if now is None else now  # the clock stored times are on (cloudtaskd.core.clock)
        if force or now - self._rates_at >= RATES_TTL_S:
            self.rates = await self.store.read(lambda db: interruptions.rates(db, now))
            self._rates_at = now

    async def load(self) -> None:
        """Hand each provider its cached catalog rows (they size and price its offers)."""
        cached = await self.store.read(catalog.load)
        for p in self.providers:
            if hasattr(p, "catalog"):
                p.catalog = cached.get(p.name, [])

    async def refresh(self) -> list[catalog.Refreshed]:
        results = await catalog.refresh(self.store, self.fetchers)
        for r in results:
            if r.error:
                log.warning("catalog_refresh_failed", provider=r.provider, error=r.error)
            else:
                log.info("catalog_refreshed", provider=r.provider, offers=r.offers)
        await self.load()
        return results

    def offers(self) -> list[Offer]:
        return [o for p in self.providers for o in p.offers()]

    def rank(self, needs: Needs, policy: Policy) -> list[Candidate]:
        """Spot offers weighed by the interruption rates of the last `observe`."""
        return rank(self.offers(), needs, policy, rates=self.rates)

    async def ages(self) -> dict[str, Any]:
        return await self.store.read(catalog.ages)
