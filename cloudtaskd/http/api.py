"""The control HTTP API for cloudtaskctl (see docs/api.md for the contract)."""

from __future__ import annotations

import json
import math
import re
import secrets
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from cloudtask_wire import jsonx
from cloudtask_wire.workerspec import WorkerSpecError
from cloudtaskd import __version__
from cloudtaskd.config import Config
from cloudtaskd.core import costs, retention
from cloudtaskd.core.dispatch import AgentSessions, Dispatcher
from cloudtaskd.core.housekeeping import Housekeeper
from cloudtaskd.core.hub import token_hash
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.states import (
    COUNTER,
    TASK_STATE_NAMES,
    TASK_STATES,
    InstanceEvent,
    InstanceState,
    job_done,
    job_outcome,
)
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import cancels, instances, jobs, pools, uploads
from cloudtaskd.core.tables import interruptions as interruption_rows
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.errors import (
    BadInput,
    Busy,
    CloudtaskError,
    DaemonStopping,
    NotFound,
    StoreError,
    StoreFull,
    TransitionError,
    no_job,
)
from cloudtaskd.fleet import interruptions
from cloudtaskd.fleet.orchestrator.market import Market
from cloudtaskd.fleet.orchestrator.selection import Needs, Policy, rate_of, why_no_offer
from cloudtaskd.fleet.orchestrator.waits import job_waiting
from cloudtaskd.fleet.providers.base import Offer
from cloudtaskd.http.bundles import Bundles
from cloudtaskd.http.feeds import FOLLOWERS_MAX, ReadGate, ResultFeeds, result_line, task_dict
from cloudtaskd.http.observe import ObserveApi
from cloudtaskd.http.params import decimal_number, whole_number
from cloudtaskd.http.runs import Runs
from cloudtaskd.http.series import StatusSeries
from cloudtaskd.http.submissions import Submissions

log = structlog.get_logger("cloudtaskd.http.api")

RATE_WINDOW_S = 30.0
RATE_CACHE_S = 1.0  # a job's rate is counted at most this often, however many clients ask
RATE_CACHE_JOBS = 1000  # rates kept; past this the stale ones are dropped
INTERRUPTIONS_RECENT = 50  # the latest notices GET /v1/interruptions lists
RESULTS_PAGE = 1000  # rows per read of a results stream: bounded work per read, the gate between pages
# A run's id (PUT /v1/runs/ID; cloudtaskctl makes a uuid4 hex) and a submission's hash (sha256 hex).
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUBMISSION = re.compile(r"[0-9a-f]{64}")
RUN_OWNER_MAX_CHARS = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, exc: Exception) -> web.Response:
    body = {"error": {"type": type(exc).__name__, "message": str(exc),
                      "line": getattr(exc, "line", None), "field": getattr(exc, "field", None)}}
    return web.json_response(body, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Bodies are taken as sent (the listeners do not decode them): say so rather than read
        # compressed bytes as JSON. A worker bundle is a gzip file as the body, not an encoding.
        return _error(415, BadInput(f"Content-Encoding {encoding!r} is not accepted: send the body as it is",
                                    field="Content-Encoding"))
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (no such route, a method the route lacks, a body over the size
        # limit) in the documented error shape, with their headers (Allow) kept.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.json_response({"error": {"type": type(exc).__name__.removeprefix("HTTP"),
                                            "message": exc.text or exc.reason, "line": None, "field": None}},
                                 status=exc.status, headers=headers)
    except DaemonStopping as exc:
        # Not busy (no Retry-After): this daemon goes away; the client starts or finds another.
        return _error(503, exc)
    except Busy as exc:
        # Too many control requests at once: refused before any work, with when to come back.
        resp = _error(503, exc)
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return resp
    except (BadInput, WorkerSpecError) as exc:
        return _error(400, exc)
    except NotFound as exc:
        return _error(404, exc)
    except StoreFull as exc:
        # 507 Insufficient Storage: this server cannot store what the request needs. The store
        # logs the outage once when it starts; each refusal is a warning of its own.
        log.warning("request_refused_disk_full", path=request.path, state_path=exc.path)
        return _error(507, exc)
    except StoreError as exc:
        log.error("store_error", path=request.path, error=str(exc))
        return _error(503, exc)
    except CloudtaskError as exc:
        return _error(409, exc)


