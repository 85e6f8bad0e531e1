"""Control-API reads that cannot crowd out dispatch, and result followers fed from one read per job.

The daemon is one process: every row the control API reads and every line it encodes takes the GIL
(and the reader connection's one thread) from the dispatcher and the agents. Under 100 followers and
100 status loops (issue 13) the reads queued without bound in front of each other on the reader's
thread, each follower re-read its job's results every second, and dispatch fell from ~1,150 to ~10
tasks/s. Two things bound that work here:

- `ReadGate`: at most a few API reads on the reader connection at once; a bounded line waits here,
  the rest are refused at once with `Busy` (503 + Retry-After, which cloudtaskctl waits out) rather
  than queued in memory. A read that waited too long is refused too: its client would give up anyway.
- `ResultFeeds`: the followers of one job (`GET /v1/jobs/{id}/results?follow=1`) share one poller,
  which reads the results finished since its cursor once per tick, encodes each line once and keeps
  the chunks in a small ring that every follower writes from. A follower behind the ring (one that
  starts from the beginning, or a slow reader) catches up with reads of its own, through the gate,
  a page at a time; a slow reader is held back by its socket (aiohttp's drain), never buffered.

The follow cursor is the id of the event that finished the task (`seq`): tasks finish out of id
order, and the event log is the one record of the order they finished in (index events_finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import structlog
from aiohttp import web

from cloudtask_wire import jsonx
from cloudtaskd.core.states import COUNTER, TERMINAL_TASK_STATES, WAITING_TASK_STATES
from cloudtaskd.core.states import TaskEvent as E
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import events, jobs
from cloudtaskd.errors import Busy, StoreError

log = structlog.get_logger("cloudtaskd.http.feeds")

T = TypeVar("T")

READS_CONCURRENT = 2  # API reads on the reader connection at once: more only queue in its one thread
READS_WAITING = 64  # API reads waiting for the gate; one more is refused at once (503)
READ_WAIT_MAX_S = 5.0  # a read that waited this long is refused (503) rather than answered late
BUSY_RETRY_AFTER_S = 1.0

FEED_PAGE = 2000  # results per read of a job's poller
FOLLOW_PAGE = 1000  # results per catch-up read of one follower
FEED_TICK_S = 0.25  # a poller reads at most this often: one read carries many dispatch rounds' results
FEED_IDLE_S = 2.0  # without a commit a poller still looks this often (a job paused by the cost cap)
FEED_LINGER_S = 5.0  # a poller with no followers stops after this (a reconnecting follower keeps it)
RING_BYTES_TOTAL = 32 * 1024 * 1024  # every job's ring together; each gets its share, at least one chunk
PAGES_BYTES = 16 * 1024 * 1024  # catch-up pages kept for the followers behind the rings
FOLLOWERS_MAX = 1000  # follow streams at once; one more is refused (503)
HEARTBEAT_S = 10.0  # an idle follow stream gets an empty line this often: the client knows we live

# Each event that finishes a task (events.FINISHED_KINDS) maps to the state it leaves the task in.
_KIND_STATE = {E.SUCCEEDED.value: "succeeded", E.FAILED_DEAD.value: "dead", E.LEASE_EXPIRED_DEAD.value: "dead",
               E.CANCELLED.value: "cancelled"}

_STATUS = {"succeeded": "succeeded", "dead": "dead", "cancelled": "cancelled"}


def task_dict(row: sqlite3.Row, *, full: bool = False) -> dict[str, Any]:
    """A task as the API shows it: the result line's fields (docs/api.md), and with `full` its state."""
    out: dict[str, Any] = {"id": row["key"], "status": _STATUS.get(row["state"], row["state"])}
    if row["state"] == "succeeded":
        out["result"] = jsonx.loads(row["result"]) if row["result"] is not None else None
    else:
        out["error"] = row["error"]
    # Attempts that ran to an outcome: hand-backs (drain, interruption) do not count.
    attempts = row["failures"] + (1 if row["state"] == "succeeded" else 0)
    out.update(attempts=attempts, instance=row["instance_id"], duration_s=row["duration_s"],
               finished_at=row["finished_at"], task=row["id"])
    if full:
        out.update(state=row["state"], priority=row["priority"], failures=row["failures"],
                   lease_expires_at=row["lease_expires_at"])
    return out


def result_line(row: sqlite3.Row) -> str:
    return jsonx.dumps(task_dict(row)) + "\n"


def job_finished(row: sqlite3.Row) -> bool:
    """As cloudtaskctl's job_finished: done (an open job once closed), paused at its cost cap, or
    cancelled before any task came."""
    open_ = sum(row[COUNTER[s]] for s in WAITING_TASK_STATES)
    total = open_ + sum(row[COUNTER[s]] for s in TERMINAL_TASK_STATES)
    done = total > 0 and open_ == 0 and (row["is_open"] != jobs.OPEN or row["state"] == "cancelled")
    return bool(done or row["state"] == "paused" or (row["state"] == "cancelled" and total == 0))


