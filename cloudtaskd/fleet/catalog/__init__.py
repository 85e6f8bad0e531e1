"""The catalog of offers: what each cloud sells (type, zone, spot or on-demand), its size and its
list price, fetched from the cloud's own APIs and cached in the state database with its age.

A refresh replaces one provider's rows in one transaction, so a failed fetch leaves the previous
catalog in place (stale, with its age shown) rather than an empty or half one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import catalog as table
from cloudtaskd.fleet.providers.base import Offer

Fetcher = Callable[[], Awaitable[list[Offer]]]


@dataclass(frozen=True, slots=True)
class Refreshed:
    provider: str
    offers: int
    error: str | None = None


def save(tx: Tx, provider: str, offers: Sequence[Offer]) -> None:
    table.replace(tx, provider, offers)
    tx.event("catalog_refreshed", detail=f"{provider}: {len(offers)} offers")


def load(db: Any) -> dict[str, list[Offer]]:
    """Every cached offer, by provider."""
    out: dict[str, list[Offer]] = {}
    for r in table.offers(db):
        out.setdefault(r["provider"], []).append(Offer(
            provider=r["provider"], machine_type=r["machine_type"], zone=r["zone"], spot=bool(r["spot"]),
            cpus=r["cpus"], memory_gb=r["memory_gb"], price_per_hour=r["price_per_hour"], region=r["region"],
            gpus=r["gpus"], arch=r["arch"]))
    return out


def ages(db: Any, now: float | None = None) -> dict[str, float]:
    """Seconds since each provider's catalog was fetched."""
    now = time.time() if now is None else now
    return {provider: now - at for provider, at in table.fetched_at(db).items()}


async def refresh(store: Store, fetchers: dict[str, Fetcher]) -> list[Refreshed]:
    """Fetch every provider's offers (one failing does not stop the others) and store each whole."""
    results = []
    for provider, fetch in fetchers.items():
        try:
            offers = await fetch()
        except Exception as exc:
            results.append(Refreshed(provider, 0, str(exc)))
            continue
        await store.write(save, provider, offers)
        results.append(Refreshed(provider, len(offers)))
    return results
