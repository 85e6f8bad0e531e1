"""The only owner of the SQLite database: connections, migrations, and the transaction door.

Writes go through one connection, one transaction at a time (`Store.write`), as a plain
function run on aiosqlite's own thread: a whole dispatch round — reports, leases, events and
counters — costs one thread hop and one commit, not one hop per statement. Reads that the
control API serves use a second connection, so a long read never stalls dispatch (WAL lets
readers and the writer run together).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

import aiosqlite
import structlog

from cloudtaskd.core.clock import DaemonClock
from cloudtaskd.core.states import (
    COUNTER,
    INSTANCE_TRANSITIONS,
    InstanceEvent,
    InstanceState,
    TaskState,
)
from cloudtaskd.core.tables import events, instances, jobs
from cloudtaskd.core.tables.tx import Tx as Tx  # what callers annotate a transaction with
from cloudtaskd.core.writelock import WriteLock
from cloudtaskd.errors import StoreError, StoreFull, TransitionError, is_no_space
from cloudtaskd.redact import redact

log = structlog.get_logger("cloudtaskd.core.store")

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")  # a backend's connection (or session) type

MIGRATIONS = ["001_initial.sql", "002_host_keys.sql", "003_instance_host_key.sql", "004_catalog.sql",
              "005_job_policy.sql", "006_hot_indexes.sql", "007_job_state_reason.sql",
              "008_interruptions.sql", "009_error_events.sql", "010_lost_grants.sql",
              "011_finished_events.sql", "012_launch_failures.sql",
              "013_catalog_arch.sql", "014_bounded.sql", "015_runs.sql", "016_open_jobs.sql", "017_upload_end.sql"]
SCHEMA_VERSION = len(MIGRATIONS)

CHECKPOINT_INTERVAL_S = 0.5  # how often the WAL is copied into the main file, off the writer's path
WRITER_CHECKPOINT_PAGES = 10_000  # the writer checkpoints (and restarts the WAL) past this many pages

WAL_SIZE_LIMIT_BYTES = 64 << 20
# An older database (auto_vacuum off) is rebuilt with auto_vacuum=INCREMENTAL at open when it is at
# most this big: a VACUUM copies the whole file, a few seconds for this much. A bigger one is left
# as it is, with a warning saying how to convert it while the daemon is stopped (docs/reliability.md).
AUTO_VACUUM_CONVERT_MAX_BYTES = 256 << 20
WAL_TRUNCATE_BUSY_MS = 100  # a WAL truncation waits this long for the writer and readers, then tries later

SQLITE_IOERR = 10
SQLITE_FULL = 13
# Below this much free space an I/O error is taken for a full disk: SQLite reports a WAL index
# (-shm) that cannot grow, or a journal write that ran out of room, as SQLITE_IOERR_*, not FULL.
LOW_SPACE_BYTES = 1 << 20


def free_bytes(path: Path) -> int | None:
    """Space left to an unprivileged writer on the filesystem holding path (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_full(exc: sqlite3.Error, directory: Path) -> bool:
    """Did this SQLite error come from a full disk?"""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    if code & 0xFF == SQLITE_FULL:
        return True
    if code & 0xFF == SQLITE_IOERR:
        left = free_bytes(directory)
        return left is not None and left < LOW_SPACE_BYTES
    return False


def _migration_sql(name: str) -> str:
    return resources.files("cloudtaskd.core").joinpath("sql", name).read_text()


def _configure(db: sqlite3.Connection) -> None:
    # First: a new database file takes it when its first table is made (after journal_mode=WAL has
    # written the header it could not). Pages freed by deletions then go back to the filesystem
    # through incremental_vacuum (Store.vacuum_step); an older database is converted at open.
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    # WAL: readers never block the writer. synchronous=FULL: a commit is on disk before we
    # acknowledge anything (NORMAL could lose the last commits on power loss).
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=10000")
    db.execute("PRAGMA cache_size=-16000")  # 16 MiB page cache: bounded RSS with a big queue
    db.execute("PRAGMA temp_store=MEMORY")
    # A WAL that grew during a burst (a million-task cancel or delete) is cut back to this when it
    # next starts over, instead of keeping its largest size on disk for ever.
    db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")


def _migrate(db: sqlite3.Connection) -> int:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}, newer than this cloudtaskd ({SCHEMA_VERSION}); "
            "upgrade cloudtaskd"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(_migration_sql(MIGRATIONS[version - 1])):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _convert_auto_vacuum(path: Path, db: sqlite3.Connection) -> None:
    """A database made before auto_vacuum was set keeps every page it ever used: rebuild it once with
    auto_vacuum=INCREMENTAL when that is quick and the disk has room for the copy, else say how."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 0:
        return
    size = path.stat().st_size
    wal = path.with_name(path.name + "-wal")
    size += wal.stat().st_size if wal.exists() else 0
    left = free_bytes(path.parent)
    how = (f"stop cloudtaskd and run: sqlite3 {path} 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'"
           " (it needs free space for a copy of the file)")
    if size > AUTO_VACUUM_CONVERT_MAX_BYTES or (left is not None and left < 2 * size + LOW_SPACE_BYTES):
        log.warning("store_auto_vacuum_off", path=str(path), size_bytes=size, free_bytes=left,
                    why="space freed by deletions stays inside the file until it is converted", fix=how)
        return
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("VACUUM")  # the copy goes through the WAL: cut it back at once (nobody else is connected yet)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log.info("store_auto_vacuum_enabled", path=str(path), size_before_bytes=size,
             size_after_bytes=path.stat().st_size)


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements, buf = [], []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0]
        buf.append(stripped)
        if stripped.rstrip().endswith(";") and sqlite3.complete_statement("\n".join(buf)):
            statements.append("\n".join(buf).strip())
            buf = []
    if "".join(buf).strip():
        statements.append("\n".join(buf).strip())
    return statements


@dataclass(slots=True)
class EventRow:
    kind: str
    job_id: int | None = None
    task_id: int | None = None
    instance_id: str | None = None
    detail: str | None = None


class Transaction:
    """One write transaction on the writer thread (the table modules see it as tables.tx.Tx):
    statement helpers, events and counters.

    Counter deltas and events are buffered and written at commit, so a transaction that
    touches 10,000 tasks writes one UPDATE per job, not one per task.
    """

    __slots__ = ("_deltas", "db", "events", "now", "sql_events")

    def __init__(self, db: sqlite3.Connection, now: float) -> None:
        self.db = db
        self.now = now
        self.events: list[tuple[float, str, int | None, int | None, str | None, str | None]] = []
        self._deltas: dict[int, dict[str, int]] = {}
        # Set by a statement that wrote event rows itself (INSERT ... SELECT, a chunk of a cancel):
        # the commit wakes the event followers as for rows written through event().
        self.sql_events = False

    def event(self, kind: str, *, job_id: int | None = None, task_id: int | None = None,
              instance_id: str | None = None, detail: str | None = None) -> None:
        # A detail often quotes an error from a cloud SDK, ssh or a worker: shown by /v1/events,
        # cloudtaskctl events and the status page, so known secrets are taken out here.
        self.events.append((self.now, kind, job_id, task_id, instance_id, None if detail is None else redact(detail)))

    def count(self, job_id: int, src: TaskState | None, dst: TaskState | None, n: int = 1) -> None:
        """Record that n tasks of a job moved from src to dst (None: created / deleted)."""
        d = self._deltas.setdefault(job_id, {})
        if src is not None:
            d[COUNTER[src]] = d.get(COUNTER[src], 0) - n
        if dst is not None:
            d[COUNTER[dst]] = d.get(COUNTER[dst], 0) + n

    def flush(self) -> None:
        for job_id, delta in self._deltas.items():
            delta = {k: v for k, v in delta.items() if v}
            if delta:
                jobs.add_to_counters(self.db, job_id, delta)
        self._deltas.clear()
        if self.events:
            events.insert_many(self.db, self.events)
            self.events = []

    def transition_instance(self, instance_id: str, event: InstanceEvent, *, error: str | None = None,
                            **columns: Any) -> InstanceState:
        """Move one instance along a legal edge, guarded by its current state; raises on a lost race."""
        sources = [src for (src, ev) in INSTANCE_TRANSITIONS if ev == event]
        state = instances.state_of(self.db, instance_id)
        if state is None:
            raise TransitionError(f"instance {instance_id} does not exist")
        current = InstanceState(state)
        if current not in sources:
            raise TransitionError(f"instance {instance_id} is {current}; {event} needs one of {sources}")
        target = INSTANCE_TRANSITIONS[(current, event)]
        sets = {"state": target.value, "state_changed_at": self.now, **columns}
        if error is not None:
            sets["last_error"] = redact(error)  # often a cloud SDK's own text: shown by cloudtaskctl
        if target == InstanceState.STOPPED:
            sets.setdefault("ended_at", self.now)
        if target in (InstanceState.STOPPING, InstanceState.STOPPED):
            sets["token_hash"] = ""  # revoked: no hash matches it

        if not instances.set_if_state(self.db, instance_id, current, sets):
            raise TransitionError(f"instance {instance_id} changed state concurrently")
        self.event(event.value, instance_id=instance_id, detail=error)
        return target


def run_tx(db: sqlite3.Connection, now: float, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, bool]:
    """The body of every write transaction, on either database (the caller begins and commits it):
    fn(tx, *args), then the buffered counters and events. Returns fn's result and whether the
    transaction wrote event rows (the commit then wakes the event followers)."""
    tx = Transaction(db, now)
    out = fn(tx, *args)
    wrote_events = bool(tx.events) or tx.sql_events
    tx.flush()
    return out, wrote_events


class EventWaits:
    """The wake-up of GET /v1/events' long polls, shared by both stores: one fresh Event per commit
    that wrote events, the old one set."""

    def __init__(self) -> None:
        self._events_signal = asyncio.Event()
        self.stopping = False  # set by end_waits(): long polls answer at once

    def events_signal(self) -> asyncio.Event:
        """Set once the next transaction that writes event rows has committed. Take it before
        reading the events, so that a commit between the read and the wait is not missed."""
        return self._events_signal

    def end_waits(self) -> None:
        """The daemon is stopping: whoever waits for events is woken and waits no more (a long
        poll would otherwise hold the control API's shutdown for its whole wait)."""
        self.stopping = True
        self._events_signal.set()

    def _events_committed(self) -> None:
        signal, self._events_signal = self._events_signal, asyncio.Event()
        signal.set()


def opened(conn: C | None) -> C:
    """A store's connection, or the error of a store that is closed (or was never opened)."""
    if conn is None:
        raise StoreError("the store is closed")
    return conn


class StoreDoors(EventWaits, ABC, Generic[C]):
    """The doors both stores share (Store here on SQLite, pg.store.PgStore on PostgreSQL): write, read,
    fetchall and fetchone over a writer and a reader connection of type C, the write lock, the clock
    a transaction sees, and the wake-up of the event followers after a commit. What differs stays in
    each backend, in `_write_tx` and `_read_tx`: how a transaction begins, ends and rolls back, which
    snapshot a read sees, and how the driver's errors are told."""

    def __init__(self, clock: DaemonClock | None) -> None:
        super().__init__()
        # The time every transaction sees as tx.now: monotonic while the daemon runs (cloudtaskd.core.clock).
        self.clock = clock if clock is not None else DaemonClock()
        self._writer: C | None = None
        self._reader: C | None = None
        self._write_lock = WriteLock()
        # Since when (self.clock) writes have failed for a full disk; None while they succeed. The
        # outage is logged when it starts and when it ends, not once per failed write. Always None
        # on PostgreSQL, whose disk is the server's.
        self.full_since: float | None = None

    @abstractmethod
    async def _write_tx(self, writer: C, body: Callable[[sqlite3.Connection], T]) -> T:
        """body(db) in one write transaction on the writer's thread, committed, or rolled back when
        it raises; a driver error raised as StoreError."""

    @abstractmethod
    async def _read_tx(self, reader: C, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(db) in one read transaction (a consistent snapshot) on the reader's thread; a driver
        error raised as StoreError."""

    async def write(self, fn: Callable[..., T], *args: Any, now: float | None = None, urgent: bool = False) -> T:
        """Run fn(tx, *args) in one transaction on the writer thread; commit or roll back.

        Nothing is acknowledged to anyone before this returns: the commit is durable first.
        urgent: served before every waiting ordinary writer (the dispatcher's rounds).
        """
        writer = opened(self._writer)
        stamp = self.clock.now() if now is None else now
        async with self._write_lock.hold(urgent=urgent):
            out, wrote_events = await self._write_tx(writer, lambda db: run_tx(db, stamp, fn, args))
        if wrote_events:
            self._events_committed()  # wake the long polls of GET /v1/events
        return out

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(db) on the reader connection inside one read transaction (a consistent snapshot)."""
        return await self._read_tx(opened(self._reader), fn)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return await self.read(lambda db: db.execute(sql, tuple(params)).fetchall())

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        return await self.read(lambda db: db.execute(sql, tuple(params)).fetchone())


async def _on_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run fn on the connection's own thread with its sqlite3 connection: one hop for a whole
    transaction. aiosqlite has no public API for this; `_execute` is stable across 0.17-0.22 and
    aiosqlite is pinned below 0.23 in pyproject.toml."""
    result: T = await conn._execute(fn, conn._conn)  # type: ignore[no-untyped-call]
    return result


class Store(StoreDoors[aiosqlite.Connection]):
    def __init__(self, path: Path, clock: DaemonClock | None = None) -> None:
        super().__init__(clock)
        self.path = path
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None

    def _failed(self, exc: sqlite3.Error | OSError, doing: str) -> StoreError:
        """The StoreError for a driver error: StoreFull (the outage noted) when the disk is full."""
        directory = self.path.parent
        if not (is_no_space(exc) if isinstance(exc, OSError) else is_full(exc, directory)):
            return StoreError(f"{doing} failed: {exc}")
        if self.full_since is None:
            self.full_since = self.clock.now()
            log.error("state_disk_full", path=str(directory), free_bytes=free_bytes(directory), doing=doing,
                      error=str(exc))
        return StoreFull(directory, doing)

    def _wrote(self) -> None:
        # A commit can fit into room left inside the database or its WAL while the filesystem is
        # still full: only free space on it ends the outage (else its start is logged again and again).
        if self.full_since is not None and (free_bytes(self.path.parent) or 0) >= LOW_SPACE_BYTES:
            log.warning("state_disk_writable_again", path=str(self.path.parent),
                        outage_s=round(self.clock.now() - self.full_since, 3))
            self.full_since = None

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await _on_thread(conn, _configure)
        except BaseException:
            with suppress(Exception):
                await conn.close()  # not yet ours to close in close(): its thread must not outlive us
            raise
        return conn

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            await _on_thread(self._writer, _migrate)
            await _on_thread(self._writer, partial(_convert_auto_vacuum, self.path))
            # Checkpoints mostly off the writer's path: with a big database the commit that crossed
            # the WAL's 1,000 pages copied them into the main file and fsynced it, holding up a
            # dispatch round (a third of the writer's time at 2,000 agents). A connection of its
            # own copies the WAL in the background (_checkpoint_loop); the writer's own checkpoint,
            # now at 10,000 pages, then finds little left to copy and starts the WAL over.
            await _on_thread(self._writer,
                             lambda db: db.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}"))
            self._reader = await self._connect()
            self._reader.row_factory = sqlite3.Row
            self._checkpointer = await self._connect()
            self._checkpoints = asyncio.get_running_loop().create_task(self._checkpoint_loop(),
                                                                       name="store-checkpoints")
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            err = self._failed(exc, f"opening the state database {self.path}")
            if isinstance(err, StoreFull):
                raise StoreFull(err.path, err.doing, advice="then start cloudtaskd again") from exc
            raise err from exc
        except BaseException:
            # A refusal of our own (a schema newer than this code) or a cancellation: the connections
            # opened so far are closed, or their threads keep the process from exiting.
            await self.close()
            raise

    async def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._checkpoints
            self._checkpoints = None
        for conn in (self._checkpointer, self._reader, self._writer):
            if conn is not None:
                with suppress(Exception):
                    await conn.close()
        self._checkpointer = self._reader = self._writer = None

    def analyze(self, table: str, rows: int) -> None:
        """Nothing on SQLite: its hot statements name their index (INDEXED BY), so no planner
        statistics steer them (PgStore.analyze refreshes PostgreSQL's after a bulk change)."""

    async def checkpoint(self) -> tuple[int, int]:
        """Copy what the WAL holds into the main file without blocking the writer (PASSIVE):
        (frames in the WAL, frames checkpointed). Once all are, the next writer starts the WAL over."""
        conn = opened(self._checkpointer)
        row = await _on_thread(conn, lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        return int(row[1]), int(row[2])

    async def free_pages(self) -> tuple[int, int]:
        """(pages on the freelist, page size): what deletions left inside the file."""
        row = await self.read(lambda db: (db.execute("PRAGMA freelist_count").fetchone()[0],
                                          db.execute("PRAGMA page_size").fetchone()[0]))
        return int(row[0]), int(row[1])

    async def vacuum_step(self, pages: int) -> int:
        """Give up to `pages` free pages back to the filesystem (auto_vacuum=INCREMENTAL): one short
        write on the writer, between the dispatcher's rounds. Returns the free pages left."""
        writer = opened(self._writer)

        def run(db: sqlite3.Connection) -> int:
            # executescript steps the pragma to its end: execute() stops after its first page.
            db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
            return int(db.execute("PRAGMA freelist_count").fetchone()[0])

        async with self._write_lock.hold():
            try:
                return await _on_thread(writer, run)
            except sqlite3.Error as exc:
                raise self._failed(exc, "vacuuming the state database") from exc

    async def truncate_wal(self) -> bool:
        """Copy the WAL into the main file and cut it to zero bytes (after big deletions), waiting at
        most WAL_TRUNCATE_BUSY_MS for the writer and readers: False when they were busy (try later)."""
        conn = opened(self._checkpointer)

        def run(db: sqlite3.Connection) -> bool:
            db.execute(f"PRAGMA busy_timeout={WAL_TRUNCATE_BUSY_MS}")
            try:
                return bool(db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)
            finally:
                db.execute("PRAGMA busy_timeout=10000")

        try:
            return await _on_thread(conn, run)
        except sqlite3.Error as exc:
            raise self._failed(exc, "checkpointing the state database") from exc

    def describe(self) -> str:
        """Which database, as the status page and logs show it."""
        return f"sqlite {self.path}"

    def file_bytes(self) -> tuple[int, int]:
        """(main file, WAL) sizes in bytes."""
        wal = self.path.with_name(self.path.name + "-wal")
        return (self.path.stat().st_size if self.path.exists() else 0, wal.stat().st_size if wal.exists() else 0)

    async def _checkpoint_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                await self.checkpoint()
            except (sqlite3.Error, OSError, StoreError) as exc:
                if not failing:  # a full disk, say: once per outage, the writes say the rest
                    log.warning("checkpoint_failed", error=str(exc))
                failing = True
            else:
                failing = False

    async def _write_tx(self, writer: aiosqlite.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        """An IMMEDIATE transaction: it takes SQLite's write lock at BEGIN, not at its first write."""
        changed = False

        def run(db: sqlite3.Connection) -> T:
            nonlocal changed
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                out = body(db)
                db.execute("COMMIT")
                changed = db.total_changes != before
                return out
            except BaseException:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

        try:
            out = await _on_thread(writer, run)
        except sqlite3.Error as exc:
            raise self._failed(exc, "writing to the state database") from exc
        if changed:  # an empty transaction (the health check) succeeds on a full disk too
            self._wrote()
        return out

    async def _read_tx(self, reader: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN")
            try:
                return fn(db)
            finally:
                db.execute("COMMIT")

        try:
            return await _on_thread(reader, run)
        except sqlite3.Error as exc:
            raise self._failed(exc, "reading the state database") from exc
