"""The task lifecycle on top of the store: stage, queue, lease, heartbeat, complete, fail,
hand back, expire, retry, cancel.

Each function here runs inside one write transaction (`Store.write`) and moves tasks only
along the edges of `states.TASK_TRANSITIONS`, guarded by `WHERE state = ... AND attempt = ?`
so a report carrying a stale fencing token can never overwrite a newer attempt. Reports are
checked in one SELECT per batch and applied with one statement over a JSON array (tables.bulk):
the work per task is a few microseconds of C, which is what lets one daemon core dispatch tens of
thousands of tasks/s.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cloudtask_wire import jsonx
from cloudtask_wire.frames import task_entry
from cloudtask_wire.messages import Failure, LeaseRef, Success
from cloudtaskd.core import states
from cloudtaskd.core.states import TaskEvent as E
from cloudtaskd.core.states import TaskState as S
from cloudtaskd.core.states import task_edge
from cloudtaskd.core.tables import cancels, events, jobs, rows, uploads
from cloudtaskd.core.tables.bulk import bulk, postgres
from cloudtaskd.core.tables.rows import RESULT_COLUMNS
from cloudtaskd.core.tables.tx import Doors, Tx
from cloudtaskd.core.taskfile import MAX_ID_CHARS, ParsedTask
from cloudtaskd.errors import BadInput, CloudtaskError, TransitionError, no_job

# Every bulk statement below names its edge once, checked against the table at import.
for _src, _dst in [
    (S.STAGED, S.QUEUED), (S.QUEUED, S.LEASED), (S.LEASED, S.SUCCEEDED), (S.LEASED, S.FAILED),
    (S.LEASED, S.DEAD), (S.LEASED, S.QUEUED), (S.FAILED, S.QUEUED), (S.QUEUED, S.CANCELLED),
    (S.LEASED, S.CANCELLED), (S.FAILED, S.CANCELLED), (S.DEAD, S.QUEUED), (S.CANCELLED, S.QUEUED),
]:
    task_edge(_src, _dst)

STAGE_BATCH = 5000
COMMIT_CHUNK = 50_000  # SQLite: staged rows an upload's commit moves per transaction
# PostgreSQL: ids of the primary key an upload's commit walks per transaction (at most that many rows
# move); sized so one holds the writer ~100 - 200 ms here (docs/performance.md, "On PostgreSQL").
COMMIT_STEP_PG = 5_000
# A lease granted and then not held by the agent at its next hello this many times in a row (the
# grant lost with its connection) fails the attempt instead of requeueing it once more.
MAX_LOST_GRANTS = 3


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with +-20% jitter, so a burst of failures does not retry in lockstep."""
    delay = min(max_s, base_s * (2 ** max(0, failures - 1)))
    return float(delay * random.uniform(0.8, 1.2))


def _ids_json(ids: list[int]) -> str:
    return jsonx.dumps(ids)


# ---- ingest -----------------------------------------------------------------------------------


def create_upload(tx: Tx, job_id: int, upload_id: int | None = None) -> int:
    state = jobs.state_of(tx.db, job_id)
    if state is None:
        raise no_job(job_id)
    if state != jobs.ACTIVE:
        raise BadInput(f"job {job_id} is {state}; tasks can only be added to an active job")
    return uploads.create(tx, job_id, upload_id)


