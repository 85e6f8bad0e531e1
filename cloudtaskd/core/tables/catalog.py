"""The catalog table: each provider's offers (type, zone, spot or on-demand, size, list price) as
last fetched, with when. cloudtaskd/fleet/catalog/ fetches them and turns the rows into Offers."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx
    from cloudtaskd.fleet.providers.base import Offer


def replace(tx: Tx, provider: str, offers: Sequence[Offer]) -> None:
    """One provider's offers, all replaced in the caller's transaction (a failed fetch never gets here,
    so the previous catalog stays whole)."""
    tx.db.execute("DELETE FROM catalog WHERE provider = ?", (provider,))
    tx.db.executemany(
        # An offer listed twice in one fetch: the last one stands (both databases' upsert).
        "INSERT INTO catalog (provider, zone, machine_type, spot, region, cpus, memory_gb, gpus,"
        " price_per_hour, arch, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (provider, zone, machine_type, spot) DO UPDATE SET region = excluded.region,"
        " cpus = excluded.cpus, memory_gb = excluded.memory_gb, gpus = excluded.gpus,"
        " price_per_hour = excluded.price_per_hour, arch = excluded.arch, fetched_at = excluded.fetched_at",
        [(o.provider, o.zone, o.machine_type, int(o.spot), o.region, o.cpus, o.memory_gb, o.gpus, o.price_per_hour,
          o.arch, tx.now) for o in offers])


def offers(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every cached offer's columns, by provider, machine_type, zone, spot first."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT provider, zone, machine_type, spot, region, cpus, memory_gb, gpus, price_per_hour,"
        " arch FROM catalog ORDER BY provider, machine_type, zone, spot DESC").fetchall()
    return rows


def fetched_at(db: sqlite3.Connection) -> dict[str, float]:
    """When each provider's catalog was fetched (its oldest row)."""
    return {r["provider"]: r["fetched_at"] for r in db.execute(
        "SELECT provider, min(fetched_at) AS fetched_at FROM catalog GROUP BY provider")}
