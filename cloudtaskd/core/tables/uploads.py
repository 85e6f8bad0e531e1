"""The uploads table: one task-file upload of a job, staging -> committing -> committed (or
rejected). Its rows are staged in tasks and made visible (or removed) a chunk at a time
(tables/tasks.py); a crash or a full disk part-way is settled from what these rows say."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from cloudtaskd.core.tables import rows
from cloudtaskd.core.tables.bulk import postgres

if TYPE_CHECKING:  # store.py's Tx; tables/tasks.py imports this module
    from cloudtaskd.core.tables.tx import Tx

STAGING, COMMITTING, COMMITTED, REJECTED = "staging", "committing", "committed", "rejected"
RECEIVING = (STAGING, COMMITTING)  # an upload under way: its job may not be deleted or withdrawn
_RECEIVING_SQL = "('staging', 'committing')"


def create(tx: Tx, job_id: int) -> int:
    cur = tx.db.execute("INSERT INTO uploads (job_id, state, created_at) VALUES (?, 'staging', ?) RETURNING id",
                        (job_id, tx.now))
    return int(cur.fetchone()[0])


def add_staged(tx: Tx, job_id: int, n: int, start_after: int) -> None:
    """n more tasks staged for the job's staging upload, none of them at or below `start_after`."""
    # SQLite's two-argument min() is PostgreSQL's least().
    smaller = "least" if postgres(tx.db) else "min"
    tx.db.execute(f"UPDATE uploads SET n_tasks = n_tasks + ?, start_after = {smaller}(coalesce(start_after, ?), ?)"
                  " WHERE job_id = ? AND state = 'staging'", (n, start_after, start_after, job_id))


def cover(tx: Tx, job_id: int, start_after: int, n: int) -> None:
    """Tasks queued directly (a standing queue's single tasks, tables/tasks.enqueue), none at or below
    `start_after`: a walk over the job's tasks from job_start must not miss them. A committed row
    records where they begin, unless one already starts below them (then nothing is written: a
    queue's later tasks only come above its first)."""
    tx.db.execute("INSERT INTO uploads (job_id, state, created_at, n_tasks, start_after)"
                  " SELECT ?, 'committed', ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM uploads WHERE job_id = ?"
                  " AND start_after IS NOT NULL AND start_after <= ?)",
                  (job_id, tx.now, n, start_after, job_id, start_after))


def set_committing(tx: Tx, upload_id: int) -> None:
    """Decided: queued whole from now on (a staging upload only)."""
    tx.db.execute("UPDATE uploads SET state = 'committing' WHERE id = ? AND state = 'staging'", (upload_id,))


def set_state(tx: Tx, upload_id: int, state: str) -> None:
    if state not in (COMMITTED, REJECTED):
        raise ValueError(f"an upload ends committed or rejected, not {state}")
    tx.db.execute("UPDATE uploads SET state = ? WHERE id = ?", (state, upload_id))


def n_tasks(db: sqlite3.Connection, upload_id: int) -> int:
    return int(db.execute("SELECT n_tasks FROM uploads WHERE id = ?", (upload_id,)).fetchone()[0])


def state_of(db: sqlite3.Connection, upload_id: int) -> str | None:
    row = db.execute("SELECT state FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return None if row is None else str(row[0])


def start_after(db: sqlite3.Connection, upload_id: int) -> int:
    """A rowid below the upload's first staged task (0 when unknown: the whole table)."""
    row = db.execute("SELECT start_after FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def job_start(db: sqlite3.Connection, job_id: int) -> int | None:
    """A rowid below every task of the job when each of its uploads recorded where it began, else None."""
    row = db.execute("SELECT min(start_after), count(*), count(start_after) FROM uploads WHERE job_id = ?",
                     (job_id,)).fetchone()
    return int(row[0]) if row[1] and row[1] == row[2] else None


def receiving(db: sqlite3.Connection, job_id: int) -> bool:
    """Whether an upload of the job is under way (staging or committing)."""
    return db.execute(f"SELECT 1 FROM uploads WHERE job_id = ? AND state IN {_RECEIVING_SQL}",
                      (job_id,)).fetchone() is not None


def unfinished(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """id, job_id, state of every upload under way (at start: a crash or a full disk left them)."""
    return rows.every(db, f"SELECT id, job_id, state FROM uploads WHERE state IN {_RECEIVING_SQL}")


def delete_of_job(tx: Tx, job_id: int) -> None:
    tx.db.execute("DELETE FROM uploads WHERE job_id = ?", (job_id,))