def stage_tasks(tx: Tx, job: dict[str, Any], batch: list[ParsedTask], source: str) -> None:
    """Insert a batch as staged (invisible to leasing); a duplicate id is refused with its line."""
    rows = [
        (
            job["id"], job["pool_id"], t.key, S.STAGED.value, t.priority, t.data_json,
            t.timeout_s if t.timeout_s is not None else job["timeout_s"],
            t.max_attempts or job["max_attempts"],
        )
        for t in batch
    ]
    tx.db.execute("SAVEPOINT stage")
    if postgres(tx.db):
        # A clash skips its row instead of failing the transaction (which PostgreSQL would abort):
        # fewer ids back than rows sent is the same refusal.
        ids = [r[0] for r in tx.db.execute(_STAGE_PG, (jsonx.dumps(rows),)).fetchall()]
        if len(ids) < len(rows):
            tx.db.execute("ROLLBACK TO stage")
            raise _duplicate_error(tx.db, job["id"], batch, source)
        # Ids come from a sequence shared by the replicas: not consecutive, but each above the
        # upload's start while its rows stay staged.
        first, last = min(ids), max(ids)
    else:
        try:
            tx.db.executemany(
                "INSERT INTO tasks (job_id, pool_id, key, state, priority, data, timeout_s, max_attempts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        except sqlite3.IntegrityError:
            # Undo the rows of this batch inserted before the clash, then find the offending line.
            tx.db.execute("ROLLBACK TO stage")
            raise _duplicate_error(tx.db, job["id"], batch, source) from None
        # Where the commit's rowid walk starts: below this batch's first row. A batch's rows take
        # consecutive rowids (one writer, max + 1 each), and every later row of the upload comes
        # above its own earlier rows, which stay until the commit.
        first = int(tx.db.execute("SELECT last_insert_rowid()").fetchone()[0]) - len(rows) + 1
        last = None  # SQLite's walk has no upper bound
    tx.db.execute("RELEASE stage")
    tx.count(job["id"], None, S.STAGED, len(rows))
    uploads.add_staged(tx, job["id"], len(rows), first - 1, last)


_STAGE_PG = (
    "INSERT INTO tasks (job_id, pool_id, key, state, priority, data, timeout_s, max_attempts)"
    " SELECT (r.value->>0)::bigint, (r.value->>1)::bigint, r.value->>2, r.value->>3, (r.value->>4)::int,"
    " r.value->>5, (r.value->>6)::float8, (r.value->>7)::int"
    " FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS r(value, n) ORDER BY n"
    " ON CONFLICT (job_id, key) DO NOTHING RETURNING id")


# ---- a standing queue: single tasks, queued as they come ----------------------------------------

MAX_COPIES = 10_000  # copies of one task a single request may queue (?copies=N)


class Enqueued(NamedTuple):
    """A single-task request's outcome: the job's pool (to wake dispatch) and each task's (row id, key)."""

    pool_id: int
    tasks: list[tuple[int, str]]


_QUEUED = states.sql_lit(S.QUEUED)
# The rows are queued at once (no staging: a single request is validated whole before it is sent).
# A clash on (job_id, key) skips its row rather than fail the statement: fewer rows back is the refusal.
_ENQUEUE = (
    "INSERT INTO tasks (job_id, pool_id, key, state, priority, data, timeout_s, max_attempts)"
    f" SELECT r.value->>0, r.value->>1, r.value->>2, {_QUEUED}, r.value->>3, r.value->>4, r.value->>5,"
    " r.value->>6 FROM json_each(?) AS r WHERE true"  # WHERE: SQLite's parser needs it before ON CONFLICT
    " ON CONFLICT (job_id, key) DO NOTHING RETURNING id, key",
    "INSERT INTO tasks (job_id, pool_id, key, state, priority, data, timeout_s, max_attempts)"
    f" SELECT (r.value->>0)::bigint, (r.value->>1)::bigint, r.value->>2, {_QUEUED}, (r.value->>3)::int,"
    " r.value->>4, (r.value->>5)::float8, (r.value->>6)::int"
    " FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS r(value, n) ORDER BY n"
    " ON CONFLICT (job_id, key) DO NOTHING RETURNING id, key",
)
# A task sent without an id is named by its row id, known once inserted. A user's key in the same job
# that spells that number leaves the row out (NOT EXISTS): fewer rows back is the refusal.
_NAME_BY_ID = (
    "UPDATE tasks SET key = CAST(id AS TEXT) WHERE id IN (SELECT value FROM json_each(?))"
    " AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.job_id = tasks.job_id AND t.key = CAST(tasks.id AS TEXT))"
    " RETURNING id, key",
    "UPDATE tasks SET key = CAST(id AS TEXT) WHERE id = ANY(?::bigint[])"
    " AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.job_id = tasks.job_id AND t.key = CAST(tasks.id AS TEXT))"
    " RETURNING id, key",
)


def enqueue(tx: Tx, job_id: int, task: ParsedTask, copies: int | None = None) -> Enqueued:
    """Queue one task (or `copies` copies of it) in this one transaction: a standing queue's
    enqueue, with a task file's validation (done by the caller) and its refusal of a duplicate id.
    Keys: the task's id; with `copies`, that id suffixed -1 .. -N; a task without an id is named
    by its row id. Nothing is queued when any copy is refused."""
    job = jobs.for_upload(tx.db, job_id, hold=True)
    if job is None:
        raise no_job(job_id)
    if job["state"] != jobs.ACTIVE:
        raise BadInput(f"job {job_id} is {job['state']}; tasks can only be added to an active job")
    if job["is_open"] == jobs.CLOSED:
        raise BadInput(f"job {job_id} is closed: it takes no more tasks (create another open job for more)")
    n = 1 if copies is None else copies
    if not 1 <= n <= MAX_COPIES:
        raise BadInput(f"copies must be between 1 and {MAX_COPIES}, got {n}", field="copies")
    auto = not task.key
    if auto:
        # Placeholders, unique to this request (replicas insert at once on PostgreSQL), renamed below.
        stamp = f"\x01{secrets.token_hex(8)}:"
        keys = [f"{stamp}{i}" for i in range(n)]
    elif copies is None:
        keys = [task.key]
    else:
        keys = [f"{task.key}-{i}" for i in range(1, n + 1)]
        if len(keys[-1]) > MAX_ID_CHARS:
            raise BadInput(f'"id" with its iteration suffix ({keys[-1][-8:]!r}) is longer than {MAX_ID_CHARS}'
                           " characters: give a shorter id", field="id")
    timeout_s = task.timeout_s if task.timeout_s is not None else job["timeout_s"]
    attempts = task.max_attempts or job["max_attempts"]
    rows = [(job_id, job["pool_id"], key, task.priority, task.data_json, timeout_s, attempts) for key in keys]
    pg = postgres(tx.db)
    tx.db.execute("SAVEPOINT enqueue")
    got = tx.db.execute(_ENQUEUE[pg], (jsonx.dumps(rows),)).fetchall()
    if len(got) < len(rows):
        tx.db.execute("ROLLBACK TO enqueue")
        taken = sorted(set(keys) - {r[1] for r in got})
        raise BadInput(f"duplicate id {taken[0]!r}: the job already has a task with this id", field="id")
    ids = [int(r[0]) for r in got]
    if auto:
        named = tx.db.execute(_NAME_BY_ID[pg], (ids if pg else jsonx.dumps(ids),)).fetchall()
        if len(named) < len(ids):
            tx.db.execute("ROLLBACK TO enqueue")
            clash = sorted(set(ids) - {int(r[0]) for r in named})[0]
            raise BadInput(f"the task would be named {clash}, its number, but the job already has a task with"
                           ' that id: give the task an "id" of its own', field="id")
        out = sorted((int(r[0]), str(r[1])) for r in named)
    else:
        order = {key: i for i, key in enumerate(keys)}
        out = sorted(((int(r[0]), str(r[1])) for r in got), key=lambda t: order[t[1]])
    tx.db.execute("RELEASE enqueue")
    tx.count(job_id, None, S.QUEUED, n)
    # Where a walk over the job's tasks starts (a cancel, a delete's purge): below these rows too.
    uploads.cover(tx, job_id, min(ids) - 1, n)
    return Enqueued(int(job["pool_id"]), out)


def _duplicate_error(db: sqlite3.Connection, job_id: int, batch: list[ParsedTask], source: str) -> BadInput:
    seen: dict[str, int] = {}
    for t in batch:
        if t.key in seen:
            return BadInput(f"{source}:{t.line}: duplicate id {t.key!r} (first given at line {seen[t.key]})",
                            line=t.line, field="id")
        seen[t.key] = t.line
    keys = ("SELECT jsonb_array_elements_text(?::jsonb)" if postgres(db) else "SELECT value FROM json_each(?)")
    existing = {
        r[0]
        for r in db.execute(
            f"SELECT key FROM tasks WHERE job_id = ? AND key IN ({keys})",
            (job_id, jsonx.dumps(list(seen))),
        )
    }
    for t in batch:
        if t.key in existing:
            return BadInput(f"{source}:{t.line}: duplicate id {t.key!r} (already in this file or job)",
                            line=t.line, field="id")
    return BadInput(f"{source}: a task violates a database constraint")  # not reachable in practice


def _staged_chunk(tx: Tx, job_id: int, after_id: int, limit: int, action: str,
                  params: tuple[Any, ...] = ()) -> list[int]:
    # NOT INDEXED: walk the rowid range from the cursor, which starts where the table ended when
    # the upload began. Through the (job_id, key) index each chunk would rescan every row already
    # moved (quadratic over a million-task upload); a partial index on staged rows costs ~30 %
    # of ingest speed.
    sql = (f"{action} WHERE id IN (SELECT id FROM tasks{_not_indexed(tx.db)} WHERE id > ? AND job_id = ?"
           " AND state = 'staged' ORDER BY id LIMIT ?) RETURNING id")
    return [r[0] for r in tx.db.execute(sql, (*params, after_id, job_id, limit)).fetchall()]


def _staged_walk(tx: Tx, upload_id: int, job_id: int, after_id: int, limit: int | None, action: str,
                 params: tuple[Any, ...] = ()) -> tuple[list[int], int | None]:
    """The next chunk of the job's staged tasks after the cursor `after_id`, moved by `action`: their
    ids, and the cursor after them (None: the upload's last staged row is behind it). The job's
    staged rows are this upload's: one upload under way per job (pg: uploads_one_under_way)."""
    if postgres(tx.db):
        # A range of the primary key, `limit` ids wide, however many of them are this upload's (other
        # jobs' rows may sit in between): one index range scan, the same size from the first chunk to
        # the last. The form SQLite takes (the next `limit` staged rows after the cursor, found by a
        # subquery) is planned here as a scan of the whole job (stale statistics) or of the whole
        # table (fresh ones); one chunk of 50,000 held the writer 0.9 - 2.2 s while rounds waited.
        # `job_id + 0`: not through the (job_id, key) index, which statistics taken before the upload
        # price at one row for this job, and which then reads the whole job every chunk (measured:
        # 0.3 - 0.6 s a chunk of 5,000 ids at 1M tasks, against 40 - 70 ms through the primary key).
        # The walk ends at the upload's own newest row, read in this transaction (uploads.end_id).
        end_id = uploads.end_id(tx.db, upload_id)
        if end_id is None or end_id <= after_id:
            return [], None
        step = limit or COMMIT_STEP_PG
        upper = after_id + step
        ids = [r[0] for r in tx.db.execute(
            f"{action} WHERE id > ? AND id <= ? AND job_id + 0 = ? AND state = 'staged' RETURNING id",
            (*params, after_id, upper, job_id)).fetchall()]
        return ids, (upper if upper < end_id else None)
    chunk = limit or COMMIT_CHUNK
    ids = _staged_chunk(tx, job_id, after_id, chunk, action, params)
    return ids, (max(ids) if len(ids) == chunk else None)


def _not_indexed(db: sqlite3.Connection) -> str:
    """SQLite's hint for a rowid walk (see _staged_chunk); PostgreSQL's planner walks the primary key."""
    return "" if postgres(db) else " NOT INDEXED"


def reject_upload_chunk(tx: Tx, upload_id: int, job_id: int, after_id: int = 0,
                        limit: int | None = None) -> int | None:
    """Delete a chunk of a refused upload's staged tasks. Returns the cursor, None when done (or when
    another replica settles the upload: it is not this one's to delete)."""
    if not uploads.set_rejecting(tx, upload_id):
        return None
    ids, cursor = _staged_walk(tx, upload_id, job_id, after_id, limit, "DELETE FROM tasks")
    tx.count(job_id, S.STAGED, None, len(ids))
    if cursor is None:
        uploads.set_state(tx, upload_id, uploads.REJECTED)
    return cursor


def commit_upload_chunk(tx: Tx, upload_id: int, job_id: int, after_id: int = 0,
                        limit: int | None = None) -> int | None:
    """Make a chunk of staged tasks visible. The upload was validated whole before the first
    chunk; a crash part-way is finished at start-up. Returns the cursor, None when done. Raises
    UploadSettled when another replica rejects (or rejected) it."""
    uploads.set_committing(tx, upload_id, job_id)
    if jobs.state_of(tx.db, job_id) == jobs.CANCELLED:
        # Cancelled while the upload streamed in: what arrives is recorded, as cancelled, never run.
        ids, cursor = _staged_walk(tx, upload_id, job_id, after_id, limit,
                                   "UPDATE tasks SET state = 'cancelled', finished_at = ?", (tx.now,))
        tx.count(job_id, S.STAGED, S.CANCELLED, len(ids))
        for task_id in ids:  # as cancel_job: a follower of the job's results reads these events
            tx.event(E.CANCELLED.value, job_id=job_id, task_id=task_id)
    else:
        ids, cursor = _staged_walk(tx, upload_id, job_id, after_id, limit, "UPDATE tasks SET state = 'queued'")
        tx.count(job_id, S.STAGED, S.QUEUED, len(ids))
    # Two replicas may both walk a committing upload (one lost its claim): the row moves once, and
    # only the one that ends it writes the event.
    if cursor is None and uploads.set_state(tx, upload_id, uploads.COMMITTED):
        n = uploads.n_tasks(tx.db, upload_id)
        tx.event(E.UPLOAD_COMMITTED.value, job_id=job_id, detail=jsonx.dumps({"tasks": n, "upload": upload_id}))
    return cursor


def upload_span(db: sqlite3.Connection, upload_id: int) -> tuple[int, int]:
    """Where a walk starts (below the upload's first staged row), and where it ends as far as is known
    now: on PostgreSQL the upload's newest staged row (the walk rereads it each chunk), on SQLite the
    table's newest (its walk has no upper bound). Every staged row of the upload stays staged until
    the walk moves it, so a restart finishes the walk from the start. Nothing staged: end = start."""
    start = uploads.start_after(db, upload_id)
    if not uploads.n_tasks(db, upload_id):
        return start, start
    return start, (uploads.end_id(db, upload_id) or start) if postgres(db) else last_id(db)


async def finish_upload(store: Doors, upload_id: int, job_id: int, *, commit: bool,
                        limit: int | None = None) -> None:
    """Queue (commit=True) or discard a staged upload, one short transaction per chunk so that
    dispatch keeps running between them. `limit`: the chunk (SQLite: rows; PostgreSQL: ids of the
    walked range), else the dialect's default."""
    step = commit_upload_chunk if commit else reject_upload_chunk
    cursor = await store.read(lambda db: uploads.start_after(db, upload_id))
    next_cursor: int | None = cursor
    while next_cursor is not None:
        next_cursor = await store.write(step, upload_id, job_id, next_cursor, limit)
    if commit:
        # The round's statements on PostgreSQL are planned from its statistics of the table, which
        # autovacuum refreshes a minute or more after a bulk change: until then a table that held few
        # queued tasks is planned as such, and every round scans all the queued (or all the) rows to
        # find the few hundred it leases or records (docs/performance.md, "On PostgreSQL"). Asked
        # for, not awaited: it runs in the store's background, the answer does not wait for it.
        store.analyze("tasks", await store.read(lambda db: uploads.n_tasks(db, upload_id)))


# ---- dispatch ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Reports:
    """Everything agents reported since the last round, by instance."""

    done: list[tuple[str, Success]] = field(default_factory=list)
    failed: list[tuple[str, Failure]] = field(default_factory=list)
    handback: list[tuple[str, LeaseRef]] = field(default_factory=list)
    heartbeat: list[tuple[str, LeaseRef]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.done or self.failed or self.handback or self.heartbeat)

    def merge_front(self, older: Reports) -> None:
        """Put the reports of a failed round back ahead of those that arrived since."""
        self.done[:0] = older.done
        self.failed[:0] = older.failed
        self.handback[:0] = older.handback
        self.heartbeat[:0] = older.heartbeat


@dataclass(slots=True)
class RoundResult:
    accepted: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    refused: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # heartbeats for leases the instance no longer holds
    lost: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    grants: dict[str, list[str]] = field(default_factory=dict)  # instance -> encoded task objects
    requeued_pools: set[int] = field(default_factory=set)
    expired: list[tuple[int, str | None]] = field(default_factory=list)  # (task, instance) leases timed out


class Live(NamedTuple):
    """A task as a round's reports find it (_current): the columns the fence and the counters need."""

    id: int
    job_id: int
    state: str
    attempt: int  # the fencing token of its lease
    failures: int
    max_attempts: int
    pool_id: int
    instance_id: str | None


_LIVE_SQL = (f"SELECT json_group_array(json_array({', '.join(Live._fields)}))"
             " FROM tasks WHERE id IN (SELECT value FROM json_each(?))")
# Locked until the round commits, in id order (two replicas' rounds wait, never deadlock, on one row):
# what the fence read is what the round's UPDATEs find, whatever another replica does meanwhile.
_LIVE_SQL_PG = f"SELECT {', '.join(Live._fields)} FROM tasks WHERE id = ANY(?::bigint[]) ORDER BY id FOR UPDATE"
_new_tuple = tuple.__new__  # Live from a decoded list at tuple speed: Live(*r) costs twice as much


def _current(db: sqlite3.Connection, ids: list[int]) -> dict[int, Live]:
    if postgres(db):
        return {r[0]: _new_tuple(Live, r) for r in db.execute(_LIVE_SQL_PG, (ids,)).fetchall()}
    # One row of JSON, not a row per task: one sqlite3 step, one GIL hand-back (see tables.bulk).
    text = db.execute(_LIVE_SQL, (_ids_json(ids),)).fetchone()[0]
    return {r[0]: _new_tuple(Live, r) for r in jsonx.loads(text)}


def _moved(row: Live, state: S) -> Live:
    """The row as the round leaves it (a duplicate report in the same batch then finds it moved)."""
    return _new_tuple(Live, (row.id, row.job_id, state, *row[3:]))


def _holds(row: Live | None, token: int, instance_id: str) -> bool:
    """The fence, on a _current row: leased, on this attempt, to this instance. Tokens are attempt
    numbers, easy to guess, so another instance's report, heartbeat or hello (a bug, a compromised
    machine) must not land on a lease it does not hold."""
    return row is not None and row.state == S.LEASED and row.attempt == token and row.instance_id == instance_id


# The round's bulk statements, (SQLite, PostgreSQL): the same JSON rows, read by json_each there and
# jsonb_array_elements here, whose ->> gives text that PostgreSQL wants cast to the column's type.
_EXTEND = (
    "UPDATE tasks SET lease_expires_at = r.value->>0, lost_grants = 0 FROM json_each(?) AS r"
    " WHERE tasks.id = r.value->>1 AND tasks.attempt = r.value->>2 AND tasks.state = 'leased'",
    "UPDATE tasks SET lease_expires_at = (r.value->>0)::float8, lost_grants = 0"
    " FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>1)::bigint AND tasks.attempt = (r.value->>2)::int AND tasks.state = 'leased'",
)
_SUCCEEDED = (
    "UPDATE tasks SET state = 'succeeded', result = r.value->>0, finished_at = r.value->>1,"
    " duration_s = r.value->>2, instance_id = r.value->>3, lease_expires_at = NULL FROM json_each(?) AS r"
    " WHERE tasks.id = r.value->>4 AND tasks.attempt = r.value->>5 AND tasks.state = 'leased'",
    "UPDATE tasks SET state = 'succeeded', result = r.value->>0, finished_at = (r.value->>1)::float8,"
    " duration_s = (r.value->>2)::float8, instance_id = r.value->>3, lease_expires_at = NULL"
    " FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>4)::bigint AND tasks.attempt = (r.value->>5)::int AND tasks.state = 'leased'",
)
_FAILED = (
    "UPDATE tasks SET state = 'failed', failures = failures + 1, lost_grants = 0, error = r.value->>0,"
    " run_at = r.value->>1, duration_s = r.value->>2, instance_id = r.value->>3, lease_expires_at = NULL"
    " FROM json_each(?) AS r WHERE tasks.id = r.value->>4 AND tasks.attempt = r.value->>5"
    " AND tasks.state = 'leased'",
    "UPDATE tasks SET state = 'failed', failures = failures + 1, lost_grants = 0, error = r.value->>0,"
    " run_at = (r.value->>1)::float8, duration_s = (r.value->>2)::float8, instance_id = r.value->>3,"
    " lease_expires_at = NULL FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>4)::bigint AND tasks.attempt = (r.value->>5)::int AND tasks.state = 'leased'",
)
_DEAD = (
    "UPDATE tasks SET state = 'dead', failures = failures + 1, lost_grants = 0, error = r.value->>0,"
    " finished_at = r.value->>1, duration_s = r.value->>2, instance_id = r.value->>3,"
    " lease_expires_at = NULL FROM json_each(?) AS r WHERE tasks.id = r.value->>4"
    " AND tasks.attempt = r.value->>5 AND tasks.state = 'leased'",
    "UPDATE tasks SET state = 'dead', failures = failures + 1, lost_grants = 0, error = r.value->>0,"
    " finished_at = (r.value->>1)::float8, duration_s = (r.value->>2)::float8, instance_id = r.value->>3,"
    " lease_expires_at = NULL FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>4)::bigint AND tasks.attempt = (r.value->>5)::int AND tasks.state = 'leased'",
)
_HANDED_BACK = (
    "UPDATE tasks SET state = 'queued', instance_id = NULL, lease_expires_at = NULL"
    " FROM json_each(?) AS r WHERE tasks.id = r.value->>0 AND tasks.attempt = r.value->>1"
    " AND tasks.state = 'leased'",
    "UPDATE tasks SET state = 'queued', instance_id = NULL, lease_expires_at = NULL"
    " FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>0)::bigint AND tasks.attempt = (r.value->>1)::int AND tasks.state = 'leased'",
)


def apply_reports(
    tx: Tx, reports: Reports, out: RoundResult, backoff: tuple[float, float], ttl_s: float
) -> None:
    db, now = tx.db, tx.now
    pg = postgres(db)
    # Heartbeats first: an agent's heartbeat listing a task, then its report for that task, can
    # land in one round; applied after the report, the heartbeat would find the task finished and
    # revoke a lease the agent already gave up.
    if reports.heartbeat:
        hb_ids = [ref[0] for _, ref in reports.heartbeat]
        hb_cur = _current(db, hb_ids)
        extend = []
        for inst, (task_id, token) in reports.heartbeat:
            row = hb_cur.get(task_id)
            if _holds(row, token, inst):
                extend.append((task_id, token))
            else:
                out.lost[inst].append(task_id)
        # A heartbeat listing the task proves its grant arrived: its lost deliveries start again from 0.
        bulk(db, _EXTEND[pg], [(now + ttl_s, tid, tok) for tid, tok in extend])

    refs = [s.id for _, s in reports.done] + [f.id for _, f in reports.failed] + [r[0] for _, r in reports.handback]
    cur = _current(db, refs) if refs else {}

    def valid(inst: str, task_id: int, token: int, recorded: tuple[S, ...]) -> Live | None:
        row = cur.get(task_id)
        if _holds(row, token, inst):
            return row
        # A resend of a report we already recorded (the ack was lost) is acknowledged, not refused:
        # only when the task is where that very report would have put it. A done report for a task
        # that expired or was requeued in between was not recorded, and the agent must hear so.
        if row is not None and row.attempt == token and row.state in recorded:
            out.accepted[inst].append(task_id)
        else:
            out.refused[inst].append(task_id)
            tx.event("stale_report_refused", task_id=task_id, instance_id=inst,
                     job_id=row.job_id if row else None,
                     detail=jsonx.dumps({"token": token, "current": row.attempt if row else None,
                                         "state": row.state if row else None}))
        return None

    done_rows = []
    failed = reports.failed
    for inst, s in reports.done:
        row = valid(inst, s.id, s.token, (S.SUCCEEDED,))
        if row is None:
            continue
        try:
            result = jsonx.dumps(s.result)
        except TypeError as exc:  # orjson reads 1024 levels of nesting but writes only 254
            # The task ran, but its result cannot be kept: a permanent failure saying why, rather
            # than an exception that would drop the whole round, every other agent's reports with it.
            failed = [*failed, (inst, Failure(s.id, s.token, f"the result could not be stored: {exc}"
                                              " (JSON nested too deeply?)", False, s.duration_s))]
            continue
        cur[s.id] = _moved(row, S.SUCCEEDED)  # a duplicate in the same batch is now stale
        done_rows.append((result, now, s.duration_s, inst, s.id, s.token))
        tx.count(row.job_id, S.LEASED, S.SUCCEEDED)
        tx.event(E.SUCCEEDED.value, job_id=row.job_id, task_id=s.id, instance_id=inst)
        out.accepted[inst].append(s.id)
    if done_rows:
        bulk(db, _SUCCEEDED[pg], done_rows)

    fail_rows, dead_rows = [], []
    for inst, f in failed:
        row = valid(inst, f.id, f.token, (S.FAILED, S.DEAD))
        if row is None:
            continue
        failures = row.failures + 1
        if f.retryable and failures < row.max_attempts:
            cur[f.id] = _moved(row, S.FAILED)
            run_at = now + backoff_s(failures, *backoff)
            fail_rows.append((f.error, run_at, f.duration_s, inst, f.id, f.token))
            tx.count(row.job_id, S.LEASED, S.FAILED)
            tx.event(E.FAILED_RETRYABLE.value, job_id=row.job_id, task_id=f.id, instance_id=inst, detail=f.error[:500])
        else:
            cur[f.id] = _moved(row, S.DEAD)
            dead_rows.append((f.error, now, f.duration_s, inst, f.id, f.token))
            tx.count(row.job_id, S.LEASED, S.DEAD)
            tx.event(E.FAILED_DEAD.value, job_id=row.job_id, task_id=f.id, instance_id=inst, detail=f.error[:500])
        out.accepted[inst].append(f.id)
    if fail_rows:
        bulk(db, _FAILED[pg], fail_rows)
    if dead_rows:
        bulk(db, _DEAD[pg], dead_rows)

    back_rows = []
    for inst, (task_id, token) in reports.handback:
        row = valid(inst, task_id, token, (S.QUEUED,))
        if row is None:
            continue
        cur[task_id] = _moved(row, S.QUEUED)
        back_rows.append((task_id, token))
        tx.count(row.job_id, S.LEASED, S.QUEUED)
        tx.event(E.HANDED_BACK.value, job_id=row.job_id, task_id=task_id, instance_id=inst)
        out.accepted[inst].append(task_id)
        out.requeued_pools.add(row.pool_id)
    if back_rows:
        bulk(db, _HANDED_BACK[pg], back_rows)


def lease(tx: Tx, instance_id: str, pool_id: int, n: int, ttl_s: float) -> list[str]:
    """Lease up to n queued tasks of a pool to one instance (see lease_many)."""
    return lease_many(tx, pool_id, [(instance_id, n)], ttl_s).get(instance_id, [])


def lease_many(tx: Tx, pool_id: int, wants: list[tuple[str, int]], ttl_s: float) -> dict[str, list[str]]:
    """Lease queued tasks of one pool to several instances at once: (instance, n) in the order they
    are served, best tasks (priority, then age) first. One indexed SELECT for the whole round and
    one executemany, rather than a statement per connection: with thousands of agents a round
    serves hundreds of them. Returns task entries per instance (frames.task_entry: the stored data
    JSON is spliced in verbatim, never decoded and re-encoded)."""
    total = sum(n for _, n in wants)
    # A job being cancelled gets no lease from the moment its cancel is committed, though its queued
    # tasks are cancelled a chunk at a time (cancel_chunk); `cancels` is empty but during a cancel.
    pg = postgres(tx.db)
    rows = tx.db.execute(_READY[pg], (pool_id, total)).fetchall()
    if not rows:
        return {}
    now, expires = tx.now, tx.now + ttl_s
    updates = []
    out: dict[str, list[str]] = {}
    event, count = tx.event, tx.count
    granted = E.LEASE_GRANTED.value
    i = 0
    for instance_id, n in wants:
        chunk = rows[i:i + n]
        if not chunk:
            break
        i += n
        encoded = out.setdefault(instance_id, [])
        for task_id, job_id, attempt, key, data, timeout_s in chunk:
            token = attempt + 1  # the fence: only a report carrying this attempt is recorded
            updates.append((token, expires, instance_id, now, task_id))
            count(job_id, S.QUEUED, S.LEASED)
            event(granted, job_id=job_id, task_id=task_id, instance_id=instance_id, detail=str(token))
            encoded.append(task_entry(task_id, token, key, timeout_s, data))
    bulk(tx.db, _LEASED[pg], updates)
    return out


# A paused job's tasks stay put (its budget reached, or its `cloudtaskctl run` gone), even while
# another job of the same worker keeps the pool's instances busy.
_READY_WHERE = (" WHERE pool_id = ? AND state = 'queued' AND job_id NOT IN (SELECT job_id FROM cancels)"
                " AND job_id NOT IN (SELECT id FROM jobs WHERE state = 'paused')"
                " ORDER BY priority DESC, id LIMIT ?")
_READY = (
    "SELECT id, job_id, attempt, key, data, timeout_s FROM tasks INDEXED BY tasks_ready" + _READY_WHERE,
    # SKIP LOCKED: rows another replica's round is leasing are passed over, never waited for nor
    # leased twice (its lock is held until its commit, and a row it committed as leased no longer
    # matches state = 'queued' when re-read under the lock).
    "SELECT id, job_id, attempt, key, data, timeout_s FROM tasks" + _READY_WHERE + " FOR UPDATE OF tasks SKIP LOCKED",
)
_LEASED = (
    "UPDATE tasks SET state = 'leased', attempt = r.value->>0, lease_expires_at = r.value->>1,"
    " instance_id = r.value->>2, started_at = r.value->>3 FROM json_each(?) AS r"
    " WHERE tasks.id = r.value->>4 AND tasks.state = 'queued'",
    "UPDATE tasks SET state = 'leased', attempt = (r.value->>0)::int, lease_expires_at = (r.value->>1)::float8,"
    " instance_id = r.value->>2, started_at = (r.value->>3)::float8 FROM jsonb_array_elements(?::jsonb) AS r(value)"
    " WHERE tasks.id = (r.value->>4)::bigint AND tasks.state = 'queued'",
)


@dataclass(slots=True)
class Reclaimed:
    kept: list[int]  # leases the agent listed and still holds
    dropped: list[int]  # leases it listed that are no longer its own: it must drop them
    requeued_pools: set[int]  # pools that gained work from leases it did not list
    # Leases (task, token) it did not list for the MAX_LOST_GRANTS-th time in a row: left leased to it,
    # for the caller to fail (a delivery that keeps failing is an error, not a loop).
    undelivered: list[LeaseRef]


def reclaim(tx: Tx, instance_id: str, held: list[LeaseRef], ttl_s: float) -> Reclaimed:
    """A (re)connecting agent lists every lease it holds. The valid ones are kept (re-pointed and
    extended); leases the daemon has on record for this instance that the agent does not list were
    lost on the way (a grant cut off by the network, refused as too big, an agent restarted) and go
    back to the queue at once, without counting an attempt, unless that happened MAX_LOST_GRANTS
    times in a row: those are returned as undelivered, still leased, for the caller to fail."""
    current = _current(tx.db, [h[0] for h in held]) if held else {}
    kept, dropped = [], []
    for task_id, token in held:
        row = current.get(task_id)
        # Only its own leases: a hello listing another instance's must not take them over.
        if _holds(row, token, instance_id):
            kept.append((tx.now + ttl_s, instance_id, task_id, token))
        else:
            dropped.append(task_id)
    tx.db.executemany(
        "UPDATE tasks SET lease_expires_at = ?, instance_id = ? WHERE id = ? AND attempt = ? AND state = 'leased'",
        kept,
    )
    kept_ids = {k[2] for k in kept}
    orphans = [
        r for r in tx.db.execute(
            f"SELECT id, job_id, attempt, pool_id, lost_grants FROM tasks{_leased_by(tx.db)}"
            " WHERE state = 'leased' AND lease_expires_at IS NOT NULL AND instance_id = ?",
            (instance_id,),
        ).fetchall()
        if r[0] not in kept_ids
    ]
    lost = [r for r in orphans if r[4] + 1 < MAX_LOST_GRANTS]
    pools = _requeue(tx, [(*r[:4], instance_id) for r in lost], "not held by the agent when it connected")
    tx.db.executemany("UPDATE tasks SET lost_grants = lost_grants + 1 WHERE id = ?", [(r[0],) for r in lost])
    undelivered = [(r[0], r[2]) for r in orphans if r[4] + 1 >= MAX_LOST_GRANTS]
    return Reclaimed([k[2] for k in kept], dropped, pools, undelivered)


def _leased_by(db: sqlite3.Connection) -> str:
    """SQLite's hint to take the index of an instance's leases; PostgreSQL's planner finds it alone."""
    return "" if postgres(db) else " INDEXED BY tasks_leased_by"


def _requeue(tx: Tx, rows: list[tuple[Any, ...]], detail: str) -> set[int]:
    """Leased tasks back to the queue without counting an attempt: rows of (id, job_id, attempt,
    pool_id, instance_id). Returns the pools that gained work."""
    for task_id, job_id, _, _, inst in rows:
        tx.count(job_id, S.LEASED, S.QUEUED)
        tx.event(E.HANDED_BACK.value, job_id=job_id, task_id=task_id, instance_id=inst, detail=detail)
    tx.db.executemany(
        "UPDATE tasks SET state = 'queued', instance_id = NULL, lease_expires_at = NULL"
        " WHERE id = ? AND attempt = ? AND state = 'leased'",
        [(r[0], r[2]) for r in rows],
    )
    return {r[3] for r in rows}


def requeue_instance(tx: Tx, instance_id: str, detail: str) -> tuple[list[tuple[int, str | None]], set[int]]:
    """Everything an instance holds goes back now, uncounted (the cloud took the machine: an
    interruption is never a task failure). Returns ((task, instance) leases, pools that gained work)."""
    rows = tx.db.execute(
        f"SELECT id, job_id, attempt, pool_id, instance_id FROM tasks{_leased_by(tx.db)}"
        " WHERE state = 'leased' AND instance_id = ?", (instance_id,)).fetchall()
    return [(r[0], r[4]) for r in rows], _requeue(tx, rows, detail)


def requeue_interrupted(tx: Tx) -> tuple[list[tuple[int, str | None]], set[int]]:
    """Expired leases of instances the cloud is taking (an interruption notice came) go back
    uncounted: the agent had no time to hand them back. Runs before expire_leases, which would
    count them as failed attempts."""
    rows = tx.db.execute(
        "SELECT t.id, t.job_id, t.attempt, t.pool_id, t.instance_id FROM tasks t"
        " JOIN instances i ON i.id = t.instance_id"
        " WHERE t.state = 'leased' AND t.lease_expires_at <= ? AND i.interrupted_at IS NOT NULL"
        f"{_sweep_lock(tx.db, 'OF t ')}",
        (tx.now,),
    ).fetchall()
    return [(r[0], r[4]) for r in rows], _requeue(tx, rows, "its instance was interrupted")


def _sweep_lock(db: Any, of: str = "") -> str:
    """Replicas sweep expired leases at once: on PostgreSQL each locks the rows it will count (and
    skips those another sweep, or a heartbeat renewing them, holds), so a lease is counted expired
    once and never after its renewal committed. SQLite has one writer: nothing to add."""
    return f" FOR UPDATE {of}SKIP LOCKED" if postgres(db) else ""


def expire_leases(tx: Tx, backoff: tuple[float, float]) -> list[tuple[int, str | None]]:
    """Leases past their visibility timeout count as a failed attempt. Returns (task, instance)."""
    rows = tx.db.execute(
        "SELECT id, job_id, attempt, failures, max_attempts, instance_id FROM tasks"
        f" WHERE state = 'leased' AND lease_expires_at <= ?{_sweep_lock(tx.db)}",
        (tx.now,),
    ).fetchall()
    retry, dead = [], []
    for task_id, job_id, attempt, failures, max_attempts, inst in rows:
        if failures + 1 < max_attempts:
            retry.append((tx.now + backoff_s(failures + 1, *backoff), task_id, attempt))
            tx.count(job_id, S.LEASED, S.FAILED)
            tx.event(E.LEASE_EXPIRED.value, job_id=job_id, task_id=task_id, instance_id=inst)
        else:
            dead.append((tx.now, task_id, attempt))
            tx.count(job_id, S.LEASED, S.DEAD)
            tx.event(E.LEASE_EXPIRED_DEAD.value, job_id=job_id, task_id=task_id, instance_id=inst)
    msg = "lease expired: no heartbeat within the visibility timeout"
    tx.db.executemany(
        "UPDATE tasks SET state = 'failed', failures = failures + 1, run_at = ?, lease_expires_at = NULL,"
        f" error = '{msg}' WHERE id = ? AND attempt = ? AND state = 'leased'",
        retry,
    )
    tx.db.executemany(
        "UPDATE tasks SET state = 'dead', failures = failures + 1, finished_at = ?, lease_expires_at = NULL,"
        f" error = '{msg}' WHERE id = ? AND attempt = ? AND state = 'leased'",
        dead,
    )
    return [(r[0], r[5]) for r in rows]


def promote_due(tx: Tx) -> set[int]:
    """Failed tasks whose backoff has elapsed are queued again. Returns the pools that gained work."""
    rows = tx.db.execute(
        "UPDATE tasks SET state = 'queued', run_at = NULL WHERE state = 'failed' AND run_at <= ?"
        " RETURNING id, job_id, pool_id",
        (tx.now,),
    ).fetchall()
    for task_id, job_id, _ in rows:
        tx.count(job_id, S.FAILED, S.QUEUED)
        tx.event(E.RETRY_DUE.value, job_id=job_id, task_id=task_id)
    return {r[2] for r in rows}


def extend_all_leases(tx: Tx, grace_s: float, present_within_s: float | None = None) -> int:
    """At start-up: the daemon was away, so no heartbeat could land. Give every lease a fresh
    visibility timeout, so agents that reconnect keep their work instead of racing a requeue.

    Exactly grace_s from now, not the later of that and the stored expiry: every expiry was set to
    at most a TTL ahead of its write, so one further ahead means the wall clock stepped back while
    the daemon was down, and keeping it would hold a dead agent's work for as long as the step.

    present_within_s (replicas on PostgreSQL): leave alone the leases of agents some replica wrote
    present (instances.touch_many) within that many seconds. Those are connected to a live replica
    and heartbeat there, or were until at most that long ago and so hold a lease's full TTL less
    that to fail over, as after any replica's death; pushing their leases out would only keep a
    dead agent's work from expiring on every start of a crash-looping replica."""
    if present_within_s is None:
        return tx.db.execute(
            "UPDATE tasks SET lease_expires_at = ? WHERE state = 'leased'", (tx.now + grace_s,)
        ).rowcount
    return tx.db.execute(
        "UPDATE tasks SET lease_expires_at = ? WHERE state = 'leased' AND (instance_id IS NULL OR instance_id NOT IN"
        " (SELECT id FROM instances WHERE last_seen_at >= ?))",
        (tx.now + grace_s, tx.now - present_within_s),
    ).rowcount


def cap_retry_due(tx: Tx, backoff_max_s: float) -> int:
    """At start-up: no retry can be due later than the longest backoff (with its jitter) from now; a
    later one was written before the wall clock stepped back across a restart, and would stall the
    task for as long as the step. Returns how many were brought forward."""
    due = tx.now + backoff_max_s * 1.2
    return tx.db.execute(
        "UPDATE tasks SET run_at = ? WHERE state = 'failed' AND run_at > ?", (due, due)
    ).rowcount


# ---- user actions -----------------------------------------------------------------------------


CANCEL_CHUNK = 10_000  # tasks per cancel transaction (housekeeping.chunk_rows in the daemon)
OPEN_STATES_SQL = states.sql_in(states.OPEN_TASK_STATES)  # what a cancel moves to cancelled


@dataclass(slots=True)
class CancelProgress:
    """Where a job's cancel stands: `done` of `total` unfinished tasks cancelled; `finished` once the
    last chunk ran. revoke: leases (task, instance) the agents must be told to stop."""

    job_id: int
    total: int
    done: int
    finished: bool
    revoke: list[tuple[int, str | None]] = field(default_factory=list)


def first_task_cursor(db: sqlite3.Connection, job_id: int) -> int:
    """A rowid below every task of the job, for a walk over its tasks: from where its first upload
    began (uploads.start_after), else the lowest rowid through the (job_id, key) index (older rows)."""
    start = uploads.job_start(db, job_id)
    if start is not None:
        return start
    low = db.execute("SELECT min(id) FROM tasks WHERE job_id = ?", (job_id,)).fetchone()[0]
    return int(low) - 1 if low is not None else 0


def cancel_job(tx: Tx, job_id: int) -> CancelProgress:
    """Cancel a job: marked cancelled now, so no lease is granted for it from this commit on (lease_many
    skips the jobs in `cancels`); its unfinished tasks are cancelled by cancel_chunk, one short
    transaction each, so a million of them never hold the writer (issue 15). Cancelling a job that is
    being cancelled answers its progress."""
    row = jobs.counters(tx.db, job_id)
    if row is None:
        raise no_job(job_id)
    pending = cancels.pending(tx.db, job_id)
    if pending is not None:
        return CancelProgress(job_id, pending.total, pending.done, False)
    total = sum(row[states.COUNTER[s]] for s in states.OPEN_TASK_STATES)
    jobs.cancel(tx, job_id)
    tx.event("job_cancelled", job_id=job_id, detail=jsonx.dumps({"tasks": total}))
    if total:
        cancels.start(tx, job_id, first_task_cursor(tx.db, job_id), total)
    return CancelProgress(job_id, total, 0, total == 0)


def cancel_chunk(tx: Tx, job_id: int, limit: int = CANCEL_CHUNK) -> CancelProgress:
    """Cancel the unfinished tasks among the job's next `limit` tasks in rowid order. Everything here
    is bounded by the chunk: an event row and a counter per task are written by SQL, and only the
    chunk's leases (for the revoke) come back to Python."""
    pending = cancels.pending(tx.db, job_id)
    if pending is None:  # finished meanwhile (another chunk, a restart)
        return CancelProgress(job_id, 0, 0, True)
    cursor, total, done = pending.cursor, pending.total, pending.done
    # NOT INDEXED: a rowid walk from the cursor (through the (job_id, key) index each chunk would
    # rescan every row already passed, as _staged_chunk explains).
    walk = _not_indexed(tx.db)
    end, seen = tx.db.execute(f"SELECT max(id), count(*) FROM (SELECT id FROM tasks{walk} WHERE id > ?"
                              " AND job_id = ? ORDER BY id LIMIT ?) AS w", (cursor, job_id, limit)).fetchone()
    if end is None:
        return _cancel_finished(tx, job_id, total, done)
    window = (cursor, end, job_id)
    # Every statement on the window NOT INDEXED: a rowid range. Left to itself SQLite takes the
    # (job_id, key) index and reads all of the job's entries per chunk (a 1M-task cancel took 220 s).
    in_window = f"id > ? AND id <= ? AND job_id = ? AND state IN {OPEN_STATES_SQL}"
    n = 0
    counts = tx.db.execute(f"SELECT state, count(*) FROM tasks{walk} WHERE {in_window} GROUP BY state",
                           window).fetchall()
    for state, count in counts:
        tx.count(job_id, S(state), S.CANCELLED, count)
        n += count
    revoke = [(r[0], r[1]) for r in tx.db.execute(
        f"SELECT id, instance_id FROM tasks{walk} WHERE {in_window} AND state = 'leased'", window).fetchall()]
    if n:
        # As a cancel always did: a task_cancelled event per task (results followers read them).
        events.add_cancelled(tx, job_id, cursor, end)
        tx.db.execute(f"UPDATE tasks{walk} SET state = 'cancelled', finished_at = ?, lease_expires_at = NULL,"
                      f" run_at = NULL WHERE {in_window}", (tx.now, *window))
    if seen < limit:
        # The window held the job's last tasks: the cancel ends in this transaction, so a delete
        # right after a small job's cancel is not refused as "being cancelled".
        return _cancel_finished(tx, job_id, total, done + n, revoke)
    cancels.advance(tx, job_id, end, n)
    return CancelProgress(job_id, total, done + n, False, revoke)


def _cancel_finished(tx: Tx, job_id: int, total: int, done: int,
                     revoke: list[tuple[int, str | None]] | None = None) -> CancelProgress:
    cancels.finish(tx, job_id)
    jobs.set_finished(tx, job_id)
    tx.event("job_cancel_finished", job_id=job_id, detail=jsonx.dumps({"tasks": done}))
    return CancelProgress(job_id, total, done, True, revoke or [])


async def cancel_all(store: Doors, job_id: int, limit: int = CANCEL_CHUNK) -> CancelProgress:
    """Cancel a job to its end here, chunk after chunk (tests, tools): the daemon leaves the chunks
    after the first to its housekeeper. The returned revoke holds every chunk's leases."""
    progress = await store.write(cancel_job, job_id)
    revoke: list[tuple[int, str | None]] = []
    while not progress.finished:
        progress = await store.write(cancel_chunk, job_id, limit)
        revoke += progress.revoke
    progress.revoke = revoke
    return progress


# The states a user's retry queues again: every one with a RETRY_REQUESTED edge.
_RETRYABLE_SQL = states.sql_in(states.task_sources(E.RETRY_REQUESTED))


def retry_job(tx: Tx, job_id: int) -> int:
    """Queue dead and cancelled tasks again with a fresh failure count. Returns how many."""
    counts = jobs.counters(tx.db, job_id)
    if counts is None:
        raise no_job(job_id)
    pending = cancels.pending(tx.db, job_id)
    if pending is not None:  # its chunks would cancel again what a retry queued
        raise CloudtaskError(f"job {job_id} is being cancelled ({pending.done} of {pending.total} tasks so far):"
                             " retry it once the cancel is done")
    rows = tx.db.execute(
        "UPDATE tasks SET state = 'queued', failures = 0, finished_at = NULL, error = NULL, run_at = NULL"
        f" WHERE job_id = ? AND state IN {_RETRYABLE_SQL} RETURNING id",
        (job_id,),
    ).fetchall()
    dead, cancelled = counts[states.COUNTER[S.DEAD]], counts[states.COUNTER[S.CANCELLED]]
    tx.count(job_id, S.DEAD, S.QUEUED, dead)
    tx.count(job_id, S.CANCELLED, S.QUEUED, cancelled)
    if dead + cancelled != len(rows):
        raise TransitionError(f"job {job_id}: counters disagree with tasks; run the store check")
    jobs.reactivate(tx, job_id)
    tx.event(E.RETRY_REQUESTED.value, job_id=job_id, detail=jsonx.dumps({"tasks": len(rows)}))
    return len(rows)


def withdraw_job(tx: Tx, job_id: int) -> None:
    """Remove a job that never held a task (its only upload was refused), with its events: a refused
    submission leaves nothing behind. A job that holds or is receiving tasks is refused."""
    if not jobs.exists(tx.db, job_id):
        raise no_job(job_id)
    if tx.db.execute("SELECT 1 FROM tasks WHERE job_id = ? LIMIT 1", (job_id,)).fetchone() is not None:
        raise BadInput(f"job {job_id} holds tasks: only a job that never received any can be withdrawn"
                       " (cancel it instead)")
    if uploads.receiving(tx.db, job_id):
        raise BadInput(f"job {job_id} is receiving tasks: it cannot be withdrawn now")
    uploads.delete_of_job(tx, job_id)
    events.delete_of_job(tx, job_id)
    jobs.delete(tx, job_id)


def check_counters(db: sqlite3.Connection) -> list[str]:
    """Compare every job's counters with the truth in tasks; returns the mismatches (empty = good)."""
    problems = []
    truth: dict[tuple[int, str], int] = {
        (r[0], r[1]): r[2] for r in db.execute("SELECT job_id, state, count(*) FROM tasks GROUP BY job_id, state")
    }
    for row in jobs.every_counter(db):
        for s in S:
            n, rows = row[states.COUNTER[s]], truth.get((row["id"], s.value), 0)
            if n != rows:
                problems.append(f"job {row['id']} n_{s.value}={n} but {rows} rows")
    return problems


# ---- reads for the control API and the reconciler ------------------------------------------------

_LEASED_SQL = states.sql_lit(S.LEASED)
_WORKED_SQL = states.sql_in(states.WORKED_TASK_STATES)
_TERMINAL_SQL = states.sql_in(states.TERMINAL_TASK_STATES)
# A task's result line (feeds.task_dict): the columns the results streams read.


def leases_by_instance(db: sqlite3.Connection) -> dict[str, int]:
    """How many leases each instance holds now (instances holding none are absent)."""
    return dict(db.execute(
        f"SELECT instance_id, count(*) FROM tasks WHERE state = {_LEASED_SQL} GROUP BY instance_id").fetchall())


def leases_held(db: sqlite3.Connection, instance_id: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM tasks WHERE state = {_LEASED_SQL} AND instance_id = ?",
                          (instance_id,)).fetchone()[0])


