"""The events table: the rows a transaction buffered (Tx.event), written at its commit; the event
log's reads (GET /v1/events, the status page's errors, a job's results in the order they finished)
and its pruning.

Two partial indexes serve the hot reads, and each names its kinds in its WHERE: a kind added to
ERROR_KINDS or FINISHED_KINDS needs a migration that re-creates its index, or the read scans."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudtaskd.core.states import OPEN_TASK_STATES, TaskEvent, sql_in
from cloudtaskd.core.tables.bulk import bulk, postgres, sqlite_hint
from cloudtaskd.core.tables.rows import RESULT_COLUMNS

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx

# (ts, kind, job_id, task_id, instance_id, detail): the order Tx.event buffers a row in.
_INSERT = ("INSERT INTO events (ts, kind, job_id, task_id, instance_id, detail) SELECT r.value->>0,"
           " r.value->>1, r.value->>2, r.value->>3, r.value->>4, r.value->>5 FROM json_each(?) AS r")
_INSERT_PG = ("INSERT INTO events (ts, kind, job_id, task_id, instance_id, detail) SELECT (r.value->>0)::float8,"
              " r.value->>1, (r.value->>2)::bigint, (r.value->>3)::bigint, r.value->>4, r.value->>5"
              " FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS r(value, n) ORDER BY n")

# The events the status page lists as errors: migration 009's index events_errors, term for term.
ERROR_KINDS = ("task_failed", "task_dead", "lease_expired", "lease_expired_dead", "instance_launch_failed",
               "instance_start_failed", "instance_lost", "job_paused", "spot_interruption", "offer_blocked")
ERROR_KINDS_SQL = " OR ".join(f"kind = '{k}'" for k in ERROR_KINDS)
# The events that finish a task, in migration 010's order (index events_finished); the results
# stream of a job reads them, so they stay as long as the job does.
FINISHED_KINDS = (TaskEvent.SUCCEEDED.value, TaskEvent.FAILED_DEAD.value, TaskEvent.LEASE_EXPIRED_DEAD.value,
                  TaskEvent.CANCELLED.value)
FINISHED_KINDS_SQL = " OR ".join(f"kind = '{k}'" for k in FINISHED_KINDS)
_FINISHED_IN = ", ".join(f"'{k}'" for k in FINISHED_KINDS)
_OPEN_SQL = sql_in(OPEN_TASK_STATES)


def insert_many(db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
    bulk(db, _INSERT_PG if postgres(db) else _INSERT, rows)


# ---- the event log (GET /v1/events, the status page) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a reader wants: any of `kinds` (none: all), of a job (its own events and those of
    the instances serving its worker), of an instance."""

    kinds: Sequence[str] = ()
    job: int | None = None
    instance: str | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """The filter as `AND ...` terms and their parameters."""
        where, params = "", list[Any]()
        if self.kinds:
            where += f" AND kind IN ({', '.join('?' * len(self.kinds))})"
            params.extend(self.kinds)
        if self.job is not None:
            # The instances launched and failed for its worker: what a person following the job wants.
            where += (" AND (job_id = ? OR instance_id IN"
                      " (SELECT i.id FROM instances i JOIN jobs j ON j.pool_id = i.pool_id WHERE j.id = ?))")
            params.extend((self.job, self.job))
        if self.instance is not None:
            where += " AND instance_id = ?"
            params.append(self.instance)
        return where, params


def last_id(db: sqlite3.Connection) -> int:
    """The newest event's id (0: none yet); ids only grow."""
    return int(db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])


def page(db: sqlite3.Connection, after: int, where: Filter, limit: int) -> list[sqlite3.Row]:
    """Up to `limit` matching events after id `after`, oldest first, every column."""
    terms, params = where.sql()
    rows: list[sqlite3.Row] = db.execute(f"SELECT * FROM events WHERE id > ?{terms} ORDER BY id LIMIT ?",
                                         (after, *params, limit)).fetchall()
    return rows


def tail(db: sqlite3.Connection, where: Filter, n: int) -> list[sqlite3.Row]:
    """The newest `n` matching events, oldest first."""
    terms, params = where.sql()
    rows: list[sqlite3.Row] = db.execute(f"SELECT * FROM (SELECT * FROM events WHERE true{terms} ORDER BY id DESC"
                                         " LIMIT ?) AS newest ORDER BY id", (*params, n)).fetchall()
    return rows


