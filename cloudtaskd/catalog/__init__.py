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

from cloudtaskd.providers.base import Offer
from cloudtaskd.store import Store, Tx

Fetcher = Callable[[], Awaitable[list[Offer]]]


@dataclass(frozen=True, slots=True)
class Refreshed:
    provider: str
    offers: int
    error: str | None = None


def save(tx: Tx, provider: str, offers: Sequence[Offer]) -> None:
    tx.db.execute("DELETE FROM catalog WHERE provider = ?", (provider,))
    tx.db.executemany(
        "INSERT OR REPLACE INTO catalog (provider, zone, machine_type, spot, region, cpus, memory_gb, gpus,"
        " price_per_hour, arch, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(o.provider, o.zone, o.machine_type, int(o.spot), o.region, o.cpus, o.memory_gb, o.gpus, o.price_per_hour,
          o.arch, tx.now) for o in offers])
    tx.event("catalog_refreshed", detail=f"{provider}: {len(offers)} offers")


def load(db: Any) -> dict[str, list[Offer]]:
    """Every cached offer, by provider."""
    out: dict[str, list[Offer]] = {}
    for r in db.execute("SELECT provider, zone, machine_type, spot, region, cpus, memory_gb, gpus, price_per_hour,"
                        " arch FROM catalog ORDER BY provider, machine_type, zone, spot DESC"):
        out.setdefault(r[0], []).append(Offer(r[0], r[2], r[1], bool(r[3]), r[5], r[6], r[8], r[4], r[7], arch=r[9]))
    return out


def ages(db: Any, now: float | None = None) -> dict[str, float]:
    """Seconds since each provider's catalog was fetched."""
    now = time.time() if now is None else now
    return {r[0]: now - r[1] for r in db.execute("SELECT provider, min(fetched_at) FROM catalog GROUP BY provider")}


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
