"""The PostgreSQL backend's foundation against a real server (tests/fakes/postgres.py): schema, leader
lock, wake-ups, and DSN passwords kept out of errors and logs."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from cloudtaskd import redact
from cloudtaskd.core.pg import connect as pgconnect
from cloudtaskd.core.pg import migrate as pgmigrate
from cloudtaskd.core.pg.leader import Leadership
from cloudtaskd.core.pg.notify import Listener, notify
from cloudtaskd.core.store import Store
from cloudtaskd.errors import DatabaseUnavailable, StoreError
from tests.conftest import wait_for
from tests.fakes.netproxy import Proxy
from tests.fakes.postgres import PASSWORD, PostgresServer
from tests.procs import free_port


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    redact.forget_all()
    yield
    redact.forget_all()


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def _value(conn: psycopg.AsyncConnection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = await (await conn.execute(sql, params)).fetchone()
    return None if row is None else row[0]


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return await (await cur.execute(sql)).fetchall()


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- schema -------------------------------------------------------------------------------------

_TYPES = {"INTEGER": {"integer", "bigint"}, "REAL": {"double precision"}, "TEXT": {"text", "jsonb"}}


def _default(value: object) -> str | None:
    """A column default as both databases spell it, without quotes and casts: '{}'::jsonb -> {}."""
    if value is None:
        return None
    return re.sub(r"::[a-z ]+$", "", str(value)).strip("'")


# Tables PostgreSQL has and SQLite does not, each for a reason of its own: `bundles` holds the worker
# tarballs the replicas share (one SQLite daemon has one state directory; an empty twin would only mislead).
PG_ONLY = {"bundles"}


async def test_schema_matches_sqlite(pg_dsn: str, tmp_path: Path) -> None:
    """Every SQLite table, column (type, nullability, default) and named index exists in PostgreSQL:
    a SQLite migration without its PostgreSQL twin fails here."""
    store = Store(tmp_path / "ref.db")
    await store.open()
    await store.close()
    lite = sqlite3.connect(tmp_path / "ref.db")
    tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                         "AND name NOT LIKE 'sqlite_%'")]
    want = {t: {r[1]: (r[2].upper(), bool(r[3]) or bool(r[5]), _default(r[4]))
                for r in lite.execute(f"PRAGMA table_info({t})")} for t in tables}
    want_indexes = {r[0]: bool(r[1]) for r in lite.execute(
        "SELECT name, sql LIKE '% WHERE %' FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    lite.close()

    conn = await _connect(pg_dsn)
    try:
        assert await pgmigrate.migrate(conn) == pgmigrate.SCHEMA_VERSION
        rows = await _rows(conn, "SELECT table_name, column_name, data_type, is_nullable, column_default, "
                                "is_identity FROM information_schema.columns WHERE table_schema = 'public'")
        indexes = {r["indexname"]: " WHERE " in r["indexdef"] for r in await _rows(conn,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")}
    finally:
        await conn.close()
    got: dict[str, dict[str, tuple[str, bool, str | None]]] = {}
    for r in rows:
        default = None if r["is_identity"] == "YES" else _default(r["column_default"])
        got.setdefault(r["table_name"], {})[r["column_name"]] = (r["data_type"], r["is_nullable"] == "NO", default)
    assert set(got) - {"schema_migrations"} - PG_ONLY == set(want)
    assert PG_ONLY <= set(got)
    for table, columns in want.items():
        assert set(got[table]) == set(columns), table
        for name, (lite_type, not_null, default) in columns.items():
            pg_type, pg_not_null, pg_default = got[table][name]
            assert pg_type in _TYPES[lite_type], (table, name, pg_type)
            assert pg_not_null == not_null, (table, name)
            assert pg_default == default, (table, name, pg_default, default)
    for name, partial in want_indexes.items():
        assert indexes.get(name) == partial, (name, indexes.get(name))


async def test_migrate_is_idempotent_and_safe_from_two_replicas_at_once(pg_dsn: str) -> None:
    conns = [await _connect(pg_dsn) for _ in range(3)]
    try:
        # Two replicas starting together: one applies, the other waits on the lock and finds it done.
        both = await asyncio.gather(pgmigrate.migrate(conns[0]), pgmigrate.migrate(conns[1]))
        assert both == [pgmigrate.SCHEMA_VERSION] * 2
        again = await pgconnect.connect(pg_dsn)
        try:
            assert await pgmigrate.migrate(again) == pgmigrate.SCHEMA_VERSION  # again: nothing to do
        finally:
            await again.close()
        assert await _value(conns[2], "SELECT count(*) FROM schema_migrations") == pgmigrate.SCHEMA_VERSION
        tables = sum(pgmigrate.migration_sql(m).count("CREATE TABLE ") for m in pgmigrate.MIGRATIONS)
        assert await _value(conns[2], "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == tables + 1
        # A database a newer cloudtaskd upgraded is refused, not written to.
        await conns[2].execute("INSERT INTO schema_migrations VALUES (99, '099_future.sql', 0)")
        with pytest.raises(StoreError, match="newer than this cloudtaskd"):
            await pgmigrate.migrate(conns[2])
    finally:
        for c in conns:
            await c.close()


# --- leader -------------------------------------------------------------------------------------

FAST = {"retry_s": 0.1, "ping_interval_s": 0.2, "ping_timeout_s": 0.5, "session_timeout_s": 3.0}


async def test_one_leader_and_failover_when_its_session_dies(pg_dsn: str) -> None:
    changes: list[tuple[str, bool]] = []
    a = Leadership(pg_dsn, name="a", on_change=lambda v: changes.append(("a", v)), **FAST)
    b = Leadership(pg_dsn, name="b", on_change=lambda v: changes.append(("b", v)), **FAST)
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        await wait_for(lambda: _true(a.is_leader or b.is_leader), message="a leader")
        leader, other = (a, b) if a.is_leader else (b, a)
        tries = other.attempts
        await wait_for(lambda: _true(other.attempts >= tries + 3), message="the other to try again")
        assert leader.is_leader and not other.is_leader

        admin = await _connect(pg_dsn)
        try:
            killed_at = time.monotonic()
            assert await _value(admin, "SELECT pg_terminate_backend(%s)", (leader.backend_pid,))
            await wait_for(lambda: _true(other.is_leader), timeout=5, message="the other to take over")
            failover_s = time.monotonic() - killed_at
            assert leader.stepped_down.is_set() and not leader.is_leader
            # The old leader reconnects as a follower: the lock is taken, it does not lead again.
            tries = leader.attempts
            await wait_for(lambda: _true(leader.attempts >= tries + 3), message="the old leader to try again")
            assert not leader.is_leader and other.is_leader
            holders = await _value(admin,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            assert holders == 1
        finally:
            await admin.close()
        print(f"leader failover after pg_terminate_backend: {failover_s * 1000:.0f} ms")
        assert changes == [(leader.name, True), (leader.name, False), (other.name, True)]
    finally:
        await _stop(*tasks)


async def test_a_leader_cut_off_steps_down_before_another_takes_over(pg_dsn: str, pg_server: PostgresServer) -> None:
    """No split brain: a network that drops everything (no reset) between leader and database."""
    proxy = Proxy(pg_server.host, pg_server.port)
    await proxy.start()
    stamps: dict[tuple[str, bool], float] = {}
    a = Leadership(pg_server.dsn(pg_dsn.rsplit("/", 1)[1], port=proxy.port), name="a",
                   on_change=lambda v: stamps.setdefault(("a", v), time.monotonic()), **FAST)
    task_a = asyncio.create_task(a.run())
    try:
        await wait_for(lambda: _true(a.is_leader), message="a to lead")
        b = Leadership(pg_dsn, name="b", on_change=lambda v: stamps.setdefault(("b", v), time.monotonic()), **FAST)
        task_b = asyncio.create_task(b.run())
        try:
            await wait_for(lambda: _true(b.attempts >= 2), message="b to try")
            cut_at = time.monotonic()
            proxy.blackhole()
            await wait_for(lambda: _true(b.is_leader), timeout=15, message="b to take over")
            assert a.stepped_down.is_set()
            print(f"cut off: a stepped down after {stamps['a', False] - cut_at:.2f} s, "
                  f"b led after {stamps['b', True] - cut_at:.2f} s")
            assert stamps["a", False] < stamps["b", True]
        finally:
            await _stop(task_b)
    finally:
        await _stop(task_a)
        await proxy.stop()


async def _true(value: bool) -> bool:
    return value


# --- notify -------------------------------------------------------------------------------------

async def test_notify_wakes_a_listener_on_another_connection(pg_dsn: str) -> None:
    payloads: list[str] = []
    listener = Listener(pg_dsn, on_notify=payloads.append)
    task = asyncio.create_task(listener.run())
    conn = await pgconnect.connect(pg_dsn)
    try:
        await wait_for(lambda: _true(listener.listening.is_set()), message="LISTEN")
        async with conn.transaction():
            await notify(conn, "pool-7")
            await asyncio.sleep(0.2)
            assert "pool-7" not in payloads  # delivered at commit, not before
        await wait_for(lambda: _true("pool-7" in payloads), message="the notification")
        assert listener.received == 1
    finally:
        await conn.close()
        await _stop(task)


async def test_listener_carries_on_across_a_server_restart(pg_dsn: str, pg_server: PostgresServer) -> None:
    payloads: list[str] = []
    listener = Listener(pg_dsn, on_notify=payloads.append, reconnect_s=0.1)
    task = asyncio.create_task(listener.run())
    try:
        await wait_for(lambda: _true(listener.listening.is_set()), message="LISTEN")
        began = time.monotonic()
        await asyncio.to_thread(pg_server.restart)
        restart_s = time.monotonic() - began
        await wait_for(lambda: _true(listener.connections >= 2 and listener.listening.is_set()),
                       message="the listener to reconnect")
        assert payloads[-1] == ""  # the reconnection itself woke it: what was sent meanwhile is lost
        conn = await _connect(pg_dsn)
        try:
            await notify(conn, "after-restart")
        finally:
            await conn.close()
        await wait_for(lambda: _true("after-restart" in payloads), message="a notification after the restart")
        print(f"server restart (fast shutdown + start): {restart_s:.2f} s")
    finally:
        await _stop(task)


# --- secrets ------------------------------------------------------------------------------------

def test_shown_dsn_hides_every_password() -> None:
    assert pgconnect.shown("postgresql://u:p%40ss-word-1@db:5432/ct") == "postgresql://u:<SECRET>@db:5432/ct"
    assert (pgconnect.shown("postgresql://u@h1:5432,h2:5433/ct?password=qsecret-99&sslmode=require")
            == "postgresql://u@h1:5432,h2:5433/ct?password=<SECRET>&sslmode=require")
    assert pgconnect.shown("postgresql://db/ct") == "postgresql://db/ct"


async def test_dsn_password_never_in_errors_or_logs(pg_server: PostgresServer) -> None:
    wrong = "wrong-pw-7c5e1d9b0a"
    cases = {
        pg_server.dsn(password=wrong): ("refused user 'cloudtask'", False),
        pg_server.dsn(port=free_port()): ("connection refused", True),
        pg_server.dsn("no_such_db"): ("no such database", False),
        f"mysql://cloudtask:{PASSWORD}@127.0.0.1/x": ("must start with postgresql://", False),
        f"postgresql://cloudtask:{PASSWORD}@127.0.0.1:99999999/x": ("malformed", False),
    }
    for dsn, (says, retryable) in cases.items():
        with pytest.raises(DatabaseUnavailable) as caught:
            await pgconnect.connect(dsn, timeout_s=5)
        text = f"{caught.value} {caught.value!r} {caught.value.dsn}"
        assert says in str(caught.value), text
        assert caught.value.retryable is retryable, text
        assert PASSWORD not in text and wrong not in text, text

    # The background loops log their failures (once per outage); none shows the password.
    bad = pg_server.dsn(password=wrong)
    with capture_logs() as logs:
        leader = Leadership(bad, name="a", **FAST)
        listener = Listener(bad, reconnect_s=0.1)
        tasks = [asyncio.create_task(leader.run()), asyncio.create_task(listener.run())]
        try:
            await wait_for(lambda: _true(len(logs) >= 2), message="the connect failures to be logged")
        finally:
            await _stop(*tasks)
    events = {e["event"] for e in logs}
    assert {"pg_leader_connect_failed", "pg_listener_connect_failed"} <= events, logs
    assert "<SECRET>" in str(logs)
    assert wrong not in str(logs) and PASSWORD not in str(logs)
