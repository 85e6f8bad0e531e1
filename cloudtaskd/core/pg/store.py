"""The store on PostgreSQL: the same doors as cloudtaskd.core.store.Store (write, read, fetchall,
fetchone, the events signal: both are store.StoreDoors), over psycopg sync connections.

As with SQLite, a write is a plain function run on the writer's own thread: `fn(tx, *args)` with
the same `Tx` (store.run_tx), one transaction, one thread hop, whatever the round holds. The
connection is wrapped (pg.dbapi.PgDb) so the table functions run on it unchanged; where the SQL
must differ, the table module holds both forms side by side.

Writes run in READ COMMITTED; leasing takes its rows with FOR UPDATE SKIP LOCKED and reports
lock the rows they check (tables/tasks.py), so replicas writing the same database at once never
hand one task to two agents nor record a report on a lease another replica moved. Reads run in
REPEATABLE READ: one snapshot per read, as SQLite's read transaction gives.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar, cast

import psycopg
import structlog
from psycopg import sql
from psycopg.types.string import TextLoader

from cloudtaskd.core.clock import DaemonClock
from cloudtaskd.core.pg import migrate
from cloudtaskd.core.pg.connect import (
    APPLICATION_NAME,
    CONNECT_TIMEOUT_S,
    check_dsn,
    connect,
    options,
    shown,
    translate,
    where,
)
from cloudtaskd.core.pg.dbapi import PgDb, row_factory
from cloudtaskd.core.store import StoreDoors
from cloudtaskd.errors import StoreError

log = structlog.get_logger("cloudtaskd.core.pg")

T = TypeVar("T")

ANALYZED_TABLES = frozenset({"tasks"})  # analyze(): the tables bulk changes reshape
PAGE_BYTES = 8192  # PostgreSQL's block size, for free_pages' answer
# A replica cut off mid-transaction leaves its session holding row locks (leases being granted,
# reports being fenced) that every other replica's SKIP LOCKED then passes over: the server ends
# such a session after this long idle in its transaction. Our transactions run in one go on the
# session's thread, never waiting on a person or the network in between.
IDLE_IN_TRANSACTION_S = 5  # and meanwhile another replica's round waits on those rows (FOR UPDATE)
# The server also drops a peer that vanished (a host gone, a cable pulled) by TCP keepalives.
SERVER_SETTINGS = {
    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_S * 1000),
    "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "3",
}
# The background ANALYZE (_Analyzer): it runs only when the rows changed since its last one are at
# least this share of what the table held then (autovacuum's own analyze_scale_factor) and at least
# ANALYZE_MIN_ROWS: a standing queue fed one small upload at a time would otherwise analyze back to
# back, each one invalidating every session's cached plans of tasks for a change the plans survive.
ANALYZE_SHARE = 0.1
ANALYZE_MIN_ROWS = 1000
ANALYZE_TIMEOUT_S = 60  # statement_timeout: the server ends an ANALYZE stuck longer (a lock, a cut-off)


class _Session:
    """One sync connection and the one thread that uses it (psycopg connections are not shared
    between threads mid-transaction); reopened at the next use after it broke."""

    def __init__(self, dsn: str, name: str, isolation: psycopg.IsolationLevel,
                 settings: dict[str, str] = SERVER_SETTINGS) -> None:
        self.dsn = dsn
        self.name = name
        self.isolation = isolation
        self.settings = settings
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pgstore-{name}")
        self.db: PgDb | None = None

    def _open(self) -> PgDb:
        conn: psycopg.Connection[Any] = psycopg.connect(
            self.dsn, autocommit=False, connect_timeout=max(2, round(CONNECT_TIMEOUT_S)),
            application_name=f"{APPLICATION_NAME} {self.name}", row_factory=row_factory,
            options=options(self.settings))
        conn.isolation_level = self.isolation
        # JSONB (instances.offer) read back as its text, as SQLite gives its JSON column: one type for
        # the readers of both databases (the API's instance object, Tx's state_and_offer).
        conn.adapters.register_loader("jsonb", TextLoader)
        return PgDb(conn)

    def db_now(self) -> PgDb:
        """The open connection, on the session's thread; a broken one is replaced (a server restart)."""
        if self.db is None or self.db.conn.closed or self.db.conn.broken:
            if self.db is not None:
                with suppress(psycopg.Error):
                    self.db.conn.close()
                log.warning("pg_store_reconnecting", session=self.name, dsn=shown(self.dsn))
            self.db = None
            self.db = self._open()
        return self.db

    async def run(self, fn: Callable[[PgDb], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.thread, lambda: fn(self.db_now()))

    def abort(self) -> None:
        """From any thread: shut the socket down, so a call blocked on it (an answer a cut-off network
        swallows) fails now, and the next use opens a new connection. Only the shutdown, on a
        duplicate of the descriptor: the session's own thread still owns (and closes) the connection."""
        db = self.db
        if db is None or db.conn.closed:
            return
        with suppress(OSError, psycopg.Error):
            with socket.socket(fileno=os.dup(db.conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.db is not None:
            with suppress(psycopg.Error):
                self.db.conn.close()
            self.db = None


class _Analyzer:
    """The background ANALYZE: one named task per store, one ANALYZE at a time on a session of its
    own (the store's keepalives plus a statement_timeout; PgStore.abort_sessions cuts it off with the
    others). Requests that arrive while one runs are summed into one ANALYZE after it, so a burst of
    uploads costs one or two. A failure is logged, never raised: the statistics catch up at the next
    request or at autovacuum's, and the plans with them."""

    def __init__(self, dsn: str) -> None:
        self.session = _Session(dsn, "analyze", psycopg.IsolationLevel.READ_COMMITTED,
                                {**SERVER_SETTINGS, "statement_timeout": str(ANALYZE_TIMEOUT_S * 1000)})
        self.analyzed = 0  # ANALYZE statements run (tests, logs)
        self._rows: dict[str, int] = {}  # rows changed since the last ANALYZE, by table
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="pg_analyze")
        self._task.add_done_callback(self._ended)

    def request(self, table: str, rows: int) -> None:
        self._rows[table] = self._rows.get(table, 0) + rows
        if self._rows[table] >= ANALYZE_MIN_ROWS:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for table in [t for t, n in self._rows.items() if n >= ANALYZE_MIN_ROWS]:
                rows = self._rows.pop(table)
                try:
                    done = await self.session.run(partial(_analyze_if_large, table, rows))
                except psycopg.Error as exc:
                    # The database away or cut off (abort_sessions), or the statement_timeout: kept
                    # for the next request, never retried in a loop against a database that is away.
                    self._rows[table] = self._rows.get(table, 0) + rows
                    log.warning("pg_analyze_failed", table=table, rows=rows, error=str(exc))
                    continue
                if done is None:
                    self._rows[table] = self._rows.get(table, 0) + rows  # not enough yet for its size
                else:
                    self.analyzed += 1
                    log.debug("pg_analyzed", table=table, rows=rows, duration_s=done)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not an outage (those are caught above): the uploads go on, unanalyzed.
            log.error("pg_analyzer_died", error=repr(task.exception()), exc_info=task.exception())

    async def close(self) -> None:
        """End the task: a running ANALYZE is cut off (its socket shut down: no round trip to a server
        that may not answer), and the server ends it at the latest at its statement_timeout."""
        self._task.cancel()
        self.session.abort()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self.session.thread, self.session.close)
        self.session.thread.shutdown(wait=True)


def _analyze_if_large(table: str, rows: int, db: PgDb) -> float | None:
    """On the analyzer's thread: ANALYZE `table` if `rows` is large for what it held at its last
    ANALYZE (pg_class.reltuples, -1 never analyzed). SKIP_LOCKED: if autovacuum is at the table right
    now, that will do. Returns how long it took, None when the table was too large to bother."""
    conn = db.conn
    try:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
        held = float(row[0]) if row is not None else -1.0
        if held >= 0 and rows < ANALYZE_SHARE * held:
            conn.rollback()
            return None
        began = time.monotonic()
        conn.execute(sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(sql.Identifier(table)))
        conn.commit()
        return round(time.monotonic() - began, 3)
    except BaseException:
        with suppress(psycopg.Error):
            conn.rollback()
        raise


class PgStore(StoreDoors[_Session]):
    def __init__(self, dsn: str, clock: DaemonClock | None = None) -> None:
        super().__init__(clock)
        self.dsn = dsn
        self._analyzer: _Analyzer | None = None

    def __repr__(self) -> str:
        return f"PgStore({shown(self.dsn)!r})"

    async def open(self) -> None:
        check_dsn(self.dsn)
        conn = await connect(self.dsn, application_name=f"{APPLICATION_NAME} migrate")
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()
        self._writer = _Session(self.dsn, "writer", psycopg.IsolationLevel.READ_COMMITTED)
        self._reader = _Session(self.dsn, "reader", psycopg.IsolationLevel.REPEATABLE_READ)
        self._analyzer = _Analyzer(self.dsn)  # its session opens at its first ANALYZE
        try:
            await self._writer.run(lambda db: None)  # a wrong URL fails at open, not at the first write
            await self._reader.run(lambda db: None)
        except psycopg.Error as exc:
            await self.close()
            raise translate(exc, self.dsn) from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._analyzer is not None:
            await self._analyzer.close()
            self._analyzer = None
        for session in (self._reader, self._writer):
            if session is not None:
                await asyncio.get_running_loop().run_in_executor(session.thread, session.close)
                session.thread.shutdown(wait=True)
        self._reader = self._writer = None

    def abort_sessions(self) -> None:
        """The database stopped answering (replica.cutoff): fail the reads and writes waiting on it
        now, rather than when TCP gives up (never, behind a proxy or NAT that swallows packets)."""
        analyzer = self._analyzer.session if self._analyzer is not None else None
        for session in (self._writer, self._reader, analyzer):
            if session is not None:
                session.abort()

    def describe(self) -> str:
        """Which database, as the status page and logs show it: host, port and name, no user or password."""
        return f"postgresql {where(self.dsn)}"

    # The SQLite store's file housekeeping (cloudtaskd.core.housekeeping), on a server that does that
    # job itself: autovacuum reclaims dead rows and keeps freed space for reuse, the server's
    # checkpointer empties its WAL. The housekeeper calls them on both stores; here they find
    # nothing to do.

    async def checkpoint(self) -> tuple[int, int]:
        return 0, 0

    def analyze(self, table: str, rows: int) -> None:
        """Ask for the planner's statistics of `table` to be refreshed after a bulk change of `rows`
        rows (an upload queued thousands of tasks). Autovacuum does it too, but up to a minute (its
        naptime) or more later; meanwhile the round's statements are planned for the table as it was:
        a hash join over every queued row to update a few hundred, a sequential scan to lock the rows
        a report names, in every round. Returns at once: the ANALYZE runs in the background
        (_Analyzer), so neither the upload's answer nor its job's upload lock waits for it."""
        if table not in ANALYZED_TABLES:
            raise ValueError(f"not a table to analyze: {table!r}")
        if self._analyzer is None:
            raise StoreError(f"the store {shown(self.dsn)} is not open")
        self._analyzer.request(table, rows)

    async def free_pages(self) -> tuple[int, int]:
        return 0, PAGE_BYTES

    async def vacuum_step(self, pages: int) -> int:
        return 0

    async def truncate_wal(self) -> bool:
        return True

    def file_bytes(self) -> tuple[int, int]:
        return 0, 0  # no file of ours: the database's size is the server's (pg_database_size)

    async def _write_tx(self, writer: _Session, body: Callable[[sqlite3.Connection], T]) -> T:
        """A READ COMMITTED transaction, begun by the driver at the first statement."""
        def run(db: PgDb) -> T:
            try:
                # PgDb offers the part of sqlite3.Connection the table functions use; typed as one
                # so that they keep one signature for both databases.
                out = body(cast(sqlite3.Connection, db))
                db.conn.commit()
                return out
            except BaseException:
                with suppress(psycopg.Error):
                    db.conn.rollback()
                raise

        try:
            return await writer.run(run)
        except psycopg.DataError:
            # A value the statement cannot take (an id past bigint from a broken report): as
            # SQLite's OverflowError, a bug to drop with its round, not an outage to retry.
            raise
        except psycopg.Error as exc:
            raise StoreError(f"writing to the database {shown(self.dsn)} failed: {exc}") from exc

    async def _read_tx(self, reader: _Session, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A REPEATABLE READ transaction (the reader session's level): one snapshot for all of fn."""
        def run(db: PgDb) -> T:
            try:
                return fn(cast(sqlite3.Connection, db))
            finally:
                with suppress(psycopg.Error):
                    db.conn.rollback()  # read only: nothing to keep; ends the snapshot

        try:
            return await reader.run(run)
        except psycopg.Error as exc:
            raise StoreError(f"reading the database {shown(self.dsn)} failed: {exc}") from exc
