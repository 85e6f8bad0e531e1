"""The uploads table: one task-file upload of a job, staging -> committing -> committed (or
rejected). Its rows are staged in tasks and made visible (or removed) a chunk at a time
(tables/tasks.py); a crash or a full disk part-way is settled from what these rows say."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from cloudtaskd.core.tables import rows
from cloudtaskd.core.tables.bulk import postgres
from cloudtaskd.errors import UploadBusy, UploadSettled

if TYPE_CHECKING:  # store.py's Tx; tables/tasks.py imports this module
    from cloudtaskd.core.tables.tx import Tx

# staging -> committing -> committed, or staging -> rejecting -> rejected: a rejection claims the
# upload (rejecting) before it deletes a row, so that a replica still receiving it (one that lost its
# claim, pg/upload_claims.py) can neither stage nor commit it meanwhile.
STAGING, COMMITTING, REJECTING = "staging", "committing", "rejecting"
COMMITTED, REJECTED = "committed", "rejected"
RECEIVING = (STAGING, COMMITTING, REJECTING)  # an upload under way: its job may not be deleted or withdrawn
_RECEIVING_SQL = "('staging', 'committing', 'rejecting')"  # also pg/sql/005's index uploads_one_under_way


def create(tx: Tx, job_id: int, upload_id: int | None = None) -> int:
    """A staging upload of the job. On PostgreSQL `upload_id` is one reserve_id() gave (this replica
    holds its claim already), and a job with an upload under way on any replica is refused."""
    if not postgres(tx.db):
        cur = tx.db.execute("INSERT INTO uploads (job_id, state, created_at) VALUES (?, 'staging', ?)"
                            " RETURNING id", (job_id, tx.now))
        return int(cur.fetchone()[0])
    # ON CONFLICT: the partial unique index uploads_one_under_way, without aborting the transaction.
    row = tx.db.execute("INSERT INTO uploads (id, job_id, state, created_at) VALUES (coalesce(?::bigint,"
                        " nextval(pg_get_serial_sequence('uploads', 'id'))), ?, 'staging', ?)"
                        " ON CONFLICT DO NOTHING RETURNING id", (upload_id, job_id, tx.now)).fetchone()
    if row is None:
        raise UploadBusy(job_id)
    return int(row[0])


def reserve_id(db: sqlite3.Connection) -> int:
    """PostgreSQL: the id the next upload will take, so that its claim is held before its row exists
    (a replica starting meanwhile must not find it unclaimed)."""
    return int(db.execute("SELECT nextval(pg_get_serial_sequence('uploads', 'id'))").fetchone()[0])


def add_staged(tx: Tx, job_id: int, n: int, start_after: int, last: int | None = None) -> None:
    """n more tasks staged for the job's staging upload, none of them at or below `start_after`;
    PostgreSQL: `last` the batch's newest id, where the upload's walk ends (end_id). Raises
    UploadSettled when the job has no staging upload (another replica settled it)."""
    if postgres(tx.db):
        cur = tx.db.execute("UPDATE uploads SET n_tasks = n_tasks + ?, start_after = least(coalesce(start_after, ?),"
                            " ?), end_id = greatest(coalesce(end_id, 0), ?) WHERE job_id = ? AND state = 'staging'",
                            (n, start_after, start_after, last, job_id))
    else:
        cur = tx.db.execute("UPDATE uploads SET n_tasks = n_tasks + ?, start_after = min(coalesce(start_after, ?), ?)"
                            " WHERE job_id = ? AND state = 'staging'", (n, start_after, start_after, job_id))
    if cur.rowcount != 1:
        raise UploadSettled(job_id)


def cover(tx: Tx, job_id: int, start_after: int, n: int) -> None:
    """Tasks queued directly (a standing queue's single tasks, tables/tasks.enqueue), none at or below
    `start_after`: a walk over the job's tasks from job_start must not miss them. A committed row
    records where they begin, unless one already starts below them (then nothing is written: a
    queue's later tasks only come above its first)."""
    tx.db.execute("INSERT INTO uploads (job_id, state, created_at, n_tasks, start_after)"
                  " SELECT ?, 'committed', ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM uploads WHERE job_id = ?"
                  " AND start_after IS NOT NULL AND start_after <= ?)",
                  (job_id, tx.now, n, start_after, job_id, start_after))


def set_committing(tx: Tx, upload_id: int, job_id: int) -> None:
    """Decided: queued whole from now on. Raises UploadSettled unless it is staging or committing
    (another replica rejects or rejected it)."""
    cur = tx.db.execute("UPDATE uploads SET state = 'committing' WHERE id = ? AND state IN ('staging', 'committing')",
                        (upload_id,))
    if cur.rowcount != 1:
        raise UploadSettled(job_id, upload_id)


def set_rejecting(tx: Tx, upload_id: int) -> bool:
    """Claim a staging upload for rejection (before any of its rows goes); False when it is no longer
    staging or rejecting: another replica settles (or settled) it, and its rows are not ours to delete."""
    return tx.db.execute("UPDATE uploads SET state = 'rejecting' WHERE id = ? AND state IN ('staging', 'rejecting')",
                         (upload_id,)).rowcount == 1


def set_state(tx: Tx, upload_id: int, state: str) -> bool:
    """committing -> committed or rejecting -> rejected; False when another replica ended it first."""
    before = {COMMITTED: COMMITTING, REJECTED: REJECTING}.get(state)
    if before is None:
        raise ValueError(f"an upload ends committed or rejected, not {state}")
    return tx.db.execute("UPDATE uploads SET state = ? WHERE id = ? AND state = ?",
                         (state, upload_id, before)).rowcount == 1


def end_id(db: sqlite3.Connection, upload_id: int) -> int | None:
    """PostgreSQL: the upload's newest staged row (None: none staged). Read in the walk's own
    transaction: a batch written after the walk began (a cancelled stage's, still in the executor)
    is counted too, and none comes after the rejection's claim."""
    row = db.execute("SELECT end_id FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


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
