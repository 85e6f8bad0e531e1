"""The purges table: a deleted job whose tasks and events are removed a chunk at a time
(retention.purge_chunk), from cursors kept here so a restart goes on where the last chunk ended."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx


class Cursors(NamedTuple):
    task_cursor: int  # its tasks at or below this rowid are gone
    task_last: int  # the highest task rowid when it was deleted: the walk ends here
    event_cursor: int  # as task_cursor, for its events (0: not started)
    event_last: int


def start(tx: Tx, job_id: int, *, task_cursor: int, task_last: int, event_last: int, tasks: int) -> None:
    tx.db.execute("INSERT INTO purges (job_id, task_cursor, task_last, event_cursor, event_last, tasks, started_at)"
                  " VALUES (?, ?, ?, 0, ?, ?, ?)", (job_id, task_cursor, task_last, event_last, tasks, tx.now))


def cursors(db: sqlite3.Connection, job_id: int) -> Cursors | None:
    row = db.execute("SELECT task_cursor, task_last, event_cursor, event_last FROM purges WHERE job_id = ?",
                     (job_id,)).fetchone()
    return None if row is None else Cursors(*row)


def set_task_cursor(tx: Tx, job_id: int, cursor: int) -> None:
    tx.db.execute("UPDATE purges SET task_cursor = ? WHERE job_id = ?", (cursor, job_id))


def set_event_cursor(tx: Tx, job_id: int, cursor: int) -> None:
    tx.db.execute("UPDATE purges SET event_cursor = ? WHERE job_id = ?", (cursor, job_id))


def finish(tx: Tx, job_id: int) -> int:
    """The purge is over: its row goes. Returns how many tasks the job held."""
    return int(tx.db.execute("DELETE FROM purges WHERE job_id = ? RETURNING tasks", (job_id,)).fetchone()[0])


def jobs(db: sqlite3.Connection) -> list[int]:
    """Deleted jobs whose rows are still being removed, oldest first."""
    return [int(r[0]) for r in db.execute("SELECT job_id FROM purges ORDER BY started_at").fetchall()]
