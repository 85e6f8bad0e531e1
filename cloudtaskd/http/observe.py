"""What the daemon shows about itself: Prometheus metrics, the event log (with a long poll for
`cloudtaskctl events --follow`), and the status page with the JSON summary it renders.

All of it is read-only. The routes join ControlApi's, so they sit behind the same listeners: on
the unix socket everything is allowed; on the TCP listener every route needs the bearer token
except the status page's static shell (`GET /status`), which holds no data.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cloudtaskd import __version__
from cloudtaskd.core import costs
from cloudtaskd.core.dispatch import AgentSessions, Dispatcher
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.states import COUNTER, TASK_STATES, TERMINAL_TASK_STATES, job_done, job_outcome
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import events, instances, jobs, tasks
from cloudtaskd.errors import BadInput
from cloudtaskd.fleet.orchestrator.waits import job_waiting
from cloudtaskd.http.feeds import ReadGate
from cloudtaskd.http.params import decimal_number, whole_number
from cloudtaskd.http.series import StatusSeries
from cloudtaskd.http.status_page import STATUS_HEADERS, STATUS_HTML

EVENTS_LIMIT = 1000
EVENTS_LIMIT_MAX = 10_000
EVENTS_WAIT_MAX_S = 30.0  # a long poll answers within this, events or not
EVENTS_KINDS_MAX = 20
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
STATUS_JOBS = 50
STATUS_ERRORS = 20


def _int(request: web.Request, name: str, *, lo: int, hi: int = 2**63 - 1) -> int | None:
    """An integer query parameter in [lo, hi]; by default what SQLite can hold (a larger one fails to bind)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    value = whole_number(raw)  # ASCII digits, one spelling: an event cursor a proxy can reason about
    if value is None:
        raise BadInput(f"query parameter {name} must be a whole number in ASCII digits without leading zeros,"
                       f" got {raw!r:.80}", field=name)
    if not lo <= value <= hi:
        raise BadInput(f"query parameter {name} must be between {lo} and {hi}, got {value}", field=name)
    return value


def _seconds(request: web.Request, name: str) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return 0.0
    value = decimal_number(raw)
    if value is None:
        raise BadInput(f"query parameter {name} must be a number of seconds in ASCII digits, got {raw!r:.80}",
                       field=name)
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"query parameter {name} must be a number of seconds >= 0, got {raw!r}", field=name)
    return min(value, EVENTS_WAIT_MAX_S)


