"""The housekeeper: the daemon's big, slow writes, one short chunk at a time, in the background.

A cancel of a million tasks, the delete of a finished job, the event log past its age or count, jobs
past `retention.finished_jobs_s`, and afterwards giving the freed pages and the grown WAL back to the
filesystem. Each chunk is one write transaction taken with the ordinary (not urgent) write lock, so
the dispatcher's rounds go first, and the loop pauses between chunks so agents' messages are read.
What is under way is in the database (`cancels`, `purges`): a restart goes on with it.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from cloudtaskd.config import Config
from cloudtaskd.core import retention
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import cancels, jobs, purges
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.errors import CloudtaskError, StoreError

log = structlog.get_logger("cloudtaskd.core.housekeeping")

CHUNK_PAUSE_S = 0.005  # between two chunks: the event loop reads what agents sent meanwhile
# While the dispatcher is busy, the pause after a chunk is this many times the chunk's own time: the
# housekeeper then takes at most about half of the writer (and of the one core the daemon's loop has).
BUSY_PAUSE_RATIO = 1.0
FAILED_RETRY_S = 5.0  # after a chunk failed (a full disk): try again this much later
VACUUM_STEP_PAGES = 2048  # pages given back per transaction (8 MiB at 4 KiB pages, ~60 ms)
VACUUM_MIN_PAGES = 256  # fewer free pages than this are left for SQLite to reuse
WAL_TRUNCATE_MIN_BYTES = 4 << 20  # a WAL smaller than this is not worth a truncation
TRUNCATE_RETRY_S = 1.0  # the writer or a reader was busy: try the truncation again this much later


class Housekeeper:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, config: Config) -> None:
        """dispatcher: its round count (housekeeping yields to busy rounds) and revokes of cancelled leases."""
        self.store = store
        self.dispatcher = dispatcher
        self.config = config  # events.*, retention.* are read at each use
        self._wake = asyncio.Event()
        self._next_sweep = 0.0  # monotonic: when events and finished jobs are looked at next
        self._event_cursor = 0  # the event log is pruned up to here (in memory: a restart walks it again)
        self._pruning = False
        self._pruned = 0
        self._compact = False  # big deletions happened: give pages and the WAL back
        self._next_truncate = 0.0

    def wake(self) -> None:
        """A cancel or a delete was recorded: start on it now."""
        self._wake.set()

    def apply_config(self, config: Config) -> None:
        """On reload: the new events.* and retention.* from the next chunk and sweep on."""
        self.config = config

    async def run(self) -> None:
        while True:
            started, rounds = time.monotonic(), self.dispatcher.rounds
            try:
                worked = await self.step()
            except StoreError as exc:  # a full or failing disk: the store logs it; the work waits in the db
                log.warning("housekeeping_step_failed", error=str(exc), retry_in_s=FAILED_RETRY_S)
                await asyncio.sleep(FAILED_RETRY_S)
                continue
            if worked:
                busy = self.dispatcher.rounds != rounds  # agents were served meanwhile: leave them room
                took = time.monotonic() - started
                await asyncio.sleep(max(CHUNK_PAUSE_S, took * BUSY_PAUSE_RATIO if busy else 0.0))
                continue
            wait = max(0.0, min(self._next_sweep, self._next_truncate if self._compact else self._next_sweep)
                       - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass
            self._wake.clear()

    async def step(self) -> bool:
        """One chunk of the most pressing work; False when there was nothing to do now."""
        chunk = self.config.retention.chunk_rows
        cancelling = await self.store.read(cancels.jobs)
        if cancelling:
            progress = await self.store.write(queue.cancel_chunk, cancelling[0], chunk)
            self.dispatcher.revoke(progress.revoke)
            if progress.finished:
                log.info("job_cancel_finished", job=progress.job_id, tasks=progress.done)
                self._compact = True
            return True
        purging = await self.store.read(purges.jobs)
        if purging:
            if await self.store.write(retention.purge_chunk, purging[0], chunk):
                log.info("job_purged", job=purging[0])
                self._compact = True
            return True
        if self._pruning:
            await self._prune_step()
            return True
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.retention.interval_s
            await self._expire_finished_jobs()
            self._pruning, self._pruned = True, 0
            return True
        if self._compact and now >= self._next_truncate:
            return await self._compact_step()
        return False

    async def _expire_finished_jobs(self) -> None:
        keep_s = self.config.retention.finished_jobs_s
        if keep_s <= 0:
            return
        cutoff = self.store.clock.now() - keep_s
        for job_id in await self.store.read(lambda db: jobs.finished_before(db, cutoff)):
            try:
                deleted = await self.store.write(retention.delete_job, job_id)
            except CloudtaskError as exc:  # it changed since the read (a retry, an upload): kept
                log.info("job_retention_skipped", job=job_id, reason=str(exc))
                continue
            log.info("job_expired", job=job_id, tasks=deleted.tasks, finished_jobs_s=keep_s)

    async def _prune_step(self) -> None:
        events = self.config.events
        older_than = self.store.clock.now() - events.max_age_s
        bound = await self.store.read(lambda db: retention.event_prune_bound(db, events.max_rows))
        cursor, deleted, go_on = await self.store.write(retention.prune_events_span, self._event_cursor,
                                                        older_than, bound)
        self._event_cursor = cursor
        self._pruned += deleted
        if not go_on:
            self._pruning = False
            if self._pruned:
                log.info("events_pruned", rows=self._pruned, max_age_s=events.max_age_s, max_rows=events.max_rows)
                self._compact = True

    async def _compact_step(self) -> bool:
        """Free pages back to the filesystem a step at a time, then the WAL cut to nothing."""
        free, _ = await self.store.free_pages()
        if free >= VACUUM_MIN_PAGES:
            await self.store.vacuum_step(VACUUM_STEP_PAGES)
            return True
        _, wal = self.store.file_bytes()
        if wal >= WAL_TRUNCATE_MIN_BYTES and not await self.store.truncate_wal():
            self._next_truncate = time.monotonic() + TRUNCATE_RETRY_S  # busy: when it is idle
            return False
        self._compact = False
        main, wal = self.store.file_bytes()
        log.info("store_compacted", db_bytes=main, wal_bytes=wal)
        return False
