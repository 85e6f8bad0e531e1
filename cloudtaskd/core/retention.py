"""What the daemon lets go of: deleted jobs' rows, old events, finished jobs past their retention.

Each function here is one short write transaction (`Store.write`) over a bounded chunk of rows; the
housekeeper (housekeeping.py) calls them one at a time, so a million rows never hold the writer and
dispatch runs between chunks. Rows are walked in rowid order from a cursor kept in the database (a
restart goes on where the last chunk ended) or, for the event log, in memory (a restart walks it again).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from cloudtask_wire import jsonx
from cloudtaskd.core.states import COUNTER, TASK_STATES, WAITING_TASK_STATES
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import cancels, events, jobs, meta, purges, uploads
from cloudtaskd.core.tables import tasks as task_rows
from cloudtaskd.core.tables.tasks import first_task_cursor
from cloudtaskd.errors import CloudtaskError, no_job

PURGE_CHUNK = 10_000  # task rows per delete transaction (housekeeping.chunk_rows in the daemon)
# Event rows looked at per transaction: a span of rowids, not a count of matches, so a step over a
# stretch where little matches (another job's events) is as short as one where everything does.
EVENT_SPAN = 20_000


@dataclass(slots=True)
class Deleted:
    job_id: int
    tasks: int  # how many tasks it held (removed in the background when `purging`)
    purging: bool


def delete_job(tx: Tx, job_id: int) -> Deleted:
    """Delete a job that is over: its row goes now (the API answers "no job N" from this commit on),
    its tasks, results and events a chunk at a time (purge_chunk). A job with unfinished tasks, or
    being cancelled or receiving an upload, is refused: what runs must be cancelled first."""
    row = jobs.counters(tx.db, job_id)
    if row is None:
        raise no_job(job_id)
    state, counts = row["state"], {s: row[COUNTER[s]] for s in TASK_STATES}
    total = sum(counts.values())
    pending = cancels.pending(tx.db, job_id)
    if pending is not None:
        raise CloudtaskError(f"job {job_id} is being cancelled ({pending.done} of {pending.total} tasks so far):"
                             " delete it once the cancel is done")
    if row["is_open"] == jobs.OPEN and state != jobs.CANCELLED:
        raise CloudtaskError(f"job {job_id} is open for more tasks: close it first (cloudtaskctl close {job_id}),"
                             " then delete it once its tasks are done")
    receiving = uploads.receiving(tx.db, job_id)
    unfinished = sum(counts[s] for s in WAITING_TASK_STATES)
    if unfinished or receiving:
        what = f"{unfinished} unfinished task{'s' if unfinished != 1 else ''}" if unfinished else "an upload under way"
        raise CloudtaskError(f"job {job_id} is {state} with {what}: cancel it first (cloudtaskctl cancel {job_id}),"
                             " then delete it")
    task_last = task_rows.last_id(tx.db)
    event_last = events.last_id(tx.db)
    cursor = first_task_cursor(tx.db, job_id) if total else task_last
    uploads.delete_of_job(tx, job_id)
    jobs.delete(tx, job_id)
    # Ids are not reused after a delete: a newer job with this id would be taken for the old one by
    # whoever kept it (a script, a results file), and its rows would fall under this purge.
    meta.raise_last_job_id(tx, job_id)
    purges.start(tx, job_id, task_cursor=cursor, task_last=task_last, event_last=event_last, tasks=total)
    # Not under the job's id: this event outlives the purge of its events.
    tx.event("job_deleted", detail=jsonx.dumps({"job": job_id, "tasks": total}))
    return Deleted(job_id, total, True)


def purge_chunk(tx: Tx, job_id: int, limit: int = PURGE_CHUNK) -> bool:
    """Remove the next chunk of a deleted job's tasks, then of its events. True once all are gone."""
    at = purges.cursors(tx.db, job_id)
    if at is None:
        return True
    task_cursor, task_last, event_cursor, event_last = at.task_cursor, at.task_last, at.event_cursor, at.event_last
    if task_cursor < task_last:
        purges.set_task_cursor(tx, job_id, task_rows.purge_span(tx, job_id, task_cursor, task_last, limit))
        return False
    if event_cursor == 0:
        event_cursor = events.cursor_before_first(tx.db)
    if event_cursor < event_last:
        end = min(event_cursor + EVENT_SPAN, event_last)
        events.delete_job_span(tx, job_id, event_cursor, end)
        purges.set_event_cursor(tx, job_id, end)
        return False
    tasks = purges.finish(tx, job_id)
    tx.event("job_purged", detail=jsonx.dumps({"job": job_id, "tasks": tasks}))
    return True


def event_prune_bound(db: sqlite3.Connection, max_rows: int) -> int:
    """Events at or below this id are past the count limit: every id above it is among the newest
    max_rows ever written (ids only grow, so this needs no count over the table)."""
    return max(0, events.last_id(db) - max_rows)


def prune_events_span(tx: Tx, after: int, older_than: float, count_bound: int) -> tuple[int, int, bool]:
    """Delete, among the next EVENT_SPAN event ids after `after`, those older than `older_than` (the
    daemon clock) or at or below `count_bound`, except the events that record how a task of a job
    still held finished: the job's results stream (GET /v1/jobs/{id}/results?follow=1) reads them, so
    they stay as long as the job does. Returns (new cursor, rows deleted, whether to go on: False once
    the span met an event to keep for its age, since later ones are younger)."""
    last = events.last_id(tx.db)
    if after >= last:  # none, or none after the cursor
        return after, 0, False
    end = min(after + EVENT_SPAN, last)
    # The first event in the span that is young and within the count: the walk stops before it.
    young = events.first_young(tx, after, end, older_than, count_bound)
    stop = young - 1 if young is not None else end
    deleted = events.prune_span(tx, after, stop)
    return stop, deleted, young is None and stop < last
