"""Big jobs bounded (issue 15): a cancel in chunks while other jobs dispatch, finished after a crash;
the event log pruned by age and count; a finished job deleted with its rows and the file given back."""

from __future__ import annotations

import io
import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import Config, EventsConfig, RetentionConfig, ScalingConfig
from cloudtaskd.core import retention
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.housekeeping import Housekeeper
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import cancels
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.taskfile import ParsedTask
from tests import paths
from tests.conftest import make_config, wait_for
from tests.procs import DaemonProcess, bundle
from tests.unit.ctl.test_ctl_answers import ctl

WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "async def run(i, d):\n    return d\n"}


def _pools_and_jobs(tx: Tx) -> None:
    for digest in ("a", "b"):
        tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES (?, '{\"mode\":\"python\"}', '/', 0)",
                      (digest,))


def _job(tx: Tx, pool_id: int) -> dict[str, Any]:
    cur = tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts) VALUES ('j', ?, 'active',"
                        " 0, 3)", (pool_id,))
    return {"id": int(cur.lastrowid or 0), "pool_id": pool_id, "max_attempts": 3, "timeout_s": None}


async def _submit(store: Store, pool_id: int, n: int) -> int:
    job = await store.write(_job, pool_id)
    upload = await store.write(queue.create_upload, job["id"])
    for i in range(0, n, queue.STAGE_BATCH):
        batch = [ParsedTask(k + 1, f"t{k}", "{}", 0, None, None) for k in range(i, min(n, i + queue.STAGE_BATCH))]
        await store.write(queue.stage_tasks, job, batch, "tasks.jsonl")
    await queue.finish_upload(store, upload, job["id"], commit=True)
    return int(job["id"])


@pytest.mark.parametrize("same_pool", [True, False], ids=["same_pool", "other_pool"])
async def test_cancel_in_chunks_leaves_others_dispatching_and_cancels_each_task_once(
        store: Store, tmp_path: Path, same_pool: bool) -> None:
    """20,000 tasks cancelled 500 at a time: the job takes no lease from the first commit on, another
    job's leases go on between the chunks (sharing its pool, the lease query skips the cancelled
    job's queued tasks), and in the end each task is cancelled once, with one event each."""
    await store.write(_pools_and_jobs)
    big = await _submit(store, 1, 20_000)
    other = await _submit(store, 1 if same_pool else 2, 5_000)
    (held,) = [json.loads(t) for t in await store.write(queue.lease, "inst-a", 1, 1, 30.0)]  # big's first
    assert held["key"] == "t0"
    config = make_config(tmp_path, retention=RetentionConfig(chunk_rows=500))
    keeper = Housekeeper(store=store, dispatcher=Dispatcher(store, config), config=config)

    progress = await store.write(queue.cancel_job, big)
    assert (progress.total, progress.done, progress.finished) == (20_000, 0, False)
    granted_between: list[dict[str, Any]] = []
    chunks = 0
    while await store.read(cancels.jobs):
        encoded = await store.write(queue.lease, "inst-b", 1 if same_pool else 2, 10, 30.0)
        granted_between += [json.loads(t) for t in encoded]
        assert await keeper.step()
        chunks += 1
    assert chunks >= 20_000 // 500  # in chunks, not one transaction
    leased_ids = {t["id"] for t in granted_between}
    rows = await store.fetchall("SELECT DISTINCT job_id FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                                (json.dumps(sorted(leased_ids)),))
    assert [r["job_id"] for r in rows] == [other]  # only the other job's, and it kept getting some
    assert len(leased_ids) == 10 * chunks
    job = await store.fetchone("SELECT state, n_queued, n_leased, n_cancelled, finished_at FROM jobs WHERE id = ?",
                               (big,))
    assert job is not None and (job["state"], job["n_queued"], job["n_leased"], job["n_cancelled"]) == (
        "cancelled", 0, 0, 20_000) and job["finished_at"] is not None
    events = await store.fetchone("SELECT count(*) AS n, count(DISTINCT task_id) AS tasks FROM events"
                                  " WHERE kind = 'task_cancelled' AND job_id = ?", (big,))
    assert events is not None and (events["n"], events["tasks"]) == (20_000, 20_000)
    row = await store.fetchone("SELECT state FROM tasks WHERE id = ?", (held["id"],))
    assert row is not None and row["state"] == "cancelled"  # the lease held before: cancelled, revoked
    assert await store.read(queue.check_counters) == []


async def test_a_crash_mid_cancel_is_finished_after_the_restart(tmp_path: Path) -> None:
    """SIGKILL while a 20,000-task cancel goes on 100 at a time: the answer already said "cancelling",
    no task was leased since, and the daemon that starts next finishes it, each task once."""
    n = 20_000
    daemon = DaemonProcess(tmp_path, {"providers": {"local": {"max_instances": 0}},
                                      "retention": {"chunk_rows": 100}})
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "big", "worker": worker["digest"]})
        body = "".join(json.dumps({"id": f"t{i}", "data": i}) + "\n" for i in range(n)).encode()
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))
        answer = await daemon.post(f"/v1/jobs/{job['id']}/cancel")
        assert answer["state"] == "cancelled" and answer["cancelling"] == {"total": n, "cancelled": 100}
        daemon.kill()
        db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
        try:
            left = db.execute("SELECT done FROM cancels").fetchone()
            assert left is not None and left[0] < n, "the cancel had finished before the kill"
        finally:
            db.close()
        await daemon.start()

        async def finished() -> bool:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return bool(j["cancelling"] is None and j["counts"]["cancelled"] == n and j["outcome"] == "cancelled")

        await wait_for(finished, timeout=120, message="the cancel finished after the restart")
        db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
        try:
            assert db.execute("SELECT count(*), count(DISTINCT task_id) FROM events WHERE kind = 'task_cancelled'"
                              ).fetchone() == (n, n)
            assert db.execute("SELECT count(*) FROM events WHERE kind = 'lease_granted'").fetchone()[0] == 0
            assert queue.check_counters(db) == []
        finally:
            db.close()
    finally:
        await daemon.stop()


