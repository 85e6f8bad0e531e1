"""Wake-ups between replicas: NOTIFY on a channel when work appears, LISTEN on it everywhere.

A notification is a hint, never the work itself: it carries at most a short payload (a pool id),
the listener may miss some, and the woken side always reads the truth from the tables. So:
- `notify()` runs inside the sender's transaction where there is one: PostgreSQL delivers it only
  at commit, so no replica wakes before the rows it should find are visible.
- `Listener` keeps its own connection (LISTEN is per session) and reconnects, with a pause of
  `reconnect_s`, after the server restarts or the connection breaks. Whatever was sent while it
  was away is lost, so every (re)connection counts as a wake-up: consumers look again then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg
import structlog

from cloudtaskd.core.pg.connect import CONNECT_ERRORS, Connection, connect, until_lost
from cloudtaskd.errors import DatabaseUnavailable

CHANNEL = "cloudtask_work"
RECONNECT_S = 0.5
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
RECONNECTED = ""  # the payload a wake-up carries when it stands for "you may have missed some"

log = structlog.get_logger("cloudtaskd.core.pg")


async def notify(db: Connection, payload: str = "", *, channel: str = CHANNEL) -> None:
    """Send a wake-up. On a connection inside a transaction it goes out at commit."""
    await db.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def notify_sql(channel: str = CHANNEL) -> str:
    """The statement a table function runs inside its write transaction (one parameter: the payload)."""
    return f"SELECT pg_notify('{channel}', ?)"


class Listener:
    """LISTEN on one channel for as long as run() runs, across reconnections.

    `woken` is set on each notification and each (re)connection; the consumer clears it before it
    looks at the tables, so a wake-up arriving while it looks is not lost. `on_notify(payload)` is
    called as well, if given (between the listener's reads of its socket: it must not block).
    """

    def __init__(self, dsn: str, *, channel: str = CHANNEL, on_notify: Callable[[str], None] | None = None,
                 reconnect_s: float = RECONNECT_S, ping_interval_s: float = PING_INTERVAL_S,
                 ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_notify = on_notify
        self.reconnect_s = reconnect_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.woken = asyncio.Event()
        self.listening = asyncio.Event()  # set while LISTEN is in force
        self.connections = 0  # sessions that reached LISTEN; more than one: it reconnected
        self.received = 0  # notifications (reconnections not counted)

    def _wake(self, payload: str) -> None:
        self.woken.set()
        if self.on_notify is not None:
            self.on_notify(payload)

    def _on_notification(self, note: psycopg.Notify) -> None:
        self.received += 1
        self._wake(note.payload)

    async def run(self) -> None:
        """Listen until cancelled."""
        failed_before = False
        while True:
            try:
                conn = await connect(self.dsn, application_name="cloudtaskd listener")
            except DatabaseUnavailable as exc:
                if not failed_before:
                    log.warning("pg_listener_connect_failed", channel=self.channel, error=str(exc),
                                retryable=exc.retryable)
                failed_before = True
                await asyncio.sleep(self.reconnect_s)
                continue
            try:
                # The channel is ours (a constant), never a user's: LISTEN takes no parameter.
                await conn.execute(f'LISTEN "{self.channel}"')
                self.connections += 1
                self.listening.set()
                if failed_before or self.connections > 1:
                    log.info("pg_listener_reconnected", channel=self.channel, connections=self.connections)
                failed_before = False
                self._wake(RECONNECTED)  # anything sent while we were away is lost: look again
                reason = await until_lost(conn, ping_interval_s=self.ping_interval_s,
                                          ping_timeout_s=self.ping_timeout_s, on_notify=self._on_notification)
                log.warning("pg_listener_lost", channel=self.channel, reason=reason)
            except CONNECT_ERRORS as exc:
                log.warning("pg_listener_lost", channel=self.channel, reason=type(exc).__name__)
            finally:
                self.listening.clear()
                with contextlib.suppress(*CONNECT_ERRORS):
                    await conn.close()
            await asyncio.sleep(self.reconnect_s)
