"""What makes one replica among several on one PostgreSQL database (docs/replicas.md):

- `LeaderGate`: runs the orchestrator only while this replica holds the leader lock (leader.py),
  and cancels it the moment it steps down, so no launch follows the loss.
- `Broadcaster`: work that became ready here (an upload, an enqueue, a retry, a requeue) is
  announced on `cloudtask_work`, so every replica's dispatcher wakes (notify.py's Listener).
- `cutoff()`: a replica whose database stops answering fails what waits on it at once and, if the
  database stays away, sends its agents to the other replicas (their `agents.urls`).
- `presence()`: each replica writes `last_seen_at` of its connected agents every few seconds, so
  the leader tells an agent connected to another replica from one that is gone.

SQLite has none of this: one daemon, always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection

import structlog

from cloudtaskd.core.pg.connect import CONNECT_ERRORS, Connection, connect
from cloudtaskd.core.pg.leader import Leadership
from cloudtaskd.core.pg.notify import CHANNEL
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import instances
from cloudtaskd.errors import StoreError

PRESENCE_INTERVAL_S = 1.0  # how often a replica writes its agents' last_seen_at
PRESENCE_TTL_S = 6.0  # an agent not written for this long is on no replica (clocks of replicas within ~1 s: NTP)
REPOLL_S = 2.0  # a replica looks for work this often even without a wake-up (the listener misses some)
RECONNECT_S = 0.5
CUTOFF_AGENTS_S = 2.0  # the database unreachable this long: this replica's agents go to another

log = structlog.get_logger("cloudtaskd.core.pg")


class LeaderGate:
    """Run `work()` while `leadership` leads; cancel it at once when it stops leading."""

    def __init__(self, leadership: Leadership, work: Callable[[], Awaitable[None]], *, name: str) -> None:
        self.leadership = leadership
        self.work = work
        self.name = name
        self.terms_run = 0
        self._task: asyncio.Task[None] | None = None

    def on_change(self, leading: bool) -> None:
        """Leadership's callback: the cancel happens in the same step as the loss is noticed."""
        if not leading and self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        while True:
            await self.leadership.leading.wait()
            self.terms_run += 1
            task = self._task = asyncio.create_task(self._work(), name=self.name)
            log.info("leader_work_started", work=self.name, term=self.leadership.terms)
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the gate itself is being cancelled (daemon stop)
                log.warning("leader_work_stopped", work=self.name, reason="leadership lost")
            finally:
                self._task = None
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _work(self) -> None:
        await self.work()


class Broadcaster:
    """NOTIFY `cloudtask_work` for the pools that got work here: one statement per batch of
    wake-ups (they arrive in bursts, e.g. one per requeued pool in a round), sent after the commit
    that made the work ready, so the woken replica finds the rows."""

    def __init__(self, dsn: str, *, channel: str = CHANNEL) -> None:
        self.dsn = dsn
        self.channel = channel
        self.sent = 0
        self._pools: set[int | None] = set()
        self._ready = asyncio.Event()
        self._conn: Connection | None = None

    def announce(self, pool_id: int | None) -> None:
        self._pools.add(pool_id)
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            pools, self._pools = self._pools, set()
            payload = "" if None in pools else ",".join(str(p) for p in sorted(p for p in pools if p is not None))
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await connect(self.dsn, application_name="cloudtaskd notify")
                await self._conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
                self.sent += 1
            except (StoreError, *CONNECT_ERRORS) as exc:
                # Lost, not retried: the other replicas re-poll every REPOLL_S, and their listener's
                # reconnection counts as a wake-up.
                log.warning("pg_notify_failed", error=str(exc))
                if self._conn is not None:
                    with contextlib.suppress(*CONNECT_ERRORS):
                        await self._conn.close()
                self._conn = None
                await asyncio.sleep(RECONNECT_S)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*CONNECT_ERRORS):
                await self._conn.close()


async def cutoff(leadership: Leadership, *, abort_store: Callable[[], None],
                 close_agents: Callable[[], Awaitable[None]], agents_after_s: float = CUTOFF_AGENTS_S) -> None:
    """While the database does not answer this replica (leadership's session is the probe), nothing
    of this replica's can be committed: no lease granted, no report recorded. Its blocked reads and
    writes are failed at once (a dead socket may otherwise hold them forever), and after
    agents_after_s its agents are closed, so they dial the replicas that can still serve them; the
    hello's reclaim keeps their leases there. A replica still cut off refuses them again (its hello
    needs the database), so they stay on the others until it is back."""
    while True:
        await leadership.unreachable.wait()
        abort_store()
        try:
            await asyncio.wait_for(leadership.reachable.wait(), agents_after_s)
        except TimeoutError:
            log.warning("pg_cut_off_agents_sent_away", after_s=agents_after_s)
            await close_agents()
            await leadership.reachable.wait()
        log.info("pg_reachable_again")


def woken(payload: str, wake: Callable[[int | None], None]) -> None:
    """A notification (or a listener's reconnection, payload ""): wake the pools it names, or all."""
    pools = [int(p) for p in payload.split(",") if p.strip().isdigit()]
    if not pools:
        wake(None)
    for pool in pools:
        wake(pool)


async def presence(store: Store, connected: Callable[[], Collection[str]],
                   interval_s: float = PRESENCE_INTERVAL_S) -> None:
    """Write last_seen_at of this replica's connected agents every interval_s."""
    while True:
        ids = sorted(connected())
        try:
            await store.write(instances.touch_many, ids)
        except StoreError as exc:  # the database away: the next try writes them all again
            log.warning("presence_write_failed", agents=len(ids), error=str(exc))
        await asyncio.sleep(interval_s)


async def repoll(wake: Callable[[], None], interval_s: float = REPOLL_S) -> None:
    """Look for work every interval_s whatever the wake-ups say (notifications can be missed)."""
    while True:
        await asyncio.sleep(interval_s)
        wake()
