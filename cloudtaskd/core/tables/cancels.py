"""The cancels table: a job being cancelled, its unfinished tasks cancelled a chunk at a time in
rowid order (tables/tasks.py cancel_chunk) from `cursor`; gone after the last chunk. Leasing skips
the tasks of every job listed here."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx


class Pending(NamedTuple):
    cursor: int  # the job's tasks at or below this rowid are done
    total: int  # its unfinished tasks when the cancel began
    done: int  # of those, cancelled so far


def start(tx: Tx, job_id: int, cursor: int, total: int) -> None:
    tx.db.execute("INSERT INTO cancels (job_id, cursor, total, started_at) VALUES (?, ?, ?, ?)",
                  (job_id, cursor, total, tx.now))


def pending(db: sqlite3.Connection, job_id: int) -> Pending | None:
    """How far the job's cancel is; None when none is under way."""
    row = db.execute("SELECT cursor, total, done FROM cancels WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else Pending(*row)


def advance(tx: Tx, job_id: int, cursor: int, cancelled: int) -> None:
    tx.db.execute("UPDATE cancels SET cursor = ?, done = done + ? WHERE job_id = ?", (cursor, cancelled, job_id))


def finish(tx: Tx, job_id: int) -> None:
    tx.db.execute("DELETE FROM cancels WHERE job_id = ?", (job_id,))


def jobs(db: sqlite3.Connection) -> list[int]:
    """Jobs whose cancel has chunks left, oldest first (a restart finishes them)."""
    return [int(r[0]) for r in db.execute("SELECT job_id FROM cancels ORDER BY started_at").fetchall()]
