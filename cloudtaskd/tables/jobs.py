"""The jobs table: its per-state task counters (states.COUNTER), kept by the transactions that move
tasks (Tx.count buffers them, one UPDATE per job at commit)."""

from __future__ import annotations

import sqlite3

from cloudtaskd.states import COUNTER

_COUNTER_COLUMNS = frozenset(COUNTER.values())


def add_to_counters(db: sqlite3.Connection, job_id: int, delta: dict[str, int]) -> None:
    """Add each delta to its counter column (n_<state>) of one job."""
    if not _COUNTER_COLUMNS.issuperset(delta):  # column names are spliced into the SQL: only ours
        raise ValueError(f"not a counter column: {sorted(set(delta) - _COUNTER_COLUMNS)}")
    sets = ", ".join(f"{col} = {col} + ?" for col in delta)
    db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*delta.values(), job_id))
