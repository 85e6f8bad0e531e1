"""Queue semantics on a real SQLite database: leasing, fencing, retries, expiry, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloudtask_wire.messages import Failure, Success
from cloudtaskd.core.clock import DaemonClock
from cloudtaskd.core.states import InstanceState
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import instances
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.taskfile import ParsedTask, parse_task
from cloudtaskd.errors import BadInput
from tests.conftest import wait_for


@pytest.fixture
def store(both_stores: Store) -> Store:
    """Every test here runs on SQLite and on PostgreSQL."""
    return both_stores


def _setup_job(tx: Tx, max_attempts: int = 3) -> dict[str, Any]:
    tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES ('d', '{\"mode\":\"python\"}', '/', 0)")
    tx.db.execute(
        "INSERT INTO jobs (name, pool_id, state, created_at, max_attempts) VALUES ('j', 1, 'active', 0, ?)",
        (max_attempts,),
    )
    return {"id": 1, "pool_id": 1, "max_attempts": max_attempts, "timeout_s": None}


async def submit(store: Store, n: int, *, max_attempts: int = 3, start: int = 0) -> dict[str, Any]:
    job = await store.write(_setup_job, max_attempts) if start == 0 else {
        "id": 1, "pool_id": 1, "max_attempts": max_attempts, "timeout_s": None}
    upload = await store.write(queue.create_upload, 1)
    tasks = [ParsedTask(i + 1, f"t{i}", json.dumps({"n": i}), 0, None, None) for i in range(start, start + n)]
    await store.write(queue.stage_tasks, job, tasks, "tasks.jsonl")
    await queue.finish_upload(store, upload, 1, commit=True)
    return job


async def counts(store: Store) -> dict[str, int]:
    rows = await store.fetchall("SELECT state, count(*) AS n FROM tasks GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


async def lease(store: Store, inst: str, n: int, ttl: float = 30.0, now: float | None = None) -> list[dict[str, Any]]:
    encoded = await store.write(queue.lease, inst, 1, n, ttl, now=now)
    return [json.loads(e) for e in encoded]


async def report(store: Store, reports: queue.Reports, now: float | None = None) -> queue.RoundResult:
    out = queue.RoundResult()
    await store.write(queue.apply_reports, reports, out, (0.0, 0.0), 30.0, now=now)
    return out


async def check(store: Store) -> None:
    assert await store.read(queue.check_counters) == []


async def test_lease_is_ordered_by_priority_then_submission(store: Store) -> None:
    await submit(store, 5)
    await store.write(lambda tx: tx.db.execute("UPDATE tasks SET priority = 5 WHERE key = 't3'"))
    got = await lease(store, "a", 3)
    assert [t["key"] for t in got] == ["t3", "t0", "t1"]
    assert all(t["token"] == 1 for t in got)
    assert got[0]["data"] == {"n": 3}
    assert await counts(store) == {"leased": 3, "queued": 2}
    await check(store)


async def test_complete_then_stale_token_is_refused(store: Store) -> None:
    await submit(store, 1)
    (t,) = await lease(store, "a", 1, ttl=1.0, now=1000.0)
    # The lease expires; another agent gets the task with a newer token.
    await store.write(queue.expire_leases, (0.0, 0.0), now=1002.0)
    await store.write(queue.promote_due, now=1003.0)
    (t2,) = await lease(store, "b", 1, now=1003.0)
    assert t2["token"] == t["token"] + 1
    # The first agent's late result carries the old token: refused, nothing recorded.
    out = await report(store, queue.Reports(done=[("a", Success(t["id"], t["token"], {"late": 1}, 0.1))]))
    assert out.refused["a"] == [t["id"]] and not out.accepted.get("a")
    out = await report(store, queue.Reports(done=[("b", Success(t2["id"], t2["token"], {"ok": 1}, 0.1))]))
    assert out.accepted["b"] == [t2["id"]]
    row = await store.fetchone("SELECT state, result, instance_id, attempt FROM tasks")
    assert row is not None
    assert (row["state"], json.loads(row["result"]), row["instance_id"]) == ("succeeded", {"ok": 1}, "b")
    refused = await store.fetchall("SELECT * FROM events WHERE kind = 'stale_report_refused'")
    assert len(refused) == 1 and refused[0]["instance_id"] == "a"
    await check(store)


async def test_duplicate_report_in_same_batch_records_once(store: Store) -> None:
    await submit(store, 1)
    (t,) = await lease(store, "a", 1)
    s1 = Success(t["id"], t["token"], 1, 0.0)
    s2 = Success(t["id"], t["token"], 2, 0.0)
    out = await report(store, queue.Reports(done=[("a", s1), ("a", s2)]))
    row = await store.fetchone("SELECT result FROM tasks")
    assert row is not None and json.loads(row["result"]) == 1
    # The second copy is treated as a resend of an already-recorded report: acked, not applied.
    assert out.accepted["a"] == [t["id"], t["id"]]
    await check(store)


async def test_resend_after_lost_ack_is_acknowledged_not_refused(store: Store) -> None:
    await submit(store, 1)
    (t,) = await lease(store, "a", 1)
    s = Success(t["id"], t["token"], "r", 0.0)
    await report(store, queue.Reports(done=[("a", s)]))
    out = await report(store, queue.Reports(done=[("a", s)]))
    assert out.accepted["a"] == [t["id"]] and not out.refused.get("a")


async def test_retry_with_backoff_then_dead(store: Store) -> None:
    await submit(store, 1, max_attempts=3)
    now = 1000.0
    for attempt in range(1, 4):
        (t,) = await lease(store, "a", 1, now=now)
        assert t["token"] == attempt
        await report(store, queue.Reports(failed=[("a", Failure(t["id"], t["token"], f"boom {attempt}", True, 0.1))]),
                     now=now)
        if attempt < 3:
            assert await counts(store) == {"failed": 1}
            assert await lease(store, "a", 1, now=now) == []  # still backing off
            assert await store.write(queue.promote_due, now=now + 1) == {1}
        now += 1
    assert await counts(store) == {"dead": 1}
    row = await store.fetchone("SELECT failures, error FROM tasks")
    assert row is not None and (row["failures"], row["error"]) == (3, "boom 3")
    await check(store)


async def test_permanent_failure_is_dead_at_once(store: Store) -> None:
    await submit(store, 1, max_attempts=5)
    (t,) = await lease(store, "a", 1)
    await report(store, queue.Reports(failed=[("a", Failure(t["id"], t["token"], "bad input", False, 0.0))]))
    assert await counts(store) == {"dead": 1}


async def test_expiry_counts_an_attempt_and_ends_dead(store: Store) -> None:
    await submit(store, 1, max_attempts=2)
    await lease(store, "a", 1, ttl=5, now=100.0)
    assert await store.write(queue.expire_leases, (0.0, 0.0), now=104.0) == []  # not yet
    assert await store.write(queue.expire_leases, (0.0, 0.0), now=105.0) == [(1, "a")]
    assert await counts(store) == {"failed": 1}
    await store.write(queue.promote_due, now=106.0)
    await lease(store, "a", 1, ttl=5, now=106.0)
    await store.write(queue.expire_leases, (0.0, 0.0), now=112.0)
    assert await counts(store) == {"dead": 1}
    await check(store)


async def test_heartbeat_extends_and_reports_lost_leases(store: Store) -> None:
    await submit(store, 2)
    a, b = await lease(store, "x", 2, ttl=10, now=100.0)
    out = queue.RoundResult()
    await store.write(queue.apply_reports, queue.Reports(heartbeat=[("x", (a["id"], a["token"])),
                                                                     ("x", (b["id"], b["token"] + 7))]),
                      out, (0.0, 0.0), 10.0, now=108.0)
    assert out.lost["x"] == [b["id"]]
    # a was extended to 118; b was not and expires at 110.
    expired = await store.write(queue.expire_leases, (0.0, 0.0), now=111.0)
    assert expired == [(b["id"], "x")]


async def test_handback_requeues_without_counting_an_attempt(store: Store) -> None:
    await submit(store, 1, max_attempts=1)
    (t,) = await lease(store, "a", 1)
    out = await report(store, queue.Reports(handback=[("a", (t["id"], t["token"]))]))
    assert out.requeued_pools == {1}
    assert await counts(store) == {"queued": 1}
    (t2,) = await lease(store, "b", 1)
    assert t2["token"] == 2  # the fencing token still moves on
    row = await store.fetchone("SELECT failures FROM tasks")
    assert row is not None and row["failures"] == 0


async def test_reclaim_keeps_valid_leases_only(store: Store) -> None:
    await submit(store, 2)
    a, b = await lease(store, "x", 2)
    out = await store.write(queue.reclaim, "x", [(a["id"], a["token"]), (b["id"], 99)], 30.0)
    assert (out.kept, out.dropped) == ([a["id"]], [b["id"]])
    # b was on record for x but x does not hold it (a grant lost on the way): queued again at once.
    assert out.requeued_pools == {1} and out.undelivered == []
    assert await counts(store) == {"leased": 1, "queued": 1}
    row = await store.fetchone("SELECT failures FROM tasks WHERE id = ?", (b["id"],))
    assert row is not None and row["failures"] == 0
    await check(store)


async def test_a_grant_lost_again_and_again_is_returned_undelivered_not_requeued(store: Store) -> None:
    """A grant that never reaches the agent (a frame it refuses, an agent that dies of it) is requeued
    uncounted MAX_LOST_GRANTS - 1 times in a row; the next loss leaves it leased for the caller to fail,
    instead of a loop. A heartbeat listing the task (it arrived) starts the count again."""
    await submit(store, 1)
    for _ in range(queue.MAX_LOST_GRANTS - 1):
        [t] = await lease(store, "x", 1)
        out = await store.write(queue.reclaim, "x", [], 30.0)
        assert out.undelivered == [] and out.requeued_pools == {1}
    [t] = await lease(store, "x", 1)
    out = await store.write(queue.reclaim, "x", [], 30.0)
    assert out.undelivered == [(t["id"], t["token"])] and out.requeued_pools == set()
    assert await counts(store) == {"leased": 1}
    # Failed by the caller (as the dispatcher does): the attempt counts, and the next one starts afresh.
    failure = Failure(t["id"], t["token"], "could not be delivered", True, 0.0)
    await report(store, queue.Reports(failed=[("x", failure)]))
    row = await store.fetchone("SELECT state, failures, lost_grants, error FROM tasks")
    assert row is not None and (row["state"], row["failures"], row["lost_grants"]) == ("failed", 1, 0)
    await check(store)

    assert await store.write(queue.promote_due) == {1}  # no backoff here: due at once
    [t] = await lease(store, "x", 1)
    await store.write(queue.reclaim, "x", [], 30.0)
    [t] = await lease(store, "x", 1)
    await report(store, queue.Reports(heartbeat=[("x", (t["id"], t["token"]))]))  # it arrived
    row = await store.fetchone("SELECT lost_grants FROM tasks")
    assert row is not None and row["lost_grants"] == 0


async def test_reclaim_leaves_other_instances_leases_alone(store: Store) -> None:
    await submit(store, 2)
    await lease(store, "x", 1)
    await lease(store, "y", 1)
    out = await store.write(queue.reclaim, "x", [], 30.0)
    assert (out.kept, out.dropped, out.requeued_pools, out.undelivered) == ([], [], {1}, [])
    assert await counts(store) == {"leased": 1, "queued": 1}
    row = await store.fetchone("SELECT instance_id FROM tasks WHERE state = 'leased'")
    assert row is not None and row["instance_id"] == "y"


async def test_cancel_and_retry(store: Store) -> None:
    await submit(store, 3)
    (t,) = await lease(store, "a", 1)
    progress = await queue.cancel_all(store, 1)
    assert progress.revoke == [(t["id"], "a")]
    assert await counts(store) == {"cancelled": 3}
    out = await report(store, queue.Reports(done=[("a", Success(t["id"], t["token"], 1, 0.0))]))
    assert out.refused["a"] == [t["id"]]  # a cancelled task takes no result
    assert await store.write(queue.retry_job, 1) == 3
    assert await counts(store) == {"queued": 3}
    await check(store)


async def test_duplicate_ids_refused_with_line_and_nothing_queued(store: Store) -> None:
    job = await store.write(_setup_job, 3)
    upload = await store.write(queue.create_upload, 1)
    first = [ParsedTask(i + 1, f"t{i}", "null", 0, None, None) for i in range(3)]
    await store.write(queue.stage_tasks, job, first, "f.jsonl")
    with pytest.raises(BadInput, match=r"f.jsonl:5: duplicate id 't1'"):
        await store.write(queue.stage_tasks, job, [ParsedTask(4, "t9", "null", 0, None, None),
                                                   ParsedTask(5, "t1", "null", 0, None, None)], "f.jsonl")
    with pytest.raises(BadInput, match=r"f.jsonl:7: duplicate id 'z' \(first given at line 6\)"):
        await store.write(queue.stage_tasks, job, [ParsedTask(6, "z", "null", 0, None, None),
                                                   ParsedTask(7, "z", "null", 0, None, None)], "f.jsonl")
    await queue.finish_upload(store, upload, 1, commit=False)
    assert await counts(store) == {}
    await check(store)


async def test_cancel_during_an_upload_leaves_nothing_runnable(store: Store) -> None:
    """`cloudtaskctl run` interrupted while its task file streams in: the job is cancelled, then
    the upload commits. Its tasks are recorded as cancelled, never leased."""

    job = await store.write(_setup_job, 3)
    upload = await store.write(queue.create_upload, 1)
    await store.write(queue.stage_tasks, job, [ParsedTask(i + 1, f"t{i}", "{}", 0, None, None) for i in range(3)],
                      "tasks.json")
    await queue.cancel_all(store, 1)
    await queue.finish_upload(store, upload, 1, commit=True)
    assert await lease(store, "inst-1", 10) == []
    row = await store.fetchone("SELECT state, n_staged, n_queued, n_cancelled FROM jobs WHERE id = 1")
    assert row is not None and dict(row) == {"state": "cancelled", "n_staged": 0, "n_queued": 0, "n_cancelled": 3}
    await check(store)  # counters match the rows


async def test_an_upload_commits_from_its_own_first_row_whatever_others_do(store: Store) -> None:
    """The commit walks rowids from just below the upload's first staged row (not from 0: every
    older task would be scanned), and still finds all of its rows when another job's upload is
    rejected in between (its deleted rows sat above this upload's first batch)."""
    await submit(store, 100)  # job 1: rows 1..100, committed

    def second_job(tx: Tx) -> dict[str, Any]:
        tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts)"
                      " VALUES ('k', 1, 'active', 0, 3)")
        return {"id": 2, "pool_id": 1, "max_attempts": 3, "timeout_s": None}

    job2 = await store.write(second_job)

    def batch(job: int, keys: range) -> list[ParsedTask]:
        return [ParsedTask(i + 1, f"j{job}-{i}", "{}", 0, None, None) for i in keys]

    up_a = await store.write(queue.create_upload, 1)
    job1 = {"id": 1, "pool_id": 1, "max_attempts": 3, "timeout_s": None}
    await store.write(queue.stage_tasks, job1, batch(1, range(200, 205)), "a.jsonl")  # rows 101..105
    up_b = await store.write(queue.create_upload, 2)
    await store.write(queue.stage_tasks, job2, batch(2, range(5)), "b.jsonl")  # rows 106..110
    await queue.finish_upload(store, up_b, 2, commit=False)  # rejected: rows 106..110 deleted
    await store.write(queue.stage_tasks, job1, batch(1, range(205, 210)), "a.jsonl")  # reuses 106..110
    row = await store.fetchone("SELECT start_after FROM uploads WHERE id = ?", (up_a,))
    assert row is not None and row[0] == 100  # the walk skips the 100 older rows
    await queue.finish_upload(store, up_a, 1, commit=True)
    assert (await counts(store))["queued"] == 110
    await check(store)


