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
from cloudtaskd.errors import DatabaseUnavailable, StoreError

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


class _Session:
    """One sync connection and the one thread that uses it (psycopg connections are not shared
    between threads mid-transaction); reopened at the next use after it broke."""

    def __init__(self, dsn: str, name: str, isolation: psycopg.IsolationLevel) -> None:
        self.dsn = dsn
        self.name = name
        self.isolation = isolation
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pgstore-{name}")
        self.db: PgDb | None = None

    def _open(self) -> PgDb:
        conn: psycopg.Connection[Any] = psycopg.connect(
            self.dsn, autocommit=False, connect_timeout=max(2, round(CONNECT_TIMEOUT_S)),
            application_name=f"{APPLICATION_NAME} {self.name}", row_factory=row_factory,
            options=options(SERVER_SETTINGS))
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


class PgStore(StoreDoors[_Session]):
    def __init__(self, dsn: str, clock: DaemonClock | None = None) -> None:
        super().__init__(clock)
        self.dsn = dsn

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
        for session in (self._reader, self._writer):
            if session is not None:
                await asyncio.get_running_loop().run_in_executor(session.thread, session.close)
                session.thread.shutdown(wait=True)
        self._reader = self._writer = None

    def abort_sessions(self) -> None:
        """The database stopped answering (replica.cutoff): fail the reads and writes waiting on it
        now, rather than when TCP gives up (never, behind a proxy or NAT that swallows packets)."""
        for session in (self._writer, self._reader):
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

    async def analyze(self, table: str) -> None:
        """Refresh the planner's statistics of `table` after a bulk change (an upload queued thousands
        of tasks). Autovacuum does it too, but up to a minute (its naptime) or more later; meanwhile
        the round's statements are planned for the table as it was: a hash join over every queued row
        to update a few hundred, a sequential scan to lock the rows a report names, in every round.
        On a connection of its own, so that the writer (and the rounds) never wait for it; SKIP_LOCKED:
        if autovacuum is at the table right now, that will do. A failure is logged, never raised:
        the statistics catch up later and the plans with them."""
        if table not in ANALYZED_TABLES:
            raise ValueError(f"not a table to analyze: {table!r}")
        began = time.monotonic()
        try:
            conn = await connect(self.dsn, application_name=f"{APPLICATION_NAME} analyze")
            try:
                await conn.execute(sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(sql.Identifier(table)))
            finally:
                await conn.close()
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.warning("pg_analyze_failed", table=table, error=str(exc))
            return
        log.debug("pg_analyzed", table=table, duration_s=round(time.monotonic() - began, 3))

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
