"""An upload's commit on PostgreSQL, chunk by chunk: how long each transaction holds the writer, and
the plan of the first and the last chunk (EXPLAIN ANALYZE, rolled back).

    python benchmarks/pg_commit.py [--tasks 1000000] [--running 200000] [--step 5000] [--form range|limit]

A job of `--running` queued tasks first (the table a daemon holds while it works), then an upload of
`--tasks` staged tasks to a second job, committed with tables/tasks.commit_upload_chunk: `--form range`
is the statement PostgreSQL runs (a range of `--step` ids of the primary key), `--form limit` the
one SQLite runs (the next `--step` staged rows after the cursor, by a subquery), as PostgreSQL ran it
before. On a PostgreSQL server of its own, durable (fsync on). Prints the chunk times (first ten,
last ten, median, max) and the two plans, with the statistics as the upload left them (stale).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from contextlib import ExitStack
from typing import Any

from _common import ROOT
from dispatch import own_postgres

from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.tables import uploads
from cloudtaskd.core.tables.tx import Tx
from cloudtaskd.core.taskfile import ParsedTask

_LIMIT_FORM = ("UPDATE tasks SET state = 'queued' WHERE id IN (SELECT id FROM tasks WHERE id > %s AND job_id = %s"
               " AND state = 'staged' ORDER BY id LIMIT %s) RETURNING id")
_RANGE_FORM = ("UPDATE tasks SET state = 'queued' WHERE id > %s AND id <= %s AND job_id + 0 = %s"
               " AND state = 'staged' RETURNING id")


def _jobs(tx: Tx) -> None:
    tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES ('d', '{\"mode\":\"python\"}', '/', 0)")
    for name in ("running", "upload"):
        tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts) VALUES (?, 1, 'active', 0, 3)",
                      (name,))


async def stage(store: PgStore, job_id: int, n: int) -> int:
    job = {"id": job_id, "pool_id": 1, "max_attempts": 3, "timeout_s": None}
    upload = int(await store.write(queue.create_upload, job_id))
    for lo in range(0, n, queue.STAGE_BATCH):
        batch = [ParsedTask(i + 1, f"t{i}", json.dumps({"i": i}), 0, None, None)
                 for i in range(lo, min(n, lo + queue.STAGE_BATCH))]
        await store.write(queue.stage_tasks, job, batch, "tasks.jsonl")
    return upload


def explain(dsn: str, sql: str, params: tuple[Any, ...], first: str = "") -> str:
    """The plan of `sql` as it runs (after `first`, if given), all rolled back."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        if first:
            conn.execute(first)
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall())
        conn.rollback()
    return plan


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000, help="the upload committed")
    ap.add_argument("--running", type=int, default=200_000, help="a running job's queued tasks, below the upload")
    ap.add_argument("--step", type=int, default=queue.COMMIT_STEP_PG)
    ap.add_argument("--form", choices=("range", "limit"), default="range")
    args = ap.parse_args()
    with ExitStack() as stack:
        dsn = own_postgres(stack)
        store = PgStore(dsn)
        await store.open()
        try:
            await store.write(_jobs)
            running = await stage(store, 1, args.running)
            await queue.finish_upload(store, running, 1, commit=True)
            t0 = time.monotonic()
            upload = await stage(store, 2, args.tasks)
            print(f"staged {args.tasks:,} tasks in {time.monotonic() - t0:.1f} s")
            start, end = await store.read(lambda db: queue.upload_span(db, upload))
            print(f"form={args.form} step={args.step:,} ids ({start:,}, {end:,}]")
            first = (start, start + args.step, 2) if args.form == "range" else (start, 2, args.step)
            print("first chunk:\n" + explain(dsn, _RANGE_FORM if args.form == "range" else _LIMIT_FORM, first))
            times: list[float] = []
            cursor: int | None = start
            last = start
            t0 = time.monotonic()
            while cursor is not None:
                last = cursor
                began = time.monotonic()
                if args.form == "range":
                    cursor = await store.write(queue.commit_upload_chunk, upload, 2, cursor, args.step)
                else:
                    cursor = await store.write(_limit_chunk, upload, cursor, args.step)
                times.append(time.monotonic() - began)
            total = time.monotonic() - t0
            # The last chunk again, on rows staged back (rolled back with the EXPLAIN): its plan as it ran.
            tail = (last, last + args.step, 2) if args.form == "range" else (last, 2, args.step)
            print("last chunk:\n" + explain(dsn, _RANGE_FORM if args.form == "range" else _LIMIT_FORM, tail,
                                             f"UPDATE tasks SET state = 'staged' WHERE id > {last} AND job_id = 2"))
            ms = [t * 1000 for t in times]
            print(f"{len(ms)} chunks in {total:.1f} s: median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms")
            print("first ten (ms): " + " ".join(f"{t:.0f}" for t in ms[:10]))
            print("last ten (ms):  " + " ".join(f"{t:.0f}" for t in ms[-10:]))
            counts = await store.read(lambda db: db.execute(
                "SELECT state, count(*) FROM tasks WHERE job_id = 2 GROUP BY state").fetchall())
            print("job 2: " + ", ".join(f"{r[0]} {r[1]:,}" for r in counts))
        finally:
            await store.close()


def _limit_chunk(tx: Tx, upload_id: int, after_id: int, limit: int) -> int | None:
    """The commit as PostgreSQL ran it before (the statement SQLite runs, without its hint)."""
    uploads.set_committing(tx, upload_id, 2)
    ids = [r[0] for r in tx.db.execute(_LIMIT_FORM.replace("%s", "?"), (after_id, 2, limit)).fetchall()]
    tx.count(2, queue.S.STAGED, queue.S.QUEUED, len(ids))
    if len(ids) < limit:
        uploads.set_state(tx, upload_id, uploads.COMMITTED)
        return None
    return max(ids)


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