def recent_worked(db: sqlite3.Connection, job_id: int, since: float) -> tuple[int, float | None]:
    """(tasks of the job that finished an attempt since `since`, the first such finish): work done,
    succeeded or dead, never a cancellation (which would make a cancelled job look fast)."""
    n, first = db.execute(f"SELECT count(*), min(finished_at) FROM tasks WHERE job_id = ? AND finished_at >= ?"
                          f" AND state IN {_WORKED_SQL}", (job_id, since)).fetchone()
    return int(n), first


def latest_results(db: sqlite3.Connection, job_id: int, top: int) -> list[sqlite3.Row]:
    """The `top` results finished last, newest first."""
    return db.execute(f"SELECT {RESULT_COLUMNS} FROM tasks WHERE job_id = ? AND finished_at IS NOT NULL"
                      f" AND state IN {_TERMINAL_SQL} ORDER BY finished_at DESC, id DESC LIMIT ?",
                      (job_id, max(0, top))).fetchall()


def results_page(db: sqlite3.Connection, job_id: int, after: int, limit: int) -> list[sqlite3.Row]:
    """Up to `limit` finished tasks of the job past rowid `after`, in id order."""
    return db.execute(f"SELECT {RESULT_COLUMNS} FROM tasks WHERE job_id = ? AND id > ?"
                      f" AND state IN {_TERMINAL_SQL} ORDER BY id LIMIT ?", (job_id, after, limit)).fetchall()