def _events(tx: Tx, rows: list[tuple[float, str, int | None]]) -> None:
    tx.db.executemany("INSERT INTO events (ts, kind, job_id) VALUES (?, ?, ?)", rows)


async def test_events_pruned_by_age_and_count_keeping_a_held_jobs_results(store: Store, tmp_path: Path) -> None:
    await store.write(_pools_and_jobs)
    job = (await store.write(_job, 1))["id"]
    now = store.clock.now()
    old, young = now - 10_000, now - 10
    # 3,000 old events (1,000 of them a held job's task finishes, 1,000 a deleted job's), then 3,000 young.
    await store.write(_events, [(old, "lease_granted", job)] * 1000 + [(old, "task_succeeded", job)] * 1000
                      + [(old, "task_succeeded", 99)] * 1000 + [(young, "lease_granted", job)] * 3000)
    config = make_config(tmp_path, events=EventsConfig(max_age_s=3600, max_rows=2000),
                         retention=RetentionConfig(chunk_rows=500))
    keeper = Housekeeper(store=store, dispatcher=Dispatcher(store, config), config=config)
    monkey_span = retention.EVENT_SPAN
    retention.EVENT_SPAN = 700  # several spans: the walk goes on across transactions
    try:
        for _ in range(50):
            await keeper.step()
            if not keeper._pruning and keeper._event_cursor:
                break
    finally:
        retention.EVENT_SPAN = monkey_span
    rows = await store.fetchall("SELECT kind, job_id, ts < ? AS old, count(*) AS n FROM events"
                                " GROUP BY kind, job_id, old ORDER BY old DESC, kind", (now - 3600,))
    # By age: every old one but the held job's task finishes; by count: the young beyond the newest 2,000.
    assert [tuple(r) for r in rows] == [("task_succeeded", job, 1, 1000), ("lease_granted", job, 0, 2000)]


