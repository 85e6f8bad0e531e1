"""store.py on a real SQLite file: migrations, the refusal of a newer schema, the transaction
door (a failed write leaves nothing, a read sees only what was committed), counters and events
written with the transaction, and the store's clock stamped on what it writes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from cloudtaskd.core.clock import DaemonClock
from cloudtaskd.core.states import InstanceEvent, InstanceState, TaskState
from cloudtaskd.core.store import COUNTER, MIGRATIONS, SCHEMA_VERSION, Store, Tx
from cloudtaskd.errors import StoreError, TransitionError
from tests.conftest import wait_for


@pytest.fixture
def store(both_stores: Store) -> Store:
    """Every test here runs on SQLite and on PostgreSQL."""
    return both_stores


def _aiosqlite_threads() -> list[threading.Thread]:
    # aiosqlite runs each connection on a thread of its own, named after its worker function
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name and t.is_alive()]


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def _add_job(tx: Tx) -> int:
    tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES ('d', '{}', '/', 0)")
    cur = tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts)"
                        " VALUES ('j', 1, 'active', 0, 3) RETURNING id")
    return int(cur.fetchone()[0])


def _add_instance(tx: Tx, instance_id: str = "i-1", state: InstanceState = InstanceState.PENDING) -> None:
    tx.db.execute("INSERT INTO instances (id, provider, state, slots, token_hash, created_at, state_changed_at)"
                  " VALUES (?, 'local', ?, 1, 'h', ?, ?)", (instance_id, state.value, tx.now, tx.now))


async def test_migrations_run_from_empty_to_the_schema_version_and_again_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cloudtask.db"
    assert SCHEMA_VERSION == len(MIGRATIONS) and SCHEMA_VERSION > 1
    store = Store(path)
    await store.open()
    try:
        assert _user_version(path) == SCHEMA_VERSION
        job_id = await store.write(_add_job)
    finally:
        await store.close()

    again = Store(path)
    await again.open()  # every migration already applied: none may run twice (ALTER TABLE would fail)
    try:
        assert _user_version(path) == SCHEMA_VERSION
        row = await again.fetchone("SELECT name FROM jobs WHERE id = ?", (job_id,))
        assert row is not None and row["name"] == "j"
        # the last migrations' columns are there
        cols = {r["name"] for r in await again.fetchall("PRAGMA table_info(instances)")}
        assert {"host_key", "interrupted_at", "at_risk_since"} <= cols
    finally:
        await again.close()


async def test_a_database_newer_than_the_code_is_refused_and_nothing_is_left_open(tmp_path: Path) -> None:
    path = tmp_path / "cloudtask.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    before = set(_aiosqlite_threads())
    store = Store(path)
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"newer than this cloudtaskd ({SCHEMA_VERSION})" in message
    assert "upgrade cloudtaskd" in message
    assert _user_version(path) == SCHEMA_VERSION + 1  # untouched
    # a closed connection's thread ends just after close() returns: wait for it, with a deadline
    await wait_for(lambda: asyncio.sleep(0, set(_aiosqlite_threads()) <= before), timeout=10,
                   message="the refused open's connection threads to end")


async def test_a_write_that_raises_rolls_back_its_rows_counters_and_events(store: Store) -> None:
    job_id = await store.write(_add_job)

    class Boom(Exception):
        pass

    def half_done(tx: Tx) -> None:
        _add_instance(tx, "i-half")
        tx.count(job_id, None, TaskState.QUEUED, 5)
        tx.event("half_done", job_id=job_id)
        tx.flush()  # even what reached the database before the error goes
        raise Boom

    with pytest.raises(Boom):
        await store.write(half_done)
    assert await store.fetchone("SELECT id FROM instances WHERE id = 'i-half'") is None
    assert await store.fetchone("SELECT id FROM events WHERE kind = 'half_done'") is None
    row = await store.fetchone(f"SELECT {COUNTER[TaskState.QUEUED]} AS n FROM jobs WHERE id = ?", (job_id,))
    assert row is not None and row["n"] == 0
    # and the door is open again after the failure
    await store.write(_add_instance, "i-next")
    assert await store.fetchone("SELECT id FROM instances WHERE id = 'i-next'") is not None


async def test_a_read_sees_committed_state_only(store: Store) -> None:
    inserted, release = threading.Event(), threading.Event()

    def slow_write(tx: Tx) -> None:
        _add_instance(tx, "i-slow")
        inserted.set()
        # runs on the writer's thread: the event loop (and the reader) go on meanwhile
        if not release.wait(20):
            raise AssertionError("the test never released the write")

    writing = asyncio.ensure_future(store.write(slow_write))
    try:
        assert await asyncio.to_thread(inserted.wait, 20)
        assert await store.fetchone("SELECT id FROM instances WHERE id = 'i-slow'") is None
    finally:
        release.set()
    await writing
    assert await store.fetchone("SELECT id FROM instances WHERE id = 'i-slow'") is not None


async def test_counters_follow_the_counted_moves_in_one_update_at_commit(store: Store) -> None:
    job_id = await store.write(_add_job)

    def moves(tx: Tx) -> None:
        tx.count(job_id, None, TaskState.QUEUED, 10)  # created
        tx.count(job_id, TaskState.QUEUED, TaskState.LEASED, 4)
        tx.count(job_id, TaskState.LEASED, TaskState.SUCCEEDED, 3)
        tx.count(job_id, TaskState.LEASED, TaskState.QUEUED)  # back, one
        tx.count(job_id, TaskState.QUEUED, None, 2)  # deleted

    await store.write(moves)
    cols = ", ".join(f"{COUNTER[s]} AS {s.value}" for s in TaskState)
    row = await store.fetchone(f"SELECT {cols} FROM jobs WHERE id = ?", (job_id,))
    assert row is not None
    got = {s: row[s.value] for s in TaskState}
    expected = dict.fromkeys(TaskState, 0)
    expected.update({TaskState.QUEUED: 10 - 4 + 1 - 2, TaskState.LEASED: 4 - 3 - 1, TaskState.SUCCEEDED: 3})
    assert got == expected


async def test_an_instance_moves_only_along_a_legal_edge_and_each_move_writes_its_event(store: Store) -> None:
    await store.write(_add_instance, "i-1")

    def agent_connected(tx: Tx) -> InstanceState:
        return tx.transition_instance("i-1", InstanceEvent.AGENT_CONNECTED)

    with pytest.raises(TransitionError, match="i-1 is pending"):
        await store.write(agent_connected)  # pending -> running is no edge
    row = await store.fetchone("SELECT state FROM instances WHERE id = 'i-1'")
    assert row is not None and row["state"] == "pending"

    def launched(tx: Tx) -> InstanceState:
        return tx.transition_instance("i-1", InstanceEvent.LAUNCHED, cloud_id="c-1")

    assert await store.write(launched) == InstanceState.STARTING

    def start_failed(tx: Tx) -> InstanceState:
        return tx.transition_instance("i-1", InstanceEvent.START_FAILED, error="bootstrap failed: exit 2")

    assert await store.write(start_failed) == InstanceState.STOPPING
    row = await store.fetchone("SELECT state, cloud_id, last_error, token_hash FROM instances WHERE id = 'i-1'")
    assert row is not None
    assert (row["state"], row["cloud_id"], row["last_error"], row["token_hash"]) == (
        "stopping", "c-1", "bootstrap failed: exit 2", "")
    kinds = [r["kind"] for r in await store.fetchall("SELECT kind FROM events WHERE instance_id = 'i-1' ORDER BY id")]
    assert kinds == [InstanceEvent.LAUNCHED.value, InstanceEvent.START_FAILED.value]

    with pytest.raises(TransitionError, match="does not exist"):
        await store.write(lambda tx: tx.transition_instance("i-nope", InstanceEvent.LAUNCHED))


async def test_stored_times_come_from_the_store_clock(tmp_path: Path) -> None:
    mono = [100.0]
    clock = DaemonClock(wall=lambda: 5_000_000.0, monotonic=lambda: mono[0])
    store = Store(tmp_path / "c.db", clock=clock)
    await store.open()
    try:
        await store.write(_add_instance, "i-1")
        mono[0] += 42.5
        await store.write(lambda tx: tx.transition_instance("i-1", InstanceEvent.LAUNCHED))
        await store.write(lambda tx: tx.event("tick"))
        row = await store.fetchone("SELECT created_at, state_changed_at FROM instances WHERE id = 'i-1'")
        assert row is not None
        assert (row["created_at"], row["state_changed_at"]) == (5_000_000.0, 5_000_042.5)
        ts = [r["ts"] for r in await store.fetchall("SELECT ts FROM events ORDER BY id")]
        assert ts == [5_000_042.5, 5_000_042.5]
        # an explicit time overrides the clock for one write (replays, tests)
        await store.write(lambda tx: tx.event("then"), now=7.0)
        row = await store.fetchone("SELECT ts FROM events WHERE kind = 'then'")
        assert row is not None and row["ts"] == 7.0
    finally:
        await store.close()


async def test_a_closed_store_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.db")
    with pytest.raises(StoreError, match="the store is closed"):
        await store.write(lambda tx: None)
    with pytest.raises(StoreError, match="the store is closed"):
        await store.read(lambda db: None)
