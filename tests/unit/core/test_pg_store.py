"""PgStore where PostgreSQL differs from SQLite: several stores (replicas) on one database at once.
The store and queue semantics on both backends are in test_store.py and test_queue.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from cloudtask_wire.messages import Success
from cloudtaskd.core.pg.dbapi import to_pg
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import jobs
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.taskfile import parse_task
from cloudtaskd.errors import BadInput
from tests.unit.core.test_queue import _setup_job, submit

TASKS = 600
PER_LEASE = 7
HOLD_S = 0.003  # a round that holds its transaction a moment, so the two stores' rounds overlap


def _lease_and_hold(tx: Tx, instance_id: str, n: int) -> list[str]:
    got = queue.lease(tx, instance_id, 1, n, 30.0)
    time.sleep(HOLD_S)  # on the writer's thread, inside the transaction: the other replica's round runs meanwhile
    return got


async def _lease_until_empty(store: PgStore, name: str) -> list[int]:
    ids: list[int] = []
    rounds = 0
    while True:
        rounds += 1
        got = await store.write(_lease_and_hold, f"{name}-{rounds}", PER_LEASE)
        if not got:
            return ids
        ids += [json.loads(entry)["id"] for entry in got]


async def test_two_stores_leasing_at_once_never_hand_one_task_to_both(pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await submit(a, TASKS)
        got_a, got_b = await asyncio.gather(_lease_until_empty(a, "a"), _lease_until_empty(b, "b"))
        twice = [task for task, n in Counter(got_a + got_b).items() if n > 1]
        assert twice == [], f"{len(twice)} tasks handed out more than once: {twice[:10]}"
        assert len(got_a) + len(got_b) == TASKS
        assert got_a and got_b  # both replicas leased: the rounds did run side by side
        rows = await a.fetchall("SELECT state, attempt, count(*) AS n FROM tasks GROUP BY state, attempt")
        assert [(r["state"], r["attempt"], r["n"]) for r in rows] == [("leased", 1, TASKS)]
        grants = await a.fetchone("SELECT count(*) AS n FROM events WHERE kind = 'lease_granted'")
        assert grants is not None and grants["n"] == TASKS
        assert await a.read(queue.check_counters) == []
    finally:
        await a.close()
        await b.close()


def _report_and_hold(tx: Tx, reports: queue.Reports, out: queue.RoundResult) -> None:
    queue.apply_reports(tx, reports, out, (0.0, 0.0), 30.0)
    time.sleep(0.2)  # inside the transaction: the other replica's round reads the task meanwhile


async def test_one_report_through_both_replicas_at_once_is_recorded_once(pg_dsn: str) -> None:
    """An agent that failed over resends its report through the other replica while the first one's
    round is still open: the task is recorded succeeded once (one event, counters right) and both
    replicas acknowledge it (the second as the resend of a recorded report)."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await submit(a, 1)
        (entry,) = await a.write(queue.lease, "i-1", 1, 1, 30.0)
        task = json.loads(entry)
        outs = [queue.RoundResult(), queue.RoundResult()]

        def reports() -> queue.Reports:
            return queue.Reports(done=[("i-1", Success(task["id"], task["token"], {"ok": 1}, 0.1))])

        await asyncio.gather(a.write(_report_and_hold, reports(), outs[0]),
                             b.write(_report_and_hold, reports(), outs[1]))
        assert [dict(o.accepted) for o in outs] == [{"i-1": [task["id"]]}] * 2
        assert [dict(o.refused) for o in outs] == [{}, {}]
        row = await b.fetchone("SELECT state, result FROM tasks")
        assert row is not None and (row["state"], json.loads(row["result"])) == ("succeeded", {"ok": 1})
        done = await b.fetchone("SELECT count(*) AS n FROM events WHERE kind = 'task_succeeded'")
        assert done is not None and done["n"] == 1
        assert await b.read(queue.check_counters) == []
    finally:
        await a.close()
        await b.close()


