"""Which replica runs the orchestrator: the one holding a session advisory lock in PostgreSQL.

Each replica runs `Leadership.run()`. It holds a connection of its own (never a pooled one: the
lock belongs to the session) and tries `pg_try_advisory_lock` every `retry_s`. The server frees
the lock when that session ends for any reason, so a dead leader is replaced within about
`retry_s` of the server noticing:
- a process that dies or a host whose kernel resets the socket: at once;
- a silent network cut: the server ends the session after `session_timeout_s` without a query
  (idle_session_timeout on that session, plus TCP keepalives for a peer that vanished).
The leader itself steps down at once when its connection closes, and when a ping gets no answer
within `ping_timeout_s`: a leader cut off from the database stops before the server gives the
lock away (ping_interval_s + ping_timeout_s < session_timeout_s), so two never lead at once.

Its session is also this replica's probe of the database: `reachable` is set while that session
answers and `unreachable` from the moment it stops answering (a ping unanswered, the connection
lost or not opened) until it answers again; replica.cutoff() acts on them, leader or not.

Stepping down is seen through `leading` (an Event, set while this replica leads), `stepped_down`
(set from the moment it stops leading until it leads again) and `on_change(bool)`, called on
each change: the orchestrator's supervisor cancels its work on False.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from cloudtaskd.core.pg import locks
from cloudtaskd.core.pg.connect import CONNECT_ERRORS, Connection, connect, shown, translate, until_lost
from cloudtaskd.errors import DatabaseUnavailable

RETRY_S = 1.0
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
SESSION_TIMEOUT_S = 10.0

log = structlog.get_logger("cloudtaskd.core.pg")


class Leadership:
    def __init__(self, dsn: str, *, name: str, lock_id: int = locks.LEADER, retry_s: float = RETRY_S,
                 ping_interval_s: float = PING_INTERVAL_S, ping_timeout_s: float = PING_TIMEOUT_S,
                 session_timeout_s: float = SESSION_TIMEOUT_S,
                 on_change: Callable[[bool], None] | None = None) -> None:
        if ping_interval_s + ping_timeout_s >= session_timeout_s:
            raise ValueError("ping_interval_s + ping_timeout_s must stay below session_timeout_s: a leader cut "
                             "off from the database must step down before the server frees its lock")
        self.dsn = dsn
        self.name = name  # this replica, in logs and in pg_stat_activity
        self.lock_id = lock_id
        self.retry_s = retry_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.session_timeout_s = session_timeout_s
        self.on_change = on_change
        self.leading = asyncio.Event()
        self.stepped_down = asyncio.Event()
        self.reachable = asyncio.Event()
        self.unreachable = asyncio.Event()
        self.terms = 0  # how many times this replica became leader
        self.attempts = 0  # tries for the lock
        self.backend_pid: int | None = None  # the server process of the session holding (or trying for) the lock
        self._conn: Connection | None = None
        self._resigned = False

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    def _reach(self, ok: bool, reason: str = "") -> None:
        if self._resigned or (ok == self.reachable.is_set() and ok != self.unreachable.is_set()):
            return  # resigned: this replica is stopping and closed the probe itself
        if ok:
            self.unreachable.clear()
            self.reachable.set()
        else:
            self.reachable.clear()
            self.unreachable.set()
            log.warning("pg_unreachable", replica=self.name, reason=reason)

    def _set(self, leading: bool, reason: str = "") -> None:
        if leading == self.leading.is_set():
            return
        if leading:
            self.terms += 1
            self.stepped_down.clear()
            self.leading.set()
            log.info("pg_leader_elected", replica=self.name, term=self.terms)
        else:
            self.leading.clear()
            self.stepped_down.set()
            log.warning("pg_leader_stepped_down", replica=self.name, term=self.terms, reason=reason)
        if self.on_change is not None:
            self.on_change(leading)

    async def _open(self) -> Connection:
        session_ms = str(int(self.session_timeout_s * 1000))
        keepalive_s = str(max(1, int(self.session_timeout_s / 4)))
        return await connect(self.dsn, timeout_s=self.session_timeout_s,
                             application_name=f"cloudtaskd leader {self.name}"[:63], server_settings={
            "idle_session_timeout": session_ms,
            "tcp_keepalives_idle": keepalive_s, "tcp_keepalives_interval": "1", "tcp_keepalives_count": "3",
        })

    async def run(self) -> None:
        """Contend for the lock until cancelled or resign(); holds it while it can."""
        failed_before = False
        while not self._resigned:
            try:
                conn = self._conn = await self._open()
            except DatabaseUnavailable as exc:
                # Logged once per outage, not once a second: the message says what to fix.
                if not failed_before:
                    log.warning("pg_leader_connect_failed", replica=self.name, error=str(exc),
                                retryable=exc.retryable)
                failed_before = True
                self._reach(False, str(exc))
                await asyncio.sleep(self.retry_s)
                continue
            failed_before = False
            try:
                self.backend_pid = conn.info.backend_pid
                await self._hold(conn)
            except CONNECT_ERRORS as exc:
                reason = f"database connection failed: {translate(exc, self.dsn)}"
                self._reach(False, reason)
                self._set(False, reason)
            finally:
                self._set(False, "stopped")
                self._conn = None
                # Never waits on a cut-off network (the Terminate message goes to the socket buffer);
                # the lock goes with the session.
                with contextlib.suppress(*CONNECT_ERRORS):
                    await conn.close()
            if not self._resigned:
                await asyncio.sleep(self.retry_s)

    async def _hold(self, conn: Connection) -> None:
        while True:
            self.attempts += 1
            cur = await asyncio.wait_for(conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_id,)),
                                         self.ping_timeout_s)
            row = await cur.fetchone()
            self._reach(True)
            if row is not None and row[0]:
                break
            await asyncio.sleep(self.retry_s)
        self._set(True)
        # until_lost waits on the socket between pings: a closed one is heard at once, not at the next ping.
        reason = await until_lost(conn, ping_interval_s=self.ping_interval_s, ping_timeout_s=self.ping_timeout_s)
        self._reach(False, reason)
        self._set(False, reason)

    async def resign(self) -> None:
        """Give the lock up now and stop contending (a clean shutdown): another replica takes over at
        its next try instead of when this one's session ends."""
        self._resigned = True
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(*CONNECT_ERRORS):
                await asyncio.wait_for(conn.close(), self.ping_timeout_s)
        self._set(False, "resigned")

    def __repr__(self) -> str:
        return f"Leadership({self.name!r}, {shown(self.dsn)!r}, leading={self.is_leader})"
