"""PgStore where PostgreSQL differs from SQLite: several stores (replicas) on one database at once.
The store and queue semantics on both backends are in test_store.py and test_queue.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

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
