"""The market: every offer the configured providers can sell, priced from the catalog, ranked for a
task's needs. One owner for what the reconciler buys and what `cloudtaskctl prices` shows, so the
table a user sees is the choice the daemon makes.
"""

from __future__ import annotations

from typing import Any

import structlog

from cloudtaskd import catalog
from cloudtaskd.orchestrator.selection import Candidate, Needs, Policy, rank
from cloudtaskd.providers.base import Offer, Provider
from cloudtaskd.store import Store

log = structlog.get_logger("cloudtaskd.market")


class Market:
    def __init__(self, store: Store, providers: list[Provider], fetchers: dict[str, catalog.Fetcher]) -> None:
        """providers in order of preference; fetchers: provider name -> its catalog fetch."""
        self.store = store
        self.providers = providers
        self.fetchers = fetchers

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

    def rank(self, needs: Needs, policy: Policy, rates: dict[str, float] | None = None) -> list[Candidate]:
        return rank(self.offers(), needs, policy, rates=rates)

    async def ages(self) -> dict[str, Any]:
        return await self.store.read(catalog.ages)