def latest_errors(db: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The newest error events (ERROR_KINDS), newest first, through their partial index."""
    hint = sqlite_hint(db, " INDEXED BY events_errors")  # PostgreSQL picks its partial index by itself
    rows: list[sqlite3.Row] = db.execute(f"SELECT * FROM events{hint} WHERE {ERROR_KINDS_SQL}"
                                         " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return rows


# ---- a job's results in the order they finished (cloudtaskd/http/feeds.py) --------------------------


@functools.cache
def _finished_sql(hint: str) -> str:
    # One statement per hint (SQLite's partial index by name; none on PostgreSQL), built once.
    return (f"SELECT e.id AS seq, e.kind AS kind, {', '.join('t.' + c for c in RESULT_COLUMNS.split(', '))}"
            f" FROM (SELECT id, kind, task_id FROM events{hint} WHERE job_id = ? AND id > ?"
            f" AND ({FINISHED_KINDS_SQL}) ORDER BY id LIMIT ?) AS e JOIN tasks t ON t.id = e.task_id ORDER BY e.id")


def finished(db: sqlite3.Connection, job_id: int, after: int, limit: int) -> list[sqlite3.Row]:
    """Up to `limit` task-finishing events of a job after id `after`, in order, each with its task's
    result columns now (tables.rows.RESULT_COLUMNS) and `seq` (the event's id) and `kind`."""
    rows: list[sqlite3.Row] = db.execute(_finished_sql(sqlite_hint(db, " INDEXED BY events_finished")),
                                         (job_id, after, limit)).fetchall()
    return rows


def newest_finished(db: sqlite3.Connection, job_id: int) -> int:
    """The id of the job's latest task-finishing event (0: none)."""
    hint = sqlite_hint(db, " INDEXED BY events_finished")
    return int(db.execute(f"SELECT coalesce(max(id), 0) FROM events{hint} WHERE job_id = ?"
                          f" AND ({FINISHED_KINDS_SQL})", (job_id,)).fetchone()[0])


# ---- written by SQL from the tasks (a cancel's chunk) and removed with a job ---------------------


def add_cancelled(tx: Tx, job_id: int, after: int, end: int) -> None:
    """A task_cancelled event for each open task of the job with an id in (after, end]: by SQL, one
    statement per chunk (a 1M-task cancel writes no event row from Python). NOT INDEXED: a rowid
    range (tables/tasks.py's cancel_chunk says why)."""
    walk = sqlite_hint(tx.db, " NOT INDEXED")
    tx.db.execute("INSERT INTO events (ts, kind, job_id, task_id, instance_id) SELECT ?,"
                  f" '{TaskEvent.CANCELLED.value}', job_id, id, instance_id FROM tasks{walk}"
                  f" WHERE id > ? AND id <= ? AND job_id = ? AND state IN {_OPEN_SQL}", (tx.now, after, end, job_id))
    tx.sql_events = True


def delete_of_job(tx: Tx, job_id: int) -> None:
    """Every event of one job at once (a withdrawn job, which never held a task: a few rows)."""
    tx.db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))


# ---- pruning (cloudtaskd/core/retention.py): spans of ids, a short transaction each ---------------------


def cursor_before_first(db: sqlite3.Connection) -> int:
    """The id just before the oldest event (0 when there is none): where a walk over all starts."""
    return int(db.execute("SELECT coalesce(min(id), 1) - 1 FROM events").fetchone()[0])


def delete_job_span(tx: Tx, job_id: int, after: int, end: int) -> None:
    """A deleted job's events with an id in (after, end] (a rowid walk, NOT INDEXED)."""
    walk = sqlite_hint(tx.db, " NOT INDEXED")
    tx.db.execute(f"DELETE FROM events{walk} WHERE id > ? AND id <= ? AND job_id = ?", (after, end, job_id))


def first_young(tx: Tx, after: int, end: int, older_than: float, count_bound: int) -> int | None:
    """The first id in (after, end] of an event neither older than `older_than` nor at or below
    `count_bound`: a pruning walk stops before it. None: every event there may go."""
    walk = sqlite_hint(tx.db, " NOT INDEXED")  # a rowid range; PostgreSQL walks its primary key
    row = tx.db.execute(f"SELECT min(id) FROM events{walk} WHERE id > ? AND id <= ? AND ts >= ? AND id > ?",
                        (after, end, older_than, count_bound)).fetchone()
    return None if row[0] is None else int(row[0])


def prune_span(tx: Tx, after: int, stop: int) -> int:
    """Delete the events with an id in (after, stop] but those that finished a task of a job still
    held (its results stream reads them); returns how many went."""
    walk = sqlite_hint(tx.db, " NOT INDEXED")
    return int(tx.db.execute(
        f"DELETE FROM events{walk} WHERE id > ? AND id <= ? AND NOT (kind IN ({_FINISHED_IN})"
        " AND job_id IN (SELECT id FROM jobs))", (after, stop)).rowcount)