MAX_ROWID = 2**63 - 1  # SQLite's integers are 64-bit: a larger value cannot even be bound to a query


def _int_param(request: web.Request, name: str, default: int | None = None, *, lo: int = 0,
               hi: int = MAX_ROWID) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = whole_number(raw)
    if value is None:
        raise BadInput(f"query parameter {name} must be a whole number in ASCII digits without leading zeros,"
                       f" got {raw!r:.80}", field=name)
    if not lo <= value <= hi:
        raise BadInput(f"query parameter {name} must be between {lo} and {hi}, got {raw!r:.80}", field=name)
    return value


def _job_id(request: web.Request) -> int:
    """A job id is spelt one way only (params.py): `/v1/jobs/007` or `/v1/jobs/%207` names no job (404)."""
    job_id = whole_number(request.match_info["job"])
    if job_id is None or not 1 <= job_id <= MAX_ROWID:
        raise NotFound(f"no job {request.match_info['job']!r:.80}")
    return job_id


class ControlApi:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, config: Config, metrics: Metrics,
                 sessions: AgentSessions, market: Market, series: StatusSeries, housekeeper: Housekeeper,
                 runs: Runs, bundles: Bundles, waits: Callable[[int], str | None], daemon_id: str,
                 agent_url: Callable[[], str], agent_ca: str = "", embedded: bool = False,
                 reads: ReadGate | None = None) -> None:
        """dispatcher: told of new work, revoked leases and drains; sessions: the connected agents
        (read only); housekeeper: carries out cancels and deletes past their first chunk; waits: why a
        pool's queued work has no instance (the reconciler's last decision); agent_ca: the CA (PEM) an
        agent must pin to dial agent_url, empty for plain ws://; embedded: started by `cloudtaskctl
        run` for its duration (GET /v1/health says so)."""
        self.market = market
        self.store = store
        self.housekeeper = housekeeper
        # Every read a request makes goes through the gate (bounded, 503 beyond); the store's own
        # background work (settling uploads) does not.
        self.reads = reads or ReadGate(store)
        self.feeds = ResultFeeds(store, self.reads)
        self._recent: dict[int, tuple[float, int, float | None]] = {}  # job -> (read at, n finished, first)
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.config = config
        self.runs = runs
        self.agent_url = agent_url
        self.agent_ca = agent_ca
        self.daemon_id = daemon_id
        self.embedded = embedded
        self.bundles = bundles
        self.submissions = Submissions(store=store, reads=self.reads, dispatcher=dispatcher, config=config)
        self.waits = waits
        self.observe = ObserveApi(store=store, dispatcher=dispatcher, metrics=metrics, sessions=sessions,
                                  daemon_id=daemon_id, reads=self.reads, series=series, waits=waits)

    def apply_config(self, config: Config) -> None:
        """On reload: read at each request (queue.*, agents.* a registration reports)."""
        self.config = config
        self.submissions.apply_config(config)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/health", self.health),
            web.post("/v1/workers", self.put_worker),
            web.post("/v1/jobs", self.create_job),
            web.get("/v1/jobs", self.list_jobs),
            web.get("/v1/jobs/{job}", self.get_job),
            web.post("/v1/jobs/{job}/tasks", self.upload_tasks),
            web.post("/v1/jobs/{job}/cancel", self.cancel_job),
            web.post("/v1/jobs/{job}/close", self.close_job),
            web.delete("/v1/jobs/{job}", self.delete_job),
            web.post("/v1/jobs/{job}/retry", self.retry_job),
            web.post("/v1/jobs/{job}/resume", self.resume_job),
            web.get("/v1/jobs/{job}/tasks", self.list_tasks),
            web.get("/v1/jobs/{job}/results", self.results),
            web.get("/v1/instances", self.list_instances),
            web.post("/v1/instances", self.register_instance),
            web.post("/v1/instances/{instance}/drain", self.drain_instance),
            web.get("/v1/instances/{instance}/logs", self.instance_logs),
            web.get("/v1/catalog", self.get_catalog),
            web.post("/v1/catalog/refresh", self.refresh_catalog),
            web.get("/v1/prices", self.prices),
            web.get("/v1/interruptions", self.interruptions),
            web.get("/v1/cost", self.fleet_cost),
            web.get("/v1/jobs/{job}/cost", self.job_cost),
            web.get("/v1/runs", self.list_runs),
            web.put("/v1/runs/{run}", self.attach_run),
            web.delete("/v1/runs/{run}", self.detach_run),
            *self.observe.routes(),  # /metrics, /v1/events, /v1/status, /status
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": __version__, "daemon_id": self.daemon_id,
                                  "embedded": self.embedded})

    # ---- workers ----

    async def put_worker(self, request: web.Request) -> web.Response:
        digest, spec = await self.bundles.receive(request.content.iter_chunked(1 << 20))
        return web.json_response({"digest": digest, "spec": spec.to_dict()})

    # ---- jobs ----

    async def create_job(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = body.get("name") or "job"
        digest = body.get("worker")
        if not isinstance(name, str) or len(name) > 200:
            raise BadInput("name: expected a string of at most 200 characters", field="name")
        if not isinstance(digest, str):
            raise BadInput("worker: expected the digest returned by POST /v1/workers", field="worker")
        opts: dict[str, Any] = {}
        # max_instances 0 once meant "no limit" (as absent does) and ran the job anyway: refused now.
        for key, lo, hi in (("max_instances", 1, 100_000), ("max_attempts", 1, 100)):
            value = body.get(key)
            if value is not None and (type(value) is not int or not lo <= value <= hi):
                raise BadInput(f"{key}: expected an integer between {lo} and {hi}", field=key)
            opts[key] = value
        timeout = body.get("timeout_s")
        if timeout is not None and (type(timeout) not in (int, float) or timeout <= 0):
            raise BadInput("timeout_s: expected a positive number", field="timeout_s")
        opts["policy"] = _job_policy(body.get("policy"))
        cap = body.get("max_total_cost")
        if cap is not None and (type(cap) not in (int, float) or not math.isfinite(cap) or cap <= 0):
            raise BadInput("max_total_cost: expected a positive number of USD", field="max_total_cost")
        opts["max_total_cost"] = cap
        opts["run"] = _run_body(body.get("run"))
        is_open = body.get("open", False)
        if type(is_open) is not bool:
            raise BadInput("open: expected true (a standing queue, active until closed) or false", field="open")
        opts["open"] = is_open
        await self.bundles.ensure(digest)  # received by another replica: its files here first
        job_id = await self.submissions.create_job(name, digest, opts, timeout)
        return web.json_response(await self._job(job_id), status=201)

    def _read_job(self, db: sqlite3.Connection, row: sqlite3.Row, instances: int, now: float) -> dict[str, Any]:
        """A job object from its row: counters, not counts (a primary-key read). Its rate counts the
        tasks finished in the last RATE_WINDOW_S through an index (work done: succeeded or dead, never
        a cancellation, which would make a cancelled job look fast); that is kept for RATE_CACHE_S per
        job, so a hundred clients polling a job cost one such count a second, not a hundred."""
        job_id = row["id"]
        cached = self._recent.get(job_id)
        if cached is None or now - cached[0] >= RATE_CACHE_S:
            n, first = queue.recent_worked(db, job_id, now - RATE_WINDOW_S)
            if len(self._recent) >= RATE_CACHE_JOBS:
                self._recent = {k: v for k, v in self._recent.items() if now - v[0] < RATE_CACHE_S}
            cached = self._recent[job_id] = (now, n, first)
        out = _job_dict(row, cached[1:], instances, now, job_waiting(row, self.waits))
        # A cancel under way: how far it is (its tasks are cancelled in chunks, in the background).
        pending = cancels.pending(db, job_id)
        out["cancelling"] = {"total": pending.total, "cancelled": pending.done} if pending is not None else None
        return out

    async def _job(self, job_id: int) -> dict[str, Any]:
        now = self.store.clock.now()  # the clock stored times were written on (clock.py)

        def read(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = jobs.with_worker(db, job_id)
            if row is None:
                return None
            return self._read_job(db, row, instances.active_in_pool(db, row["pool_id"]), now)

        job = await self.reads.read(read)
        if job is None:
            raise no_job(job_id)
        return job

    async def list_jobs(self, request: web.Request) -> web.Response:
        now = self.store.clock.now()  # the clock stored times were written on (clock.py)
        submission = request.query.get("submission")
        if submission is not None and not SUBMISSION.fullmatch(submission):
            raise BadInput("submission: expected a sha256 in hex (64 characters 0-9a-f)", field="submission")

        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            # One read for the whole list (it was one per job): a consistent snapshot, one thread hop.
            live = instances.active_by_pool(db)
            # submission: `cloudtaskctl run` looking for its earlier job
            rows = jobs.newest_with_worker(db, submission)
            return [self._read_job(db, r, live.get(r["pool_id"], 0), now) for r in rows]

        return web.json_response({"jobs": await self.reads.read(read)})

    async def get_job(self, request: web.Request) -> web.Response:
        return web.json_response(await self._job(_job_id(request)))

    async def upload_tasks(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        if request.content_type == "application/json":
            return await self.enqueue_task(request, job_id)
        if "copies" in request.query:
            raise BadInput("copies: only a single task (Content-Type: application/json) is repeated;"
                           " a task file lists its tasks", field="copies")
        source = request.query.get("source", "tasks")
        n = await self.submissions.upload(job_id, request.content.iter_chunked(1 << 20), source)
        return web.json_response({"accepted": n})

    async def enqueue_task(self, request: web.Request, job_id: int) -> web.Response:
        """One task object as the body (a standing queue's enqueue), queued in one transaction:
        201 {"id": row id, "key"}; with ?copies=N that many copies, {"ids": [...], "keys": [...]}."""
        copies = _int_param(request, "copies", lo=1, hi=queue.MAX_COPIES)
        # The body whole: one task, at most queue.max_task_bytes (aiohttp refuses past its 1 MiB limit).
        done = await self.submissions.enqueue(job_id, await request.read(), copies)
        if copies is None:
            return web.json_response({"id": done[0][0], "key": done[0][1]}, status=201)
        return web.json_response({"ids": [t[0] for t in done], "keys": [t[1] for t in done]}, status=201)

    async def close_job(self, request: web.Request) -> web.Response:
        """An open job takes no more tasks and finishes once those it has are done."""
        job_id = _job_id(request)
        await self.submissions.close(job_id)
        return web.json_response(await self._job(job_id))

    async def cancel_job(self, request: web.Request) -> web.Response:
        """Marked cancelled at once (no lease from now on) and its first chunk cancelled here: a job of
        up to retention.chunk_rows unfinished tasks is all cancelled in the answer; a bigger one goes
        on in the background, and the answer's `cancelling` says how far it is."""
        job_id = _job_id(request)
        progress = await self.store.write(queue.cancel_job, job_id)
        if not progress.finished:
            progress = await self.store.write(queue.cancel_chunk, job_id, self.config.retention.chunk_rows)
            self.dispatcher.revoke(progress.revoke)
        if not progress.finished:
            self.housekeeper.wake()
        log.info("job_cancelled", job=job_id, tasks=progress.total, cancelled=progress.done,
                 background=not progress.finished)
        return web.json_response(await self._job(job_id))

    async def delete_job(self, request: web.Request) -> web.Response:
        """A job that is over goes, with its tasks, results and events (in chunks, in the background);
        a submission whose tasks were refused goes at once, rather than stay as `cancelled 0/0`. A job
        with unfinished tasks is refused (409): cancel it first."""
        job_id = _job_id(request)
        async with self.submissions.lock(job_id):  # not while an upload stages
            deleted = await self.store.write(_delete_or_withdraw, job_id)
        self.submissions.forget(job_id)
        self._recent.pop(job_id, None)
        if deleted.purging:
            self.housekeeper.wake()
        log.info("job_deleted", job=job_id, tasks=deleted.tasks, purging=deleted.purging)
        body: dict[str, Any] = {"deleted": job_id, "tasks": deleted.tasks, "purging": deleted.purging}
        if not deleted.tasks:
            body["withdrawn"] = job_id  # the name this answer had when only empty jobs could go
        return web.json_response(body)

    async def resume_job(self, request: web.Request) -> web.Response:
        """A job paused at its max_total_cost goes on, with a new cap when one is given."""
        job_id = _job_id(request)
        body = await _json_body(request) if request.can_read_body else {}
        cap = body.get("max_total_cost")
        if cap is not None and (type(cap) not in (int, float) or not math.isfinite(cap) or cap <= 0):
            raise BadInput("max_total_cost: expected a positive number of USD", field="max_total_cost")
        pool_id = await self.store.write(costs.resume, job_id, float(cap) if cap is not None else None)
        self.dispatcher.notify_work(pool_id)  # a paused job's tasks were not leased: they may be now
        log.info("job_resumed", job=job_id, max_total_cost=cap)
        return web.json_response(await self._job(job_id))

    # ---- attached runs (cloudtaskd/http/runs.py) ----

    async def list_runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": self.runs.listing(), "ttl_s": self.runs.ttl_s})

    async def attach_run(self, request: web.Request) -> web.Response:
        run_id = _run_id(request)
        body = await _json_body(request)
        owner = body.get("owner", "")
        if not isinstance(owner, str) or len(owner) > RUN_OWNER_MAX_CHARS:
            raise BadInput(f"owner: expected a string of at most {RUN_OWNER_MAX_CHARS} characters", field="owner")
        job = body.get("job")
        if job is not None and (type(job) is not int or not 1 <= job <= MAX_ROWID):
            raise BadInput("job: expected a job id", field="job")
        resumed = await self.runs.attach(run_id, owner, job)
        return web.json_response({"id": run_id, "ttl_s": self.runs.ttl_s, "resumed": resumed,
                                  "runs": self.runs.listing()})

    async def detach_run(self, request: web.Request) -> web.Response:
        run_id = _run_id(request)
        self.runs.detach(run_id)
        return web.json_response({"detached": run_id})

    async def retry_job(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        n = await self.store.write(queue.retry_job, job_id)
        pool_id = await self.reads.read(lambda db: jobs.pool_of(db, job_id))
        if pool_id is not None:
            self.dispatcher.notify_work(pool_id)
        log.info("job_retried", job=job_id, tasks=n)
        return web.json_response(await self._job(job_id))

    async def list_tasks(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        state = request.query.get("state")
        if state is not None and state not in TASK_STATE_NAMES:
            raise BadInput(f"state: expected one of {', '.join(TASK_STATE_NAMES)}", field="state")
        limit = min(_int_param(request, "limit", 100) or 100, 10_000)
        after = _int_param(request, "after", 0) or 0
        # One row past the page: whether there is more, without a count over the whole job.
        rows = await self.reads.read(partial(queue.page, job_id=job_id, after=after, limit=limit + 1, state=state))
        # Not an empty list: the job itself is missing (or deleted, its rows still being purged).
        if not await self.reads.read(lambda db: jobs.exists(db, job_id)):
            raise no_job(job_id)
        more = len(rows) > limit
        rows = rows[:limit]
        # `next`: the `after` for the following page, null on the last one.
        return web.json_response({"tasks": [task_dict(r, full=True) for r in rows],
                                  "next": rows[-1]["id"] if more else None})

    async def results(self, request: web.Request) -> web.StreamResponse:
        job_id = _job_id(request)
        follow = request.query.get("follow", "") not in ("", "0", "false")
        top = _int_param(request, "top")
        after = _int_param(request, "after", 0) or 0
        cursor = _int_param(request, "cursor", 0) or 0
        if follow and top is not None:
            raise BadInput("follow and top cannot be combined: top is newest first, follow in finishing order",
                           field="top")
        if not await self.reads.read(lambda db: jobs.exists(db, job_id)):
            raise no_job(job_id)
        if follow and self.feeds.followers >= FOLLOWERS_MAX:
            raise Busy(f"cloudtaskd is busy ({self.feeds.followers} results streams followed)")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp  # the headers only: the client reads no body, and may be gone already
        try:
            if follow:
                if not await self.feeds.follow(resp, job_id, cursor):
                    # Stopped early (the daemon stopping, the store failing): no clean end, so the
                    # client sees a cut stream and resumes from its cursor rather than thinking it done.
                    if request.transport is not None:
                        request.transport.close()
                    return resp
            elif top is not None:
                rows = await self.reads.read(partial(queue.latest_results, job_id=job_id, top=top))
                await resp.write("".join(result_line(r) for r in rows).encode())
            else:
                while True:  # page through in id order so memory stays flat for a million results
                    # patient: the stream is already answering; a busy daemon slows it, never cuts it.
                    rows = await self.reads.read(partial(_results_page, job_id=job_id, after=after), patient=True)
                    if not rows:
                        break
                    await resp.write("".join(result_line(r) for r in rows).encode())
                    after = rows[-1]["id"]
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client hung up mid-stream (`cloudtaskctl results | head`): nobody to answer
        return resp

    # ---- instances ----

    async def list_instances(self, request: web.Request) -> web.Response:
        stopped = bool(request.query.get("all"))

        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            leases = queue.leases_by_instance(db)
            rows = instances.listing(db, stopped=stopped)
            return [_instance_dict(r, leases.get(r["id"], 0)) for r in rows]

        found = await self.reads.read(read)
        # The row's last_seen_at is written at hello and at disconnect only (not per message: that
        # would be a write per frame). An agent connected now is seen now: its websocket's heartbeat
        # proves it alive every few seconds.
        now, live = self.store.clock.now(), self.sessions
        for inst in found:
            inst["connected"] = inst["id"] in live
            if inst["connected"]:
                inst["last_seen_at"] = now
        return web.json_response({"instances": found})

    async def register_instance(self, request: web.Request) -> web.Response:
        """An externally managed agent (bring-your-own machine, benchmarks): returns its id and token."""
        body = await _json_body(request)
        digest, slots = body.get("worker"), body.get("slots", 1)
        if not isinstance(digest, str):
            raise BadInput("worker: expected a worker digest", field="worker")
        if type(slots) is not int or not 1 <= slots <= 100_000:
            raise BadInput("slots: expected an integer between 1 and 100000", field="slots")
        inst = f"external-{uuid.uuid4().hex[:12]}"
        token = secrets.token_urlsafe(32)
        await self.bundles.ensure(digest)  # its agent reads the worker from this state directory
        await self.store.write(_register_external, inst, digest, slots, token_hash(token))
        # max_message_bytes: what to start the agent with (--max-message-bytes) so every task fits.
        # urls: every replica's (this daemon's first), for an agent that is to fail over between them.
        urls = list(self.config.agents.dial_urls(self.agent_url()))
        return web.json_response({"id": inst, "token": token, "url": urls[0], "urls": urls, "ca_cert": self.agent_ca,
                                  "max_message_bytes": self.config.agents.max_message_bytes}, status=201)

    async def drain_instance(self, request: web.Request) -> web.Response:
        inst = request.match_info["instance"]
        state = await self.reads.read(partial(instances.state_of, instance_id=inst))
        if state is None:
            raise NotFound(f"instance {inst} does not exist")
        try:
            await self.store.write(lambda tx: tx.transition_instance(inst, InstanceEvent.DRAIN))
        except TransitionError:
            # Already draining, stopping or stopped: a conflict with its state (409), not a store failure.
            raise CloudtaskError(f"instance {inst} is {state}: only a starting or running instance"
                                 " can be drained") from None
        self.dispatcher.drain(inst)
        row = await self.reads.read(partial(instances.get, instance_id=inst))
        assert row is not None
        return web.json_response(_instance_dict(row, 0))

    async def instance_logs(self, request: web.Request) -> web.Response:
        """The bootstrap log (and for local instances the agent's log) kept on the control host."""
        inst = request.match_info["instance"]
        if not await self.reads.read(partial(instances.exists, instance_id=inst)):
            raise NotFound(f"instance {inst} does not exist")
        parts = []
        for name, path in (("bootstrap", self.config.state_path / "instances" / inst / "bootstrap.log"),
                           ("agent", self.config.state_path / "local" / inst / "agent.log")):
            if path.exists():
                parts.append(f"==> {name} log ({path}) <==\n{path.read_text(errors='replace')[-200_000:]}")
        return web.Response(text="\n".join(parts) or "(no logs kept for this instance)\n",
                            content_type="text/plain")


    # ---- cost ----

    async def fleet_cost(self, request: web.Request) -> web.Response:
        now = self.store.clock.now()  # the clock stored times were written on (clock.py)
        return web.json_response(await self.reads.read(lambda db: costs.fleet(db, now)))

    async def job_cost(self, request: web.Request) -> web.Response:
        job_id, now = _job_id(request), self.store.clock.now()
        found = await self.reads.read(lambda db: costs.job(db, job_id, now))
        if found is None:
            raise no_job(job_id)
        return web.json_response(found)

    # ---- catalog and prices ----

    async def get_catalog(self, request: web.Request) -> web.Response:
        ages = await self.market.ages()
        offers = [_offer_dict(o) for o in self.market.offers()]
        return web.json_response({"offers": offers, "age_s": ages})

    async def refresh_catalog(self, request: web.Request) -> web.Response:
        results = await self.market.refresh()
        return web.json_response({"providers": [
            {"provider": r.provider, "offers": r.offers, "error": r.error} for r in results]})

    async def interruptions(self, request: web.Request) -> web.Response:
        """Spot interruptions per offer over the rate window, and the latest notices."""
        now = self.store.clock.now()  # the clock stored times were written on (clock.py)

        def read(db: Any) -> dict[str, Any]:
            recent = interruption_rows.recent(db, INTERRUPTIONS_RECENT)
            return {"window_s": interruptions.RATE_WINDOW_S, "offers": interruptions.counts(db, now),
                    "recent": [dict(r) for r in recent]}

        return web.json_response(await self.reads.read(read))

    async def prices(self, request: web.Request) -> web.Response:
        """The ranked table: what the daemon would buy for tasks of this size, cheapest slot-hour first."""
        q = request.query
        needs = Needs(_float_param(request, "cpus_per_task", 1.0, lo=0.01),
                      int(_float_param(request, "memory_per_task", 0.0, lo=0.0)) or None,
                      int(_float_param(request, "gpus_per_task", 0.0, lo=0.0)))
        spot = q.get("spot")
        policy = Policy(
            providers=tuple(x for x in q.get("providers", "").split(",") if x),
            regions=tuple(x for x in q.get("regions", "").split(",") if x),
            spot=spot != "false", on_demand=spot != "true",
            max_price_per_hour=_float_param(request, "max_price_per_hour", 0.0, lo=0.0) or None)
        await self.market.observe()
        ranked = self.market.rank(needs, policy)
        answer: dict[str, Any] = {"candidates": [
            {**_offer_dict(c.offer), "slots": c.slots,
             "interruptions_per_hour": round(rate_of(c.offer, self.market.rates), 6),
             "cost_per_slot_hour": None if math.isinf(c.cost_per_slot_hour) else c.cost_per_slot_hour}
            for c in ranked]}
        if not ranked:
            answer["why"] = why_no_offer(self.market.offers(), needs, policy)
        return web.json_response(answer)


# ---- helpers ----------------------------------------------------------------------------------


def _float_param(request: web.Request, name: str, default: float, *, lo: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = decimal_number(raw)
    if value is None:
        raise BadInput(f"{name}: expected a number in ASCII digits (like 0.5), got {raw!r:.80}", field=name)
    if not math.isfinite(value) or value < lo:
        raise BadInput(f"{name}: expected a number >= {lo}, got {raw!r}", field=name)
    return value


def _offer_dict(o: Offer) -> dict[str, Any]:
    return {"provider": o.provider, "region": o.region, "zone": o.zone, "machine_type": o.machine_type,
            "spot": o.spot, "cpus": o.cpus, "memory_gb": o.memory_gb, "gpus": o.gpus,
            "price_per_hour": o.price_per_hour}


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["run"]
    if not RUN_ID.fullmatch(run_id):
        raise BadInput("run: expected 1 to 64 letters, digits, '-' or '_'", field="run")
    return run_id


def _run_body(raw: Any) -> dict[str, str] | None:
    """A job's `run` object (cloudtaskctl run): the run that submitted it and what it submitted."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"id", "owner", "submission"}:
        raise BadInput("run: expected an object with id, owner and submission", field="run")
    if not isinstance(raw.get("id"), str) or not RUN_ID.fullmatch(raw["id"]):
        raise BadInput("run.id: expected 1 to 64 letters, digits, '-' or '_'", field="run.id")
    owner = raw.get("owner", "")
    if not isinstance(owner, str) or len(owner) > RUN_OWNER_MAX_CHARS:
        raise BadInput(f"run.owner: expected a string of at most {RUN_OWNER_MAX_CHARS} characters", field="run.owner")
    submission = raw.get("submission")
    if submission is not None and (not isinstance(submission, str) or not SUBMISSION.fullmatch(submission)):
        raise BadInput("run.submission: expected a sha256 in hex (64 characters 0-9a-f)", field="run.submission")
    return {"id": raw["id"], "owner": owner, "submission": submission}


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=jsonx.loads)
    except ValueError as exc:
        raise BadInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object")
    return body


def _delete_or_withdraw(tx: Tx, job_id: int) -> retention.Deleted:
    """A job that never held a task (its upload refused) is withdrawn whole at once; any other is deleted."""
    if queue.any_of_job(tx.db, job_id) or uploads.receiving(tx.db, job_id):
        return retention.delete_job(tx, job_id)
    queue.withdraw_job(tx, job_id)
    return retention.Deleted(job_id, 0, False)


def _register_external(tx: Tx, inst: str, digest: str, slots: int, hashed: str) -> None:
    pool_id = pools.id_of(tx.db, digest)
    if pool_id is None:
        raise BadInput(f"worker {digest[:16]!r} is unknown", field="worker")
    instances.add(tx, inst, provider=instances.EXTERNAL, pool_id=pool_id, state=InstanceState.STARTING,
                  slots=slots, token_hash=hashed)
    tx.event("instance_registered", instance_id=inst)


def _job_dict(row: sqlite3.Row, recent: tuple[int, float | None], instances: int, now: float,
              waiting: str | None = None) -> dict[str, Any]:
    counts = {s.value: row[COUNTER[s]] for s in TASK_STATES}
    counts["total"] = sum(counts.values())
    is_open = row["is_open"] == jobs.OPEN
    done = job_done(row["state"], counts, is_open)
    outcome = job_outcome(row["state"], counts, is_open)
    n_recent, first = recent[0], recent[1]
    span = max(1.0, now - first) if n_recent and first else RATE_WINDOW_S
    return {
        "id": row["id"], "name": row["name"], "state": row["state"], "done": done, "outcome": outcome,
        "open": is_open,
        "created_at": row["created_at"], "finished_at": row["finished_at"], "worker": row["digest"],
        "counts": counts, "rate_per_s": round(n_recent / min(span, RATE_WINDOW_S), 2) if n_recent else 0.0,
        "instances": instances, "max_attempts": row["max_attempts"], "timeout_s": row["timeout_s"],
        "max_instances": row["max_instances"], "policy": json.loads(row["policy"] or "{}"),
        "max_total_cost": row["max_total_cost"], "state_reason": row["state_reason"],
        "pause_cause": row["pause_cause"], "waiting": waiting,
        # Submitted by `cloudtaskctl run`: which one (held when it is gone), and the submission's hash.
        "run": {"id": row["run_id"], "owner": row["run_owner"]} if row["run_id"] else None,
        "submission": row["submission"],
    }


def _job_policy(raw: Any) -> Policy:
    """A job's `policy` object: what it allows. Every field is optional; a bad one is named."""
    if raw is None:
        return Policy()
    if not isinstance(raw, dict):
        raise BadInput("policy: expected an object", field="policy")
    unknown = set(raw) - {"providers", "regions", "spot", "on_demand_fallback", "max_price_per_hour"}
    if unknown:
        raise BadInput(f"policy.{sorted(unknown)[0]}: unknown key", field=f"policy.{sorted(unknown)[0]}")
    lists = {}
    for key in ("providers", "regions"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise BadInput(f"policy.{key}: expected a list of names", field=f"policy.{key}")
        lists[key] = tuple(value)
    flags = {}
    for key in ("spot", "on_demand_fallback"):
        value = raw.get(key, True)
        if type(value) is not bool:
            raise BadInput(f"policy.{key}: expected true or false", field=f"policy.{key}")
        flags[key] = value
    price = raw.get("max_price_per_hour")
    if price is not None and (type(price) not in (int, float) or not math.isfinite(price) or price <= 0):
        raise BadInput("policy.max_price_per_hour: expected a positive number of USD",
                       field="policy.max_price_per_hour")
    # Spot allowed: on-demand only as the fallback, if the job allows one. No spot: on-demand.
    on_demand = flags["on_demand_fallback"] or not flags["spot"]
    return Policy(lists["providers"], lists["regions"], flags["spot"], on_demand,
                  float(price) if price is not None else None)


def _results_page(db: sqlite3.Connection, *, job_id: int, after: int) -> list[sqlite3.Row]:
    return queue.results_page(db, job_id, after, RESULTS_PAGE)


def _instance_dict(row: sqlite3.Row, leases: int) -> dict[str, Any]:
    return {
        "id": row["id"], "provider": row["provider"], "state": row["state"], "slots": row["slots"],
        "leases": leases, "created_at": row["created_at"], "started_at": row["started_at"],
        "last_seen_at": row["last_seen_at"], "ended_at": row["ended_at"], "last_error": row["last_error"],
        "price_per_hour": row["price_per_hour"], "cloud_id": row["cloud_id"],
    }


__all__ = ["ControlApi", "errors_middleware"]