@dataclass(slots=True)
class Page:
    seqs: list[int]
    lines: list[bytes]
    last: int  # the cursor after this page
    full: bool  # the page hit its limit: more may follow at once
    finished: bool  # the job was finished in the same snapshot


def read_finished(db: sqlite3.Connection, job_id: int, after: int, limit: int) -> Page:
    """Up to `limit` results finished after event `after`, in the order they finished. A task finished
    again since (retried) is sent at its latest finish only: an event whose outcome is not the task's
    state now is skipped."""
    rows = events.finished(db, job_id, after, limit)
    seqs: list[int] = []
    lines: list[bytes] = []
    for row in rows:
        if _KIND_STATE[row["kind"]] != row["state"]:
            continue
        d = task_dict(row)
        d["seq"] = row["seq"]
        seqs.append(row["seq"])
        lines.append((jsonx.dumps(d) + "\n").encode())
    full = len(rows) >= limit
    job = jobs.counters(db, job_id)
    return Page(seqs, lines, rows[-1]["seq"] if rows else after, full,
                job is None or (not full and job_finished(job)))


class ReadGate:
    """The control API's door to the reader connection: a few reads at once, a bounded line, Busy beyond."""

    def __init__(self, store: Store, *, concurrent: int = READS_CONCURRENT, waiting: int = READS_WAITING,
                 wait_max_s: float = READ_WAIT_MAX_S) -> None:
        self.store = store
        self.waiting_max = waiting
        self.wait_max_s = wait_max_s
        self._slots = asyncio.Semaphore(concurrent)
        # Streams (patient reads) take at most one slot at a time: 100 followers catching up with a
        # job's history otherwise kept both slots and every status call waited out its 5 s and got 503.
        self._stream_slot = asyncio.Semaphore(max(1, concurrent - 1))
        self.waiting = 0
        self.refused = 0  # reads refused with Busy since start

    def _busy(self, why: str) -> Busy:
        self.refused += 1
        return Busy(f"cloudtaskd is busy ({why}); try again in {BUSY_RETRY_AFTER_S:g} s",
                    retry_after_s=BUSY_RETRY_AFTER_S)

    @contextlib.asynccontextmanager
    async def slot(self, *, patient: bool = False) -> AsyncIterator[None]:
        """patient: wait however long it takes (a stream already answering: it just slows down; the
        follow streams are at most FOLLOWERS_MAX), and leave a slot to the others."""
        if patient:
            async with self._stream_slot, self._slots:
                yield
            return
        if self._slots.locked():
            if self.waiting >= self.waiting_max:
                raise self._busy(f"{self.waiting} control reads waiting")
            self.waiting += 1
            try:
                try:
                    await asyncio.wait_for(self._slots.acquire(), self.wait_max_s)
                except TimeoutError:
                    raise self._busy(f"a read waited {self.wait_max_s:g} s") from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def read(self, fn: Callable[[sqlite3.Connection], T], *, patient: bool = False) -> T:
        async with self.slot(patient=patient):
            return await self.store.read(fn)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return await self.read(lambda db: db.execute(sql, tuple(params)).fetchall())

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        return await self.read(lambda db: db.execute(sql, tuple(params)).fetchone())


@dataclass(slots=True)
class Chunk:
    after: int  # the cursor before it
    last: int  # the cursor after it
    seqs: list[int]
    lines: list[bytes]
    data: bytes  # the lines joined: written as is to every follower that stands at `after`

    def since(self, cursor: int) -> bytes:
        if cursor <= self.after:
            return self.data
        return b"".join(line for seq, line in zip(self.seqs, self.lines, strict=True) if seq > cursor)


class ResultFeed:
    """One job's newly finished results, read once per tick for all of its followers."""

    def __init__(self, store: Store, job_id: int, ring_bytes: Callable[[], int]) -> None:
        self.store = store
        self.job_id = job_id
        self.ring_bytes = ring_bytes
        self.chunks: deque[Chunk] = deque()
        self.size = 0
        self.seq: int | None = None  # the poller's cursor; None until its first read
        self.base = 0  # the ring holds every result after this cursor, up to seq
        self.finished = False
        self.ended: str | None = None  # why the poller stopped early (stopping, a store failure)
        self.followers = 0
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """Set at the next change; take it before looking, so a change in between is not missed."""
        return self._changed

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        try:
            self.seq = self.base = await self.store.read(lambda db: events.newest_finished(db, self.job_id))
            while not self.store.stopping:
                signal = self.store.events_signal()
                after = self.seq
                page = await self.store.read(partial(read_finished, job_id=self.job_id, after=after, limit=FEED_PAGE))
                if page.lines:
                    self._append(Chunk(after, page.last, page.seqs, page.lines, b"".join(page.lines)))
                self.seq = page.last
                if page.finished:
                    self.finished = True
                self._ready.set()
                self._notify()
                if self.finished:
                    return
                if self.followers == 0:
                    idle_since = idle_since or loop.time()
                    if loop.time() - idle_since >= FEED_LINGER_S:
                        return
                else:
                    idle_since = None
                if page.full:
                    await asyncio.sleep(0)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), FEED_IDLE_S)
                await asyncio.sleep(FEED_TICK_S)  # one read for many commits' results
            self.ended = "the daemon is stopping"
        except StoreError as exc:
            self.ended = str(exc)
            log.warning("result_feed_failed", job=self.job_id, error=str(exc))
        finally:
            self._ready.set()
            self._notify()

    def _append(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk.data)
        budget = self.ring_bytes()
        while len(self.chunks) > 1 and self.size > budget:
            old = self.chunks.popleft()
            self.size -= len(old.data)
            self.base = old.last

    def next_chunk(self, cursor: int) -> Chunk | None:
        """The oldest chunk holding results after `cursor` (which must be at or past base)."""
        for chunk in self.chunks:
            if chunk.last > cursor:
                return chunk
        return None