def _second_job(tx: Tx) -> dict[str, Any]:
    tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts) VALUES ('k', 1, 'active', 0, 3)")
    return {"id": 2, "pool_id": 1, "max_attempts": 3, "timeout_s": None}


async def _interleaved_uploads(store: Store, batches: int) -> tuple[int, int]:
    """Two jobs' uploads staged at once, in alternating batches of 3: their ids interleave."""
    job1 = await store.write(_setup_job, 3)
    job2 = await store.write(_second_job)
    up1 = await store.write(queue.create_upload, 1)
    up2 = await store.write(queue.create_upload, 2)
    for b in range(batches):
        for job in (job1, job2):
            await store.write(queue.stage_tasks, job, [ParsedTask(i + 1, f"j{job['id']}-{b}-{i}", "{}", 0, None, None)
                                                       for i in range(3)], "t.jsonl")
    return up1, up2


async def _staged(store: Store, job_id: int) -> set[int]:
    rows = await store.fetchall("SELECT id FROM tasks WHERE job_id = ? AND state = 'staged'", (job_id,))
    return {r["id"] for r in rows}


async def test_a_commit_moves_a_bounded_chunk_a_transaction_and_only_its_own_rows(store: Store) -> None:
    """Chunk by chunk, with a chunk of 4: each transaction moves at most 4 rows, and on PostgreSQL
    only rows in its own range of 4 ids (an index range scan of the primary key whose size does not
    grow with the job: docs/performance.md), though another upload's rows sit in between. Then the
    other upload is refused, chunk by chunk too: its rows go, the committed ones stay."""
    up1, up2 = await _interleaved_uploads(store, batches=5)
    pg = not isinstance(store, Store)
    cursor, end = await store.read(lambda db: queue.upload_span(db, up1))
    step = 4
    chunks = 0
    next_cursor: int | None = cursor
    while next_cursor is not None:
        before = await _staged(store, 1)
        after_id = next_cursor
        next_cursor = await store.write(queue.commit_upload_chunk, up1, 1, after_id, step)
        moved = before - await _staged(store, 1)
        assert 0 < len(moved) <= step or (pg and not moved)
        if pg:
            assert all(after_id < i <= after_id + step for i in moved), (after_id, sorted(moved))
        chunks += 1
    if pg:  # the walk covers the upload's ids once, a step a transaction
        assert chunks == -(-(end - cursor) // step)
    assert await _staged(store, 1) == set()
    assert len(await _staged(store, 2)) == 15  # the other upload's rows, untouched
    await queue.finish_upload(store, up2, 2, commit=False, limit=step)
    assert await counts(store) == {"queued": 15}
    assert {r["state"] for r in await store.fetchall("SELECT state FROM uploads")} == {"committed", "rejected"}
    await check(store)


async def test_a_commit_cut_short_is_finished_at_start(store: Store) -> None:
    """The daemon died part-way through a commit (two chunks of 4 done): at start the upload, still
    committing, is finished from where its rows say, once; the other job's upload stays staging."""
    from cloudtaskd.http.submissions import resume_uploads

    up1, _ = await _interleaved_uploads(store, batches=4)
    cursor = await store.read(lambda db: queue.upload_span(db, up1)[0])
    for _ in range(2):
        cursor = await store.write(queue.commit_upload_chunk, up1, 1, cursor, 4)
        assert cursor is not None
    assert 0 < len(await _staged(store, 1)) < 12
    await resume_uploads(store)
    assert await _staged(store, 1) == set()
    # The other upload never finished staging: at start it is refused (its client had no answer).
    assert await counts(store) == {"queued": 12}
    ends = await store.fetchall("SELECT job_id, kind FROM events WHERE kind = 'upload_committed'")
    assert [r["job_id"] for r in ends] == [1]
    await check(store)


async def test_a_cancelled_jobs_upload_commits_as_cancelled_chunk_by_chunk(store: Store) -> None:
    up1, up2 = await _interleaved_uploads(store, batches=3)
    await queue.cancel_all(store, 1)
    await queue.finish_upload(store, up1, 1, commit=True, limit=2)
    await queue.finish_upload(store, up2, 2, commit=True, limit=2)
    assert await counts(store) == {"cancelled": 9, "queued": 9}
    assert len(await store.fetchall("SELECT id FROM events WHERE kind = 'task_cancelled'")) == 9
    await check(store)


async def test_a_resent_report_is_acknowledged_only_if_it_was_recorded(store: Store) -> None:
    """The ack of a done report was lost; the agent resends it. If the task succeeded, the resend is
    acknowledged. If the task was requeued meanwhile (its lease reclaimed, then expired or handed
    back), the report was never recorded: it is refused, so the agent does not believe it was."""
    await submit(store, 2)
    t1, t2 = await lease(store, "inst-1", 2)
    done1 = Success(t1["id"], t1["token"], {"r": 1}, 0.1)
    first = await report(store, queue.Reports(done=[("inst-1", done1)]))
    assert first.accepted["inst-1"] == [t1["id"]]
    again = await report(store, queue.Reports(done=[("inst-1", done1)]))
    assert again.accepted["inst-1"] == [t1["id"]] and not again.refused  # a resend of a recorded result

    await store.write(queue.reclaim, "inst-1", [], 30.0)  # a hello that did not list t2: requeued
    late = await report(store, queue.Reports(done=[("inst-1", Success(t2["id"], t2["token"], {"r": 2}, 0.1))]))
    assert late.refused["inst-1"] == [t2["id"]] and not late.accepted
    row = await store.fetchone("SELECT state, result FROM tasks WHERE id = ?", (t2["id"],))
    assert row is not None and (row["state"], row["result"]) == ("queued", None)


async def test_a_hello_listing_a_reported_task_keeps_its_lease_for_the_resend(store: Store) -> None:
    """The agent lists tasks whose results are sent but not acknowledged: the lease is kept and the
    resent result recorded, instead of the task being requeued and run again."""
    await submit(store, 1)
    [t] = await lease(store, "inst-1", 1)
    out = await store.write(queue.reclaim, "inst-1", [(t["id"], t["token"])], 30.0)
    assert out.kept == [t["id"]] and out.dropped == []
    out = await report(store, queue.Reports(done=[("inst-1", Success(t["id"], t["token"], {"r": 9}, 0.1))]))
    assert out.accepted["inst-1"] == [t["id"]]
    row = await store.fetchone("SELECT state, result FROM tasks WHERE id = ?", (t["id"],))
    assert row is not None and row["state"] == "succeeded" and json.loads(row["result"]) == {"r": 9}


async def test_the_wal_is_copied_into_the_main_file_in_the_background(tmp_path: Path) -> None:
    """Checkpoints run on a connection of their own, not inside the dispatcher's commits: the
    writer's own threshold is far above what a burst writes, yet the main file gets the rows."""
    import shutil
    import sqlite3

    from cloudtaskd.core import store as store_mod

    s = Store(tmp_path / "db" / "t.db")
    await s.open()
    try:
        assert await s.read(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) > 0
        writer_pages = await s.write(lambda tx: tx.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        assert writer_pages == store_mod.WRITER_CHECKPOINT_PAGES
        await submit(s, 300)

        async def main_file_has_them() -> bool:
            copy = tmp_path / "copy.db"  # the main file alone, without its WAL
            shutil.copyfile(tmp_path / "db" / "t.db", copy)
            db = sqlite3.connect(copy)
            try:
                return bool(db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 300)
            except sqlite3.Error:
                return False
            finally:
                db.close()
        await wait_for(main_file_has_them, timeout=10, message="the rows in the main file")
    finally:
        await s.close()


async def test_a_restart_after_the_clock_stepped_back_rebases_leases_and_retry_times(store: Store) -> None:
    """Written before the daemon stopped, on a clock since stepped back an hour: a lease must not be
    held for the hour (its agent may be gone) nor a retry wait it out (issue 15)."""
    await submit(store, 2, max_attempts=3)
    (t1,) = await lease(store, "a", 1, ttl=30, now=10_000.0)
    (t2,) = await lease(store, "a", 1, ttl=30, now=10_000.0)
    await store.write(queue.apply_reports, queue.Reports(failed=[("a", Failure(t2["id"], t2["token"], "x", True, 0))]),
                      queue.RoundResult(), (10.0, 10.0), 30.0, now=10_000.0)
    start = 10_000.0 - 3600  # the daemon starts again, the clock an hour back
    assert await store.write(queue.extend_all_leases, 30.0, now=start) == 1
    assert await store.write(queue.cap_retry_due, 10.0, now=start) == 1
    assert await store.write(queue.cap_retry_due, 10.0, now=start) == 0  # not ahead of its bound: left alone
    assert await store.write(queue.expire_leases, (0.0, 0.0), now=start + 29) == []
    assert await store.write(queue.expire_leases, (0.0, 0.0), now=start + 30) == [(t1["id"], "a")]
    assert await store.write(queue.promote_due, now=start + 12) == {1}
    await check(store)


async def test_a_replica_start_extends_only_the_leases_of_agents_no_live_replica_holds(store: Store) -> None:
    """Replicas (issue 17): "a" is connected to a live replica (written present 2 s ago), "b" and "c"
    to none ("b" last seen long ago, "c" never). A replica starting must not push out a's lease (a
    crash-looping replica would otherwise keep a dead agent's work from expiring, and contend with the
    live replicas' rounds), but must b's and c's, whose agents may be reconnecting to it."""
    await submit(store, 3)
    (ta,) = await lease(store, "a", 1, ttl=30, now=1_000.0)
    (tb,) = await lease(store, "b", 1, ttl=30, now=1_000.0)
    (tc,) = await lease(store, "c", 1, ttl=30, now=1_000.0)

    def agents(tx: Tx) -> None:
        for inst in ("a", "b", "c"):
            instances.add(tx, inst, provider="local", pool_id=1, state=InstanceState.STARTING, slots=1, token_hash="h")

    await store.write(agents)
    await store.write(instances.touch_many, ["b"], now=900.0)
    await store.write(instances.touch_many, ["a"], now=1_018.0)
    assert await store.write(queue.extend_all_leases, 30.0, 6.0, now=1_020.0) == 2
    rows = await store.fetchall("SELECT id, lease_expires_at FROM tasks WHERE state = 'leased' ORDER BY id")
    assert {r["id"]: r["lease_expires_at"] for r in rows} == {ta["id"]: 1_030.0, tb["id"]: 1_050.0, tc["id"]: 1_050.0}
    # One daemon (SQLite): every lease, whoever was seen last.
    assert await store.write(queue.extend_all_leases, 30.0, now=1_020.0) == 3
    await check(store)


def test_the_daemon_clock_does_not_step_with_the_wall_clock() -> None:
    wall, mono = [1_000_000.0], [5.0]
    clock = DaemonClock(lambda: wall[0], lambda: mono[0])
    mono[0] += 2
    wall[0] += 2 + 7200  # two seconds pass and the wall clock steps two hours forward
    assert clock.now() == 1_000_002.0
    assert clock.wall_offset_s() == 7200.0


# ---- a standing queue's single tasks (tables/tasks.enqueue) -----------------------------------------


async def test_single_tasks_are_queued_at_once_leased_and_refused_whole_on_a_duplicate(store: Store) -> None:
    await store.write(_setup_job)
    one = await store.write(queue.enqueue, 1, parse_task(b'{"id": "a", "data": {"n": 1}, "priority": 2}'))
    auto = await store.write(queue.enqueue, 1, parse_task(b'{"data": {"n": 2}}'))
    copies = await store.write(queue.enqueue, 1, parse_task(b'{"id": "c", "data": 3}'), 3)
    assert one.tasks[0][1] == "a" and auto.tasks == [(auto.tasks[0][0], str(auto.tasks[0][0]))]
    assert [k for _, k in copies.tasks] == ["c-1", "c-2", "c-3"] and one.pool_id == 1
    # A copy clashing with a task already there: none of the request is queued.
    with pytest.raises(BadInput, match="duplicate id 'c-1'"):
        await store.write(queue.enqueue, 1, parse_task(b'{"id": "c"}'), 4)  # c-4 is new, and not queued either
    assert await counts(store) == {"queued": 5}
    assert await store.read(queue.check_counters) == []
    leased = await lease(store, "i-1", 10)
    assert leased[0]["id"] == one.tasks[0][0]  # the highest priority first, as any queued task
    assert sorted(t["id"] for t in leased) == sorted(i for r in (one, auto, copies) for i, _ in r.tasks)
    # Where a walk over the job's tasks starts (a cancel, a purge) is below every one of them.
    assert await store.read(lambda db: queue.first_task_cursor(db, 1)) < min(t["id"] for t in leased)