class ObserveApi:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, metrics: Metrics, sessions: AgentSessions,
                 daemon_id: str, reads: ReadGate, series: StatusSeries,
                 waits: Callable[[int], str | None]) -> None:
        """dispatcher: its round count; metrics: what /metrics renders; sessions: the connected agents
        (read only); reads: the control API's gate; waits: why a pool's queued work has no instance
        (the reconciler's last decision)."""
        self.store = store
        self.series = series
        self.reads = reads
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.sessions = sessions
        self.daemon_id = daemon_id
        self.waits = waits

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/metrics", self.prometheus),
            web.get("/v1/events", self.events),
            web.get("/v1/status", self.status),
            web.get("/v1/status/series", self.status_series),
            web.get("/status", self.status_page),
        ]

    async def prometheus(self, request: web.Request) -> web.Response:
        body, content_type = await self.metrics.render(
            self.store, sessions=len(self.sessions), rounds=self.dispatcher.rounds,
            accept=request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def events(self, request: web.Request) -> web.Response:
        """Events after a cursor, oldest first (or the newest `tail`), filtered by job and instance.
        With `wait`, an empty answer is held until an event is recorded or the wait ends. `next` is
        the cursor for the following call: past every event this read covered, matching or not, so a
        filtered follower never reads the same stretch twice."""
        after = _int(request, "after", lo=0)
        tail = _int(request, "tail", lo=1, hi=EVENTS_LIMIT_MAX)
        if after is not None and tail is not None:
            raise BadInput("after and tail cannot be combined: tail is the newest events", field="tail")
        limit = _int(request, "limit", lo=1, hi=EVENTS_LIMIT_MAX) or EVENTS_LIMIT
        job = _int(request, "job", lo=0)
        instance = request.query.get("instance") or None
        kinds = [k for k in (request.query.get("kind") or "").split(",") if k]
        if any(not _KIND.fullmatch(k) for k in kinds) or len(kinds) > EVENTS_KINDS_MAX:
            raise BadInput(f"query parameter kind must be up to {EVENTS_KINDS_MAX} event names (snake_case),"
                           " comma-separated", field="kind")
        wait_s = _seconds(request, "wait") if tail is None else 0.0
        where = events.Filter(kinds=kinds, job=job, instance=instance)
        cursor = after or 0

        def read(db: sqlite3.Connection) -> tuple[list[dict[str, Any]], int]:
            last = events.last_id(db)
            if tail is not None:
                return _with_task_keys(db, events.tail(db, where, tail)), last
            rows = events.page(db, cursor, where, limit)
            # A full page may stop short of the newest event: go on from its last row.
            return _with_task_keys(db, rows), rows[-1]["id"] if len(rows) == limit else max(cursor, last)

        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            signal = self.store.events_signal()  # before the read: a commit in between still wakes us
            found, nxt = await self.reads.read(read)
            remaining = deadline - asyncio.get_running_loop().time()
            if found or remaining <= 0 or self.store.stopping:
                break
            cursor = nxt
            try:
                await asyncio.wait_for(signal.wait(), remaining)
            except TimeoutError:
                break  # nothing was recorded since the read: its empty answer stands
        return web.json_response({"events": found, "next": nxt})

    async def status(self, request: web.Request) -> web.Response:
        """The status page's data: recent jobs with their counts, live instances grouped, the fleet's
        cost, the latest error events. A handful of small indexed queries: it is polled."""
        now = self.store.clock.now()  # the clock stored times are on (cloudtaskd.core.clock)

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            recent = [_job_summary(r, self.waits) for r in jobs.newest_summaries(db, STATUS_JOBS)]
            live = [
                {"provider": r["provider"], "machine_type": r["machine_type"] or "", "state": r["state"],
                 "count": r["n"], "slots": r["slots"], "price_per_hour": r["price_per_hour"] or 0.0}
                for r in instances.live_by_type(db)]
            errors = _with_task_keys(db, events.latest_errors(db, STATUS_ERRORS))
            return {"jobs": recent, "instances": live, "cost": costs.fleet(db, now), "errors": errors}

        body = await self.reads.read(read)
        body.update(version=__version__, daemon_id=self.daemon_id, database=self.store.describe(), now=now,
                    agents_connected=len(self.sessions))
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def status_series(self, request: web.Request) -> web.Response:
        """The last hour of the status page's plots (cloudtaskd/http/series.py), from memory: no database
        read, the same bytes for every reader until the next sample."""
        return web.Response(body=self.series.body(), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=STATUS_HTML, content_type="text/html", charset="utf-8", headers=STATUS_HEADERS)


def _job_summary(row: sqlite3.Row, waits: Callable[[int], str | None]) -> dict[str, Any]:
    counts = {s.value: row[COUNTER[s]] for s in TASK_STATES}
    total = sum(counts.values())
    finished = sum(counts[s] for s in TERMINAL_TASK_STATES)
    # As the job object of GET /v1/jobs/{id}: done when nothing is staged, queued, leased or retrying;
    # outcome once it is over (succeeded, failed, cancelled).
    is_open = row["is_open"] == jobs.OPEN
    return {"id": row["id"], "name": row["name"], "state": row["state"], "state_reason": row["state_reason"],
            "done": job_done(row["state"], {**counts, "total": total}, is_open), "open": is_open,
            "outcome": job_outcome(row["state"], {**counts, "total": total}, is_open),
            "created_at": row["created_at"],
            "finished_at": row["finished_at"], "counts": {**counts, "total": total}, "finished": finished,
            "total": total, "waiting": job_waiting(row, waits)}


__all__ = ["ObserveApi"]


def _with_task_keys(db: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    """Events as dicts, each task event with `task_key`: the id the user gave the task (task_id is
    the row's), looked up once per page."""
    out = [dict(r) for r in rows]
    ids = sorted({e["task_id"] for e in out if e.get("task_id") is not None})
    keys: dict[int, Any] = {}
    for start in range(0, len(ids), 500):  # well under SQLite's bound-parameter limit
        chunk = ids[start:start + 500]
        keys.update(tasks.keys_of(db, chunk))
    for e in out:
        if e.get("task_id") is not None:
            e["task_key"] = keys.get(e["task_id"])
    return out
