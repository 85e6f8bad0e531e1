"""The jobs table: a job's row from its creation to its deletion, its state (active, paused,
cancelled) with the reason and cause of a pause, the `cloudtaskctl run` that owns it (run_id,
run_owner, submission: migration 015), and its per-state task counters (states.COUNTER), kept by
the transactions that move tasks (Tx.count buffers them, one UPDATE per job at commit)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from cloudtaskd.core.states import COUNTER, TASK_STATES, TERMINAL_TASK_STATES, WAITING_TASK_STATES, counter_sum
from cloudtaskd.core.tables import rows
from cloudtaskd.core.tables.bulk import postgres

if TYPE_CHECKING:  # store.py imports this module for Tx.flush
    from cloudtaskd.core.tables.tx import Tx

ACTIVE, PAUSED, CANCELLED = "active", "paused", "cancelled"  # jobs.state
OPEN, CLOSED = 1, 0  # jobs.is_open of a job created open (NULL: an ordinary job)
BUDGET, LAUNCH_FAILURES = "budget", "launch_failures"  # jobs.pause_cause (runs.RUN_GONE is the third)

_COUNTER_COLUMNS = frozenset(COUNTER.values())
_COUNTERS = ", ".join(COUNTER[s] for s in TASK_STATES)
_WAITING = counter_sum(WAITING_TASK_STATES)
_WAITING_J = counter_sum(WAITING_TASK_STATES, "j.")
_FINISHED = counter_sum(TERMINAL_TASK_STATES)
_WITH_WORKER = "SELECT j.*, p.digest FROM jobs j JOIN pools p ON p.id = j.pool_id"
_RECEIVING = "('staging', 'committing', 'rejecting')"  # uploads.RECEIVING, as SQL


def add_to_counters(db: sqlite3.Connection, job_id: int, delta: dict[str, int]) -> None:
    """Add each delta to its counter column (n_<state>) of one job."""
    if not _COUNTER_COLUMNS.issuperset(delta):  # column names are spliced into the SQL: only ours
        raise ValueError(f"not a counter column: {sorted(set(delta) - _COUNTER_COLUMNS)}")
    sets = ", ".join(f"{col} = {col} + ?" for col in delta)
    db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*delta.values(), job_id))


# ---- a job's life ---------------------------------------------------------------------------------


def create(tx: Tx, *, name: str, pool_id: int, max_attempts: int, timeout_s: float | None,
           max_instances: int | None, policy: str, max_total_cost: float | None, run_id: str | None,
           run_owner: str | None, submission: str | None, is_open: bool = False) -> int:
    """A new active job; its id is above every id a deleted job had (meta.last_job_id), so an id
    names one job, ever. is_open: a standing queue, active until closed (migration 016)."""
    larger = "greatest" if postgres(tx.db) else "max"  # SQLite's two-argument max() is PostgreSQL's greatest()
    cur = tx.db.execute(
        "INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, timeout_s, max_instances, policy,"
        " max_total_cost, run_id, run_owner, submission, is_open)"
        f" VALUES ({larger}(coalesce((SELECT max(id) FROM jobs), 0),"
        " coalesce((SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'last_job_id'), 0)) + 1, ?, ?, 'active', ?, ?,"
        " ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (name, pool_id, tx.now, max_attempts, timeout_s, max_instances, policy, max_total_cost,
         run_id, run_owner, submission, OPEN if is_open else None),
    )
    return int(cur.fetchone()[0])


def delete(tx: Tx, job_id: int) -> None:
    tx.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def cancel(tx: Tx, job_id: int) -> None:
    tx.db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?", (tx.now, job_id))


def close(tx: Tx, job_id: int) -> bool:
    """An open job takes no more tasks and finishes once those it has are done; False if it was not open."""
    return tx.db.execute("UPDATE jobs SET is_open = 0 WHERE id = ? AND is_open = 1", (job_id,)).rowcount == 1


def set_reason(tx: Tx, job_id: int, reason: str) -> None:
    tx.db.execute("UPDATE jobs SET state_reason = ? WHERE id = ?", (reason, job_id))


def set_finished(tx: Tx, job_id: int) -> None:
    tx.db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (tx.now, job_id))


def reactivate(tx: Tx, job_id: int) -> None:
    """Active and unfinished again (a retry queued its tasks anew)."""
    tx.db.execute("UPDATE jobs SET state = 'active', finished_at = NULL WHERE id = ?", (job_id,))


def pause(tx: Tx, job_id: int, reason: str, cause: str) -> bool:
    """Pause an active job, saying why (state_reason) and what for (pause_cause); False if it was not active."""
    cur = tx.db.execute("UPDATE jobs SET state = 'paused', state_reason = ?, pause_cause = ?"
                        " WHERE id = ? AND state = 'active'", (reason, cause, job_id))
    return cur.rowcount == 1


def resume_held(tx: Tx, job_id: int, cause: str) -> None:
    """A job paused for `cause` goes on (and one paused for another cause stays as it is)."""
    tx.db.execute("UPDATE jobs SET state = 'active', state_reason = NULL, pause_cause = NULL"
                  " WHERE id = ? AND state = 'paused' AND pause_cause = ?", (job_id, cause))


def resume_with_cap(tx: Tx, job_id: int, max_total_cost: float | None) -> None:
    """A paused job goes on under this cap, owned by no run from now on (runs.py)."""
    tx.db.execute("UPDATE jobs SET state = 'active', state_reason = NULL, pause_cause = NULL, max_total_cost = ?,"
                  " run_id = NULL WHERE id = ?", (max_total_cost, job_id))


def set_run(tx: Tx, job_id: int, run_id: str, owner: str) -> None:
    tx.db.execute("UPDATE jobs SET run_id = ?, run_owner = ? WHERE id = ?", (run_id, owner, job_id))


# ---- reads of one job -----------------------------------------------------------------------------


def exists(db: sqlite3.Connection, job_id: int) -> bool:
    return db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None


def state_of(db: sqlite3.Connection, job_id: int) -> str | None:
    row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else str(row[0])


def pool_of(db: sqlite3.Connection, job_id: int) -> int | None:
    row = db.execute("SELECT pool_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else int(row[0])


def counters(db: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    """id, state, pool_id, is_open and every counter column (n_<state>) of one job."""
    return rows.one(db, f"SELECT id, state, pool_id, is_open, {_COUNTERS} FROM jobs WHERE id = ?", (job_id,))


def for_upload(db: sqlite3.Connection, job_id: int, *, hold: bool = False) -> sqlite3.Row | None:
    """What staging a task needs of its job: id, pool_id, max_attempts, timeout_s, state, is_open.
    hold: on PostgreSQL, share-lock the row to the end of the transaction, so a close or cancel on
    another replica waits for the tasks being added (or they wait for it, and see it)."""
    lock = " FOR SHARE" if hold and postgres(db) else ""  # SQLite: one writer, nothing to race
    return rows.one(db, f"SELECT id, pool_id, max_attempts, timeout_s, state, is_open FROM jobs WHERE id = ?{lock}",
                    (job_id,))


def budget(db: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    """state, pool_id, created_at, max_total_cost of one job."""
    return rows.one(db, "SELECT state, pool_id, created_at, max_total_cost FROM jobs WHERE id = ?", (job_id,))


def run_of(db: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    """state, pause_cause, pool_id, run_id of one job."""
    return rows.one(db, "SELECT state, pause_cause, pool_id, run_id FROM jobs WHERE id = ?", (job_id,))


def with_worker(db: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    """The whole row of one job, with its worker's digest."""
    return rows.one(db, f"{_WITH_WORKER} WHERE j.id = ?", (job_id,))