class ResultFeeds:
    """The feed of every job that has followers; each stops a little after its last follower leaves."""

    def __init__(self, store: Store, gate: ReadGate) -> None:
        self.store = store
        self.gate = gate
        self.feeds: dict[int, ResultFeed] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.followers = 0
        # Catch-up pages, shared: followers that start together from the same cursor (the start of the
        # job, typically) read the same pages, so each is read and encoded once for all of them. Only
        # full pages are kept: events are numbered in commit order, so a full page never changes.
        self._pages: OrderedDict[tuple[int, int], asyncio.Future[Page]] = OrderedDict()
        self._pages_bytes = 0

    async def _catch_up(self, job_id: int, after: int) -> Page:
        key = (job_id, after)
        fut = self._pages.get(key)
        if fut is not None:
            self._pages.move_to_end(key)
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._pages[key] = fut
        try:
            page = await self.gate.read(partial(read_finished, job_id=job_id, after=after, limit=FOLLOW_PAGE),
                                        patient=True)
        except BaseException as exc:
            del self._pages[key]
            if isinstance(exc, Exception):
                fut.set_exception(exc)
                fut.exception()  # retrieved: a failed page with no other reader is not an error to log
            else:
                fut.cancel()
            raise
        fut.set_result(page)
        if not page.full:
            del self._pages[key]  # the newest page grows still: read anew next time
            return page
        self._pages_bytes += sum(map(len, page.lines))
        while self._pages_bytes > PAGES_BYTES and len(self._pages) > 1:
            _, old = self._pages.popitem(last=False)
            if old.done() and not old.cancelled() and old.exception() is None:
                self._pages_bytes -= sum(map(len, old.result().lines))
        return page

    def _ring_bytes(self) -> int:
        return RING_BYTES_TOTAL // max(1, len(self.feeds))

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: int) -> AsyncIterator[ResultFeed]:
        if self.followers >= FOLLOWERS_MAX:
            self.gate.refused += 1
            raise Busy(f"cloudtaskd is busy ({self.followers} results streams followed); try again in"
                       f" {BUSY_RETRY_AFTER_S:g} s", retry_after_s=BUSY_RETRY_AFTER_S)
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = ResultFeed(self.store, job_id, self._ring_bytes)
            task = asyncio.get_running_loop().create_task(feed.run(), name=f"result-feed-{job_id}")
            self.tasks.add(task)

            def done(t: asyncio.Task[None], feed: ResultFeed = feed) -> None:
                self.tasks.discard(t)
                if self.feeds.get(feed.job_id) is feed:
                    del self.feeds[feed.job_id]
                if not t.cancelled() and t.exception() is not None:
                    log.error("result_feed_crashed", job=feed.job_id, error=repr(t.exception()))

            task.add_done_callback(done)
        feed.followers += 1
        self.followers += 1
        try:
            yield feed
        finally:
            feed.followers -= 1
            self.followers -= 1

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def follow(self, resp: web.StreamResponse, job_id: int, cursor: int) -> bool:
        """Write the job's results finished after `cursor` to resp until the job is finished. True: the
        stream is complete (end it cleanly); False: it stopped early (the client resumes from its cursor)."""
        async with self.subscribe(job_id) as feed:
            await feed.ready()
            while True:
                changed = feed.changed()
                if feed.ended is not None or feed.seq is None:
                    return False
                if cursor < feed.base:
                    # Behind the ring (from the start, or a slow reader): a page of our own, gated.
                    base = feed.base
                    page = await self._catch_up(job_id, cursor)
                    if page.lines:
                        await resp.write(b"".join(page.lines))
                    # A short page read everything up to its snapshot, which is past `base` (taken before).
                    cursor = page.last if page.full else max(page.last, base)
                    continue
                chunk = feed.next_chunk(cursor)
                if chunk is not None:
                    await resp.write(chunk.since(cursor))
                    cursor = chunk.last
                    continue
                cursor = max(cursor, feed.seq)
                if feed.finished:
                    return True
                try:
                    await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b"\n")  # an idle stream shows it is alive; blank lines are skipped


__all__ = ["ReadGate", "ResultFeeds", "job_finished", "read_finished", "result_line",
           "task_dict"]
