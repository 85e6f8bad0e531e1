"""The pools table: one row per worker bundle (its digest, resolved spec and unpacked path); every
job and every instance serves exactly one pool."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from cloudtaskd.core.states import OPEN_TASK_STATES, counter_sum
from cloudtaskd.core.tables import rows
from cloudtaskd.core.tables.bulk import postgres

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx

_OPEN_COUNTERS = counter_sum(OPEN_TASK_STATES, "j.")  # a pool's outstanding tasks, summed over its jobs


def id_of(db: sqlite3.Connection, digest: str) -> int | None:
    row = db.execute("SELECT id FROM pools WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else int(row[0])


def by_digest(db: sqlite3.Connection, digest: str) -> sqlite3.Row | None:
    """id and spec (JSON text) of the worker with this digest."""
    return rows.one(db, "SELECT id, spec FROM pools WHERE digest = ?", (digest,))


def add(tx: Tx, digest: str, spec: str, path: str) -> int:
    cur = tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                        (digest, spec, path, tx.now))
    return int(cur.fetchone()[0])


def touch(tx: Tx, pool_id: int) -> None:
    """Its age starts anew (uploaded again): the pruner leaves it for the job about to use it."""
    tx.db.execute("UPDATE pools SET created_at = ? WHERE id = ?", (tx.now, pool_id))


def unused_before(db: sqlite3.Connection, cutoff: float) -> list[sqlite3.Row]:
    """id and digest of the pools made before `cutoff` that no job and no instance row names."""
    return rows.every(db, "SELECT p.id, p.digest FROM pools p WHERE p.created_at < ?"
                          " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.pool_id = p.id)"
                          " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.pool_id = p.id)", (cutoff,))


def delete_many(tx: Tx, ids: list[int]) -> None:
    tx.db.executemany("DELETE FROM pools WHERE id = ?", [(i,) for i in ids])


def with_active_jobs(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Each pool that has an active job: id, digest, spec, path, `outstanding` (its active jobs' open
    tasks), `queued`, `job_max` (its jobs' largest max_instances, 0: none) and `job_ids` (comma-separated)."""
    # CAST: PostgreSQL sums BIGINT as NUMERIC; its group_concat is string_agg, of text.
    ids = "string_agg(CAST(j.id AS TEXT), ',' ORDER BY j.id)" if postgres(db) else "group_concat(j.id)"
    return rows.every(db, "SELECT p.id, p.digest, p.spec, p.path,"
                          f" CAST(sum({_OPEN_COUNTERS}) AS BIGINT) AS outstanding,"
                          " CAST(sum(j.n_queued) AS BIGINT) AS queued, max(coalesce(j.max_instances, 0)) AS job_max,"
                          f" {ids} AS job_ids"
                          " FROM pools p JOIN jobs j ON j.pool_id = p.id WHERE j.state = 'active' GROUP BY p.id")