def test_placeholders_are_rewritten_outside_quotes_only() -> None:
    assert to_pg("SELECT ? FROM t WHERE a = ? AND b LIKE 'x?%' AND \"c?\" = ?") == (
        b"SELECT %s FROM t WHERE a = %s AND b LIKE 'x?%%' AND \"c?\" = %s")
    assert to_pg("SELECT 5 % 2") == b"SELECT 5 %% 2"
    assert to_pg("SELECT 1") is to_pg("SELECT 1")  # rewritten once, then cached


async def test_rows_read_by_index_and_by_name(pg_store: PgStore) -> None:
    row: Any = await pg_store.fetchone("SELECT 1 AS one, 'two' AS two, ? AS three", ("3?",))
    assert row is not None
    assert (row[0], row["two"], row["three"]) == (1, "two", "3?")
    assert tuple(row) == (1, "two", "3?") and row.keys() == ["one", "two", "three"]


def _close_and_hold(tx: Tx) -> bool:
    closed = jobs.close(tx, 1)
    time.sleep(0.6)  # on the writer's thread, inside the transaction: the other replica enqueues meanwhile
    return closed


async def test_a_close_on_one_replica_and_an_enqueue_on_another_never_add_a_task_to_a_closed_job(
        pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await a.write(_setup_job)
        await a.write(lambda tx: tx.db.execute("UPDATE jobs SET is_open = 1 WHERE id = 1"))
        closing = asyncio.create_task(a.write(_close_and_hold))
        await asyncio.sleep(0.2)  # the close holds its row lock now
        with pytest.raises(BadInput, match="closed"):
            await b.write(queue.enqueue, 1, parse_task(b'{"id": "late", "data": 1}'))
        assert await closing is True
        assert await a.fetchall("SELECT id FROM tasks") == []
    finally:
        await a.close()
        await b.close()


SWEPT = 200  # expired leases both replicas' sweeps find at once
SWEEP_HOLD_S = 0.5  # a sweep (or a renewal) that keeps its transaction open while the other replica sweeps


def _expire_and_hold(tx: Tx) -> tuple[list[int], list[int]]:
    interrupted, _ = queue.requeue_interrupted(tx)
    expired = queue.expire_leases(tx, (0.0, 0.0))
    time.sleep(SWEEP_HOLD_S)  # on the writer's thread, inside the transaction: the other replica sweeps meanwhile
    return [t for t, _ in interrupted], [t for t, _ in expired]


def _interrupted_instance(tx: Tx) -> None:
    tx.db.execute("INSERT INTO instances (id, provider, state, slots, token_hash, created_at, state_changed_at,"
                  " interrupted_at) VALUES ('i-spot', 'local', 'running', 4, 'h', 0, 0, 0)")


async def test_two_replicas_sweeping_the_same_expired_leases_count_each_expiry_once(pg_dsn: str) -> None:
    """Every replica's dispatcher sweeps expired leases: two sweeps over the same rows at once
    (FOR UPDATE SKIP LOCKED) count each expiry once: one failure per task, one event, counters
    equal to the rows. The same for an interrupted instance's leases (requeued uncounted, once)."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await submit(a, SWEPT)
        await a.write(_interrupted_instance)
        past = time.time() - 100
        await a.write(queue.lease, "i-1", 1, SWEPT // 2, 1.0, now=past)  # expired 99 s ago
        await a.write(queue.lease, "i-spot", 1, SWEPT // 2, 1.0, now=past)
        first = asyncio.create_task(a.write(_expire_and_hold))
        await asyncio.sleep(SWEEP_HOLD_S / 3)  # A's sweep holds its rows now
        second = await b.write(_expire_and_hold)
        swept = [await first, second]
        interrupted = [t for i, _ in swept for t in i]
        expired = [t for _, e in swept for t in e]
        assert len(interrupted) == len(set(interrupted)) == SWEPT // 2, "an interrupted lease requeued twice"
        assert len(expired) == len(set(expired)) == SWEPT // 2, "an expiry counted by both replicas"
        rows = await a.fetchall("SELECT state, failures, count(*) AS n FROM tasks GROUP BY state, failures"
                                " ORDER BY state")
        assert [(r["state"], r["failures"], r["n"]) for r in rows] == [
            ("failed", 1, SWEPT // 2), ("queued", 0, SWEPT // 2)]
        events = await a.fetchall("SELECT kind, count(*) AS n, count(DISTINCT task_id) AS tasks FROM events"
                                  " WHERE kind IN ('lease_expired', 'lease_handed_back') GROUP BY kind ORDER BY kind")
        assert [(r["kind"], r["n"], r["tasks"]) for r in events] == [
            ("lease_expired", SWEPT // 2, SWEPT // 2), ("lease_handed_back", SWEPT // 2, SWEPT // 2)]
        assert await a.read(queue.check_counters) == []
    finally:
        await a.close()
        await b.close()


def _renew_and_hold(tx: Tx, refs: list[tuple[int, int]], out: queue.RoundResult) -> None:
    reports = queue.Reports(heartbeat=[("i-1", ref) for ref in refs])
    queue.apply_reports(tx, reports, out, (0.0, 0.0), 30.0)
    time.sleep(SWEEP_HOLD_S)  # the renewal is not committed yet while the other replica sweeps


async def test_a_lease_renewed_on_one_replica_is_not_expired_by_the_others_sweep(pg_dsn: str) -> None:
    """A heartbeat renews expired-looking leases in a round on replica A while B's sweep runs: the
    sweep passes over the rows the renewal holds, so the renewed leases stay leased, uncounted."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await submit(a, SWEPT)
        granted = await a.write(queue.lease, "i-1", 1, SWEPT, 1.0, now=time.time() - 100)
        refs = [(t["id"], t["token"]) for t in map(json.loads, granted)]
        out = queue.RoundResult()
        renewal = asyncio.create_task(a.write(_renew_and_hold, refs, out))
        await asyncio.sleep(SWEEP_HOLD_S / 3)  # the renewal holds its rows now, not committed
        _, expired = await b.write(_expire_and_hold)
        await renewal
        assert expired == [], f"{len(expired)} renewed leases expired by the other replica's sweep"
        assert dict(out.lost) == {}
        rows = await a.fetchall("SELECT state, failures, count(*) AS n FROM tasks GROUP BY state, failures")
        assert [(r["state"], r["failures"], r["n"]) for r in rows] == [("leased", 0, SWEPT)]
        assert await a.fetchone("SELECT 1 FROM events WHERE kind = 'lease_expired'") is None
        assert await a.read(queue.check_counters) == []
    finally:
        await a.close()
        await b.close()


async def test_an_upload_refreshes_the_planner_statistics_of_tasks(pg_store: PgStore) -> None:
    """The round's statements are planned from PostgreSQL's statistics of tasks. Autovacuum refreshes
    them a minute or more after an upload; until then a table that had no queued task is planned as
    such, and on 50,000 tasks every round scanned every queued row to update the few hundred it leased
    (a hash join) and every row to lock those a report named (docs/performance.md, "On PostgreSQL").
    The plans themselves depend on the table's size; what the upload must leave is statistics that
    know its rows."""
    await submit(pg_store, 5000)
    await _analyzed(pg_store, 4000)  # in the background, after the upload's answer

    def queued_estimate(tx: Tx) -> str:
        return str(tx.db.execute("EXPLAIN SELECT id FROM tasks WHERE state = 'queued'").fetchone()[0])

    plan = await pg_store.write(queued_estimate)
    estimate = int(plan.split("rows=")[1].split()[0])
    assert estimate >= 4000, plan


ANALYZE_DEADLINE_S = 30.0


async def _reltuples(store: PgStore) -> float:
    row = await store.fetchone("SELECT reltuples FROM pg_class WHERE relname = 'tasks'")
    assert row is not None
    return float(row["reltuples"])


async def _analyzed(store: PgStore, rows: int) -> None:
    """Wait (with a deadline) until the statistics of tasks know at least `rows` rows."""
    deadline = time.monotonic() + ANALYZE_DEADLINE_S
    while (held := await _reltuples(store)) < rows:
        assert time.monotonic() < deadline, f"tasks still analyzed as {held:g} rows, not {rows}"
        await asyncio.sleep(0.05)


async def _hold_statistics(pg_dsn: str) -> psycopg.AsyncConnection[Any]:
    """A transaction that holds the rows of tasks in pg_statistic (superuser: the test server's): an
    ANALYZE of tasks, SKIP_LOCKED or not, then waits to write its statistics until it ends, while
    the upload's own writes (which take no lock an ANALYZE holds) go on."""
    conn = await psycopg.AsyncConnection.connect(pg_dsn)
    await conn.execute("UPDATE pg_statistic SET stawidth = stawidth WHERE starelid = 'tasks'::regclass")
    return conn


async def _analyze_waiting(store: PgStore) -> None:
    deadline = time.monotonic() + ANALYZE_DEADLINE_S
    while await store.fetchone("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE '%analyze'"
                               " AND wait_event_type = 'Lock'") is None:
        assert time.monotonic() < deadline, "the ANALYZE never came to wait for the statistics' rows"
        await asyncio.sleep(0.05)


async def test_an_upload_answers_while_its_analyze_waits_and_uploads_meanwhile_coalesce(
        pg_store: PgStore, pg_dsn: str) -> None:
    """The upload's ANALYZE runs after its answer, in the store's background: an ANALYZE held up
    (here by a lock on the statistics' rows; in production a database that stopped answering) holds
    up no upload, and the uploads that arrive meanwhile are analyzed together, once, after it."""
    await submit(pg_store, 5000)
    await _analyzed(pg_store, 4000)
    assert pg_store._analyzer is not None
    before = pg_store._analyzer.analyzed
    holder = await _hold_statistics(pg_dsn)
    try:
        # Each upload is large for the table (>= 10 % of it): each asks for an ANALYZE.
        await asyncio.wait_for(submit(pg_store, 1000, start=5000), ANALYZE_DEADLINE_S)
        await _analyze_waiting(pg_store)
        for n in range(6):
            await asyncio.wait_for(submit(pg_store, 1000, start=6000 + 1000 * n), ANALYZE_DEADLINE_S)
        assert pg_store._analyzer.analyzed == before, "an ANALYZE finished through the held rows"
    finally:
        await holder.rollback()
        await holder.close()
    await _analyzed(pg_store, 11_000)  # the uploads after the held ANALYZE, analyzed by the one after it
    deadline = time.monotonic() + ANALYZE_DEADLINE_S
    while pg_store._analyzer.analyzed < before + 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert pg_store._analyzer.analyzed == before + 2, "the uploads that arrived meanwhile were not coalesced"


async def test_closing_the_store_ends_an_analyze_that_waits(pg_dsn: str) -> None:
    store = PgStore(pg_dsn)
    await store.open()
    closed = False
    holder: psycopg.AsyncConnection[Any] | None = None
    try:
        await submit(store, 5000)
        await _analyzed(store, 4000)
        analyzer = store._analyzer
        assert analyzer is not None
        holder = await _hold_statistics(pg_dsn)
        await submit(store, 1000, start=5000)
        await _analyze_waiting(store)
        await asyncio.wait_for(store.close(), 10)
        closed = True
        assert analyzer._task.done()
        assert analyzer.session.db is None  # its connection closed with the store
    finally:
        if holder is not None:
            await holder.rollback()
            await holder.close()
        if not closed:
            await store.close()