async def test_delete_a_finished_job_removes_its_rows_and_the_file_shrinks(tmp_path: Path) -> None:
    """20,000 tasks cancelled, then `cloudtaskctl delete`: "no job" at once, every row of it gone in
    chunks, the freed pages given back (incremental vacuum) and the WAL cut; another job untouched.
    An active job is refused with what to do, and an unknown one is "no job N" (exit 2)."""
    from cloudtaskd.daemon import Daemon

    config = make_config(tmp_path, scaling=ScalingConfig(max_instances=0, tick_s=0.1),
                         retention=RetentionConfig(chunk_rows=1000))
    d = Daemon(config, shutdown_grace_s=5)
    await d.start()
    try:
        tasks = tmp_path / "t.jsonl"
        tasks.write_text("".join(f'{{"id": "t{i}", "data": {{"pad": "{"x" * 200}"}}}}\n' for i in range(20_000)))
        worker = str(paths.ROOT / "examples" / "worker")
        ids = []
        for _ in range(2):
            status, out, err = await ctl(d, "submit", "--tasks", str(tasks), "--worker", worker)
            assert status == 0, err
            ids.append(int(next(w for w in out.split() if w.isdigit())))
        other, big = ids  # big last: its id is the highest, the one a new job would have reused
        status, out, err = await ctl(d, "delete", str(big))
        assert (status, out) == (3, "") and err == (f"cloudtaskctl: job {big} is active with 20000 unfinished tasks:"
                                                    f" cancel it first (cloudtaskctl cancel {big}), then delete it\n")
        status, out, _ = await ctl(d, "cancel", str(big))
        assert status == 0 and out.startswith(f"job {big} cancelling: 1000 of 20000 tasks cancelled so far")

        async def cancelled() -> bool:
            return await d.store.fetchone("SELECT 1 FROM cancels") is None
        await wait_for(cancelled, timeout=60, message="the cancel finished")
        db_path = d.store.path
        before = sum(d.store.file_bytes())
        status, out, err = await ctl(d, "delete", str(big))
        assert (status, err) == (0, "")
        assert out == f"job {big} deleted: its 20000 tasks, results and events are being removed\n"
        assert await ctl(d, "status", str(big)) == (2, "", f"cloudtaskctl: no job {big}\n")
        assert await ctl(d, "delete", str(big)) == (2, "", f"cloudtaskctl: no job {big}\n")

        async def purged_and_compacted() -> bool:
            left = await d.store.fetchone("SELECT (SELECT count(*) FROM purges) + (SELECT count(*) FROM tasks WHERE"
                                          " job_id = ?) + (SELECT count(*) FROM events WHERE job_id = ?) AS n",
                                          (big, big))
            free, _ = await d.store.free_pages()
            return bool(left is not None and left["n"] == 0 and free < 256 and not d.housekeeper._compact)
        await wait_for(purged_and_compacted, timeout=60, message="the job's rows purged and the file compacted")
        after = sum(d.store.file_bytes())
        assert after < before * 0.75, (before, after)
        assert db_path.with_name(db_path.name + "-wal").stat().st_size < 4 << 20
        row = await d.store.fetchone("SELECT n_queued FROM jobs WHERE id = ?", (other,))
        assert row is not None and row["n_queued"] == 20_000
        # A new job never takes the deleted one's id.
        status, out, err = await ctl(d, "submit", "--tasks", str(tasks), "--worker", worker)
        assert status == 0 and int(next(w for w in out.split() if w.isdigit())) == big + 1, out
    finally:
        await d.stop()


async def test_finished_jobs_expire_after_retention(store: Store, tmp_path: Path) -> None:
    await store.write(_pools_and_jobs)
    done_job = await _submit(store, 1, 50)
    await queue.cancel_all(store, done_job)
    live_job = await _submit(store, 1, 50)
    config = make_config(tmp_path, retention=RetentionConfig(finished_jobs_s=60, chunk_rows=100, interval_s=1))
    keeper = Housekeeper(store=store, dispatcher=Dispatcher(store, config), config=config)
    await keeper.step()  # the sweep: nothing finished an hour ago yet
    assert await store.fetchone("SELECT 1 FROM purges") is None
    keeper.config = replace(config, retention=replace(config.retention, finished_jobs_s=0))
    keeper._next_sweep = 0.0
    await keeper.step()  # 0: never
    assert await store.fetchone("SELECT 1 FROM purges") is None
    # An hour later on the daemon clock the cancelled job is past 60 s; the live one is kept.
    keeper.config = config
    keeper._next_sweep = 0.0
    store.clock = _Later(store.clock, 3600)  # type: ignore[assignment]
    while await keeper.step():
        pass
    jobs = await store.fetchall("SELECT id FROM jobs")
    assert [r["id"] for r in jobs] == [live_job]
    left = await store.fetchone("SELECT count(*) AS n FROM tasks WHERE job_id = ?", (done_job,))
    assert left is not None and left["n"] == 0


class _Later:
    """The daemon clock, `ahead_s` later."""

    def __init__(self, clock: Any, ahead_s: float) -> None:
        self.clock, self.ahead_s = clock, ahead_s

    def now(self) -> float:
        return float(self.clock.now()) + self.ahead_s

    def wall_offset_s(self) -> float:
        return float(self.clock.wall_offset_s())


async def test_an_old_database_is_converted_to_incremental_auto_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE leftover (x)")  # made before auto_vacuum was set: NONE
    db.commit()
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()
    store = Store(path)
    await store.open()
    try:
        row = await store.fetchone("PRAGMA auto_vacuum")
        assert row is not None and row[0] == 2
    finally:
        await store.close()


def test_config_defaults() -> None:
    c = Config()
    assert (c.events.max_age_s, c.events.max_rows, c.retention.finished_jobs_s) == (7 * 86400, 1_000_000, 0)
