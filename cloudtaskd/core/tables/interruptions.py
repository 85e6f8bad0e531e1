"""The interruptions table: one row per spot notice (an interruption or a rebalance recommendation)
per instance and kind; cloudtaskd/fleet/interruptions.py decides what a notice does."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from cloudtaskd.core.tables.bulk import postgres

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx

INTERRUPTION = "interruption"  # a kind: the cloud takes the instance ("rebalance": it may)


def add(tx: Tx, instance_id: str, offer_key: str, kind: str, source: str, deadline: float | None,
        detail: str) -> bool:
    """Record a notice noticed now; False when this instance already has one of this kind (an agent
    resends it after a reconnect)."""
    cur = tx.db.execute(
        "INSERT INTO interruptions (instance_id, offer_key, kind, source, noticed_at, deadline, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance_id, kind) DO NOTHING",
        (instance_id, offer_key, kind, source, tx.now, deadline, detail))
    return cur.rowcount != 0


def recent(db: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The latest notices, newest first: instance_id, offer_key, kind, source, noticed_at, deadline, detail."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT instance_id, offer_key, kind, source, noticed_at, deadline, detail FROM interruptions"
        " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return rows


def interruptions_by_provider(db: sqlite3.Connection) -> dict[str, int]:
    """Interruptions (not rebalances) ever recorded, by provider (the offer key's first part)."""
    # PostgreSQL has no instr(); split_part is its way to the text before the first '/'.
    provider = ("split_part(offer_key, '/', 1)" if postgres(db) else
                "substr(offer_key, 1, instr(offer_key, '/') - 1)")
    return {r["provider"]: r["n"] for r in db.execute(
        f"SELECT {provider} AS provider, count(*) AS n FROM interruptions"
        f" WHERE kind = '{INTERRUPTION}' GROUP BY 1")}