# ---- reads of many --------------------------------------------------------------------------------


def newest_with_worker(db: sqlite3.Connection, submission: str | None = None, limit: int = 1000) -> list[sqlite3.Row]:
    """The newest jobs, whole, with their worker's digest; only those of one submission when given."""
    if submission is not None:
        return rows.every(db, f"{_WITH_WORKER} WHERE j.submission = ? ORDER BY j.id DESC LIMIT ?",
                          (submission, limit))
    return rows.every(db, f"{_WITH_WORKER} ORDER BY j.id DESC LIMIT ?", (limit,))


def newest_summaries(db: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The status page's jobs: id, pool_id, name, state, state_reason, created_at, finished_at, is_open,
    counters."""
    return rows.every(db, "SELECT id, pool_id, name, state, state_reason, created_at, finished_at, is_open,"
                          f" {_COUNTERS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))


def any_active(db: sqlite3.Connection, pool_id: int) -> bool:
    return db.execute("SELECT 1 FROM jobs WHERE pool_id = ? AND state = 'active'", (pool_id,)).fetchone() is not None


def active_ids(db: sqlite3.Connection, pool_id: int) -> list[int]:
    return [int(r[0]) for r in db.execute("SELECT id FROM jobs WHERE pool_id = ? AND state = 'active'",
                                          (pool_id,)).fetchall()]


def active_policies(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """pool_id and policy (JSON text) of every active job."""
    return rows.every(db, "SELECT pool_id, policy FROM jobs WHERE state = 'active'")


def active_capped(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """id, pool_id, created_at, max_total_cost of every active job with a cost cap."""
    return rows.every(db, "SELECT id, pool_id, created_at, max_total_cost FROM jobs WHERE state = 'active'"
                          " AND max_total_cost IS NOT NULL")


def unfinished_of_runs(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """id, run_id, run_owner of every active job a run submitted that still has unfinished tasks."""
    return rows.every(db, "SELECT id, run_id, run_owner FROM jobs WHERE run_id IS NOT NULL AND state = 'active'"
                          f" AND {_WAITING} > 0")


def finished_before(db: sqlite3.Connection, cutoff: float, limit: int = 100) -> list[int]:
    """Jobs over (nothing unfinished, not open for more, no cancel or upload under way) that finished
    before `cutoff` (the daemon clock): the job's finished_at when it has one (a cancel), else its
    last task's."""
    found = db.execute(
        f"SELECT j.id FROM jobs j WHERE {_WAITING_J} = 0 AND (coalesce(j.is_open, 0) = 0 OR j.state = 'cancelled')"
        " AND j.id NOT IN (SELECT job_id FROM cancels)"
        f" AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.job_id = j.id AND u.state IN {_RECEIVING})"
        " AND coalesce(j.finished_at, (SELECT max(t.finished_at) FROM tasks t WHERE t.job_id = j.id"
        " AND t.finished_at IS NOT NULL), j.created_at) < ?"
        " ORDER BY j.id LIMIT ?", (cutoff, limit)).fetchall()
    return [int(r[0]) for r in found]


def count_by_state(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Per job state (`done`: active with every task finished and not open, as cloudtaskctl status shows it):
    `state`, `jobs`, and the sum of each counter column (n_<state>)."""
    # CAST: PostgreSQL sums BIGINT columns as NUMERIC (a Decimal in Python); whole numbers on both.
    sums = ", ".join(f"CAST(sum({COUNTER[s]}) AS BIGINT) AS {COUNTER[s]}" for s in TASK_STATES)
    return rows.every(db, f"SELECT CASE WHEN state = 'active' AND {_WAITING} = 0 AND {_FINISHED} > 0"
                          " AND coalesce(is_open, 0) = 0 THEN 'done'"
                          f" ELSE state END AS state, count(*) AS jobs, {sums} FROM jobs GROUP BY 1")


def totals(db: sqlite3.Connection) -> sqlite3.Row:
    """Over every job: succeeded, dead, queued (with those waiting out a retry), leased."""
    row = rows.one(db, "SELECT CAST(coalesce(sum(n_succeeded), 0) AS BIGINT) AS succeeded,"
                       " CAST(coalesce(sum(n_dead), 0) AS BIGINT) AS dead,"
                       " CAST(coalesce(sum(n_queued + n_failed), 0) AS BIGINT) AS queued,"
                       " CAST(coalesce(sum(n_leased), 0) AS BIGINT) AS leased FROM jobs")
    assert row is not None  # an aggregate without GROUP BY answers one row
    return row


def every_counter(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """id and every counter column of every job (the store check)."""
    return rows.every(db, f"SELECT id, {_COUNTERS} FROM jobs")