# ---- the API's, the reconciler's, costs' and retention's reads and the purge ---------------------


def page(db: sqlite3.Connection, job_id: int, after: int, limit: int, state: str | None = None) -> list[sqlite3.Row]:
    """Up to `limit` of the job's tasks past id `after` (in one state if given), in id order."""
    where = " AND state = ?" if state else ""
    params: tuple[Any, ...] = (job_id, after, state, limit) if state else (job_id, after, limit)
    return rows.every(db, f"SELECT * FROM tasks WHERE job_id = ? AND id > ?{where} ORDER BY id LIMIT ?", params)


def any_of_job(db: sqlite3.Connection, job_id: int) -> bool:
    """Does the job hold a task row (staged or not)?"""
    return db.execute("SELECT 1 FROM tasks WHERE job_id = ? LIMIT 1", (job_id,)).fetchone() is not None


def last_id(db: sqlite3.Connection) -> int:
    """The newest task's id (0: none); a purge walks no further."""
    return int(db.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()[0])


def keys_of(db: sqlite3.Connection, ids: list[int]) -> dict[int, Any]:
    """Task id -> the key the user gave it, for up to 500 ids (under SQLite's parameter limit)."""
    found = db.execute(f"SELECT id, key FROM tasks WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
    return {int(r[0]): r[1] for r in found}


def recent_durations(db: sqlite3.Connection, job_id: int, n: int) -> list[float]:
    """The run times of the job's last `n` finished tasks: the index on (job_id, finished_at) serves it
    without a sort however many have finished."""
    return [float(r[0]) for r in db.execute(
        "SELECT duration_s FROM tasks WHERE job_id = ? AND finished_at IS NOT NULL"
        " AND duration_s IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (job_id, n))]


def job_spend(db: sqlite3.Connection, job_id: int) -> sqlite3.Row:
    """The job's finished tasks: how many (n), their run time (busy) and price-seconds (spent: each
    task's share of its instance's hourly price, times its run time)."""
    row = rows.one(db, "SELECT count(*) AS n, sum(t.duration_s) AS busy,"
                       " sum(t.duration_s * i.price_per_hour / i.slots) AS spent"
                       " FROM tasks t JOIN instances i ON i.id = t.instance_id"
                       " WHERE t.job_id = ? AND t.finished_at IS NOT NULL AND t.duration_s IS NOT NULL", (job_id,))
    assert row is not None  # an aggregate always answers one row
    return row


def pool_task_spend(db: sqlite3.Connection, pool_id: int) -> float:
    """Price-seconds of every task (any job's) run on the pool's instances."""
    row = db.execute("SELECT sum(t.duration_s * i.price_per_hour / i.slots) FROM tasks t"
                     " JOIN instances i ON i.id = t.instance_id WHERE i.pool_id = ? AND t.duration_s IS NOT NULL",
                     (pool_id,)).fetchone()
    return float(row[0] or 0.0)


def purge_span(tx: Tx, job_id: int, after: int, last: int, limit: int) -> int:
    """Delete the next `limit` of a deleted job's tasks with an id in (after, last]; returns where the
    span ended (`last` when none was left). A rowid walk from the cursor (_staged_chunk says why)."""
    walk = _not_indexed(tx.db)
    end = tx.db.execute(f"SELECT max(id) FROM (SELECT id FROM tasks{walk} WHERE id > ? AND id <= ?"
                        " AND job_id = ? ORDER BY id LIMIT ?) AS w", (after, last, job_id, limit)).fetchone()[0]
    end = last if end is None else int(end)
    tx.db.execute(f"DELETE FROM tasks{walk} WHERE id > ? AND id <= ? AND job_id = ?", (after, end, job_id))
    return end
