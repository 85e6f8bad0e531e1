"""procrastinate (a PostgreSQL-backed task queue) beside cloudtask's dispatch, measured in one session
(issue 17).

    pip install -e '.[bench]'
    python benchmarks/procrastinate_compare.py [--tasks 20000] [--workers 2] [--concurrency 64]
                                               [--ours sqlite] [--ours postgresql] [--runs 3]

procrastinate's side: a real PostgreSQL (tests/fakes/postgres.py: Debian's package, initdb in a temp dir,
127.0.0.1, a free port, stopped by PID), a fresh database per run with procrastinate's schema applied,
N no-op jobs deferred with `Task.batch_defer_async` (one INSERT per batch), then `--workers` worker
processes, each `App.run_worker_async(concurrency=..., wait=False)` (it returns once the queue is
empty), until all are done. It prints:
- enqueue tasks/s: the batch defers' wall time;
- processing tasks/s: first fetch to last completion, from procrastinate's own `procrastinate_events`
  rows (`started` is written by the fetch, `succeeded` by the completion; both the server's clock);
- fetch p50/p99: each `JobManager.fetch_job` call that returned a job, timed in the worker by wrapping
  that method (procrastinate records no fetch duration itself; the wrapper only reads a clock);
- start->completion p50/p99: per job, its `started` event to its `succeeded` event.

`--ours sqlite` interleaves our side, run by benchmarks/dispatch.py's run_dispatch with `--workers`
agents of `--concurrency` slots each and the same N: enqueue (upload+queue) tasks/s, processing
tasks/s (tasks committed to the last result) and the agents' lease round trip p50/p99 (a credit sent
to its grant received: the nearest thing to procrastinate's fetch). `--ours postgresql` runs our
daemon with `database:` on the same PostgreSQL server as procrastinate (a fresh database each run).

PostgreSQL runs as the fake's defaults: fsync, synchronous_commit and full_page_writes off (for both
queues on it), while our SQLite side is durable (WAL, synchronous=FULL): that favours the PostgreSQL
sides, and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import ROOT, percentile
from dispatch import run_dispatch

from tests.fakes.postgres import PostgresServer, unavailable

TASK_NAME = "bench_noop"
DEFAULT_TASKS = 20_000
DEFAULT_BATCH = 1_000
WORKER_TIMEOUT_S = 900.0
INSTALL_HINT = "install the bench extra: .venv/bin/pip install -e '.[bench]'"


@dataclass(frozen=True)
class Figures:
    """One run of one side, in the same terms for both."""

    side: str
    done: int
    enqueue_per_s: float
    processing_per_s: float
    latency_name: str  # what latency_s holds, in words
    latency_s: list[float]
    extra_name: str = ""
    extra_s: tuple[float, ...] = ()
    note: str = ""

    def line(self) -> str:
        text = (f"{self.side}: enqueue {self.enqueue_per_s:,.0f} tasks/s, processing {self.processing_per_s:,.0f}"
                f" tasks/s, {self.latency_name} {_p50_p99(self.latency_s)}")
        if self.extra_name:
            text += f", {self.extra_name} {_p50_p99(list(self.extra_s))}"
        return text + (f"; {self.note}" if self.note else "")


def _p50_p99(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1000:.2f} ms / p99 {percentile(values, 99) * 1000:.2f} ms ({len(values)})"


# --- procrastinate's side -------------------------------------------------------------------------------

def _procrastinate() -> Any:
    try:
        import procrastinate
    except ImportError as exc:
        raise SystemExit(f"procrastinate is not installed: {INSTALL_HINT}") from exc
    return procrastinate


def make_app(dsn: str, pool_size: int) -> Any:
    """The App both the deferrer and the workers build, with the one no-op task under a fixed name."""
    procrastinate = _procrastinate()
    # min_size = max_size: the pool opens whole before the clock starts (TCP logins use scram-sha-256,
    # a few ms each), as a long-running worker's pool would be.
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=pool_size,
                                                                     max_size=pool_size))

    @app.task(name=TASK_NAME)
    async def noop(i: int) -> None:
        return None

    return app


async def worker_process(dsn: str, concurrency: int, pool_size: int, stats_file: Path) -> None:
    """One procrastinate worker, as a deployment runs it: its own process, pool and sub-workers."""
    app = make_app(dsn, pool_size)
    fetch_s: list[float] = []
    fetch_job = app.job_manager.fetch_job

    async def timed_fetch_job(queues: Any, worker_id: int) -> Any:
        began = time.perf_counter()
        job = await fetch_job(queues=queues, worker_id=worker_id)
        if job is not None:  # the last fetch, finding the queue empty, is not a job's fetch
            fetch_s.append(time.perf_counter() - began)
        return job

    app.job_manager.fetch_job = timed_fetch_job
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, wait=False, delete_jobs="never")
    stats_file.write_text(json.dumps({"fetch_s": fetch_s}))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only: the finished workers
    return usage.ru_utime + usage.ru_stime


async def _admin(server: PostgresServer, statement: str, database: str = "postgres") -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(server.dsn(database), autocommit=True) as conn:
        await conn.execute(statement)


async def run_procrastinate(server: PostgresServer, *, run: int, tasks: int, workers: int, concurrency: int,
                            pool_size: int, batch: int, analyze: bool, workdir: Path) -> Figures:
    import psycopg

    database = f"bench_{run}"
    await _admin(server, f"DROP DATABASE IF EXISTS {database}")
    await _admin(server, f"CREATE DATABASE {database}")
    dsn = server.dsn(database)
    app = make_app(dsn, 2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        noop = app.tasks[TASK_NAME]
        began = time.perf_counter()
        for start in range(0, tasks, batch):
            await noop.batch_defer_async(*({"i": i} for i in range(start, min(tasks, start + batch))))
        enqueue_s = time.perf_counter() - began
    if analyze:
        # A fresh table has no planner statistics, and procrastinate_fetch_job_v2's plan without them
        # costs ~40x more per fetch here (10 ms against 0.25 ms with 5,000 jobs queued). autovacuum
        # analyzes a long-lived table on its own, so this is the state a deployed queue is in;
        # --no-analyze measures the fresh table instead.
        await _admin(server, "ANALYZE procrastinate_jobs", database=database)

    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    children_cpu0 = _children_cpu_s()
    try:
        for w in range(workers):
            stats, log = workdir / f"run{run}-worker{w}.json", workdir / f"run{run}-worker{w}.log"
            with log.open("wb") as out:
                procs.append((subprocess.Popen(
                    [sys.executable, __file__, "--worker-process", "--dsn", dsn, "--concurrency", str(concurrency),
                     "--pool-size", str(pool_size), "--stats-file", str(stats)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT), stats, log))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while any(p.poll() is None for p, _, _ in procs):
            if time.monotonic() > deadline:
                raise SystemExit(f"procrastinate workers still running after {WORKER_TIMEOUT_S:.0f} s; "
                                 f"their logs: {workdir}")
            await asyncio.sleep(0.05)
        for p, _, log in procs:
            if p.returncode != 0:
                raise SystemExit(f"a procrastinate worker exited {p.returncode}:\n{log.read_text()[-3000:]}")
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    workers_cpu_s = _children_cpu_s() - children_cpu0
    fetch_s = [s for _, stats, _ in procs for s in json.loads(stats.read_text())["fetch_s"]]

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT job_id, type::text, extract(epoch FROM at)::float8 FROM procrastinate_events"
            " WHERE type IN ('started', 'succeeded')")
        rows = await cur.fetchall()
        cur = await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
        count_row = await cur.fetchone()
    await _admin(server, f"DROP DATABASE {database}")
    done = int(count_row[0]) if count_row else 0
    started = {job: at for job, kind, at in rows if kind == "started"}
    succeeded = {job: at for job, kind, at in rows if kind == "succeeded"}
    if done != tasks or len(succeeded) != tasks:
        raise SystemExit(f"procrastinate: {done} of {tasks} jobs succeeded ({len(succeeded)} succeeded events); "
                         f"worker logs: {workdir}")
    processing_s = max(succeeded.values()) - min(started.values())
    return Figures(side="procrastinate", done=done, enqueue_per_s=tasks / enqueue_s,
                   processing_per_s=done / processing_s, latency_name="fetch_job round trip",
                   latency_s=fetch_s, extra_name="job started->succeeded (events)",
                   extra_s=tuple(succeeded[j] - started[j] for j in succeeded),
                   note=f"workers' CPU {workers_cpu_s:.1f} s over {processing_s:.1f} s")


# --- our side -------------------------------------------------------------------------------------------

async def _ours_sqlite(server: PostgresServer, *, tasks: int, workers: int, concurrency: int,
                       prefetch: int) -> Figures:
    r = await run_dispatch(tasks=tasks, agents=workers, slots=concurrency, prefetch=prefetch)
    if r.succeeded != tasks:
        raise SystemExit(f"ours sqlite: {r.succeeded} of {tasks} tasks succeeded")
    return Figures(side="ours sqlite", done=r.succeeded, enqueue_per_s=tasks / r.queue_s,
                   processing_per_s=r.tasks_per_s, latency_name="lease round trip", latency_s=r.lease_rtts_s,
                   note=f"daemon CPU {r.daemon_cpu_s:.1f} s over {r.total_s:.1f} s")


async def _ours_postgresql(server: PostgresServer, *, tasks: int, workers: int, concurrency: int,
                           prefetch: int) -> Figures:
    """Our daemon with `database:` on the same PostgreSQL server as procrastinate's, a fresh database."""
    database = f"ours_{uuid.uuid4().hex[:8]}"
    await _admin(server, f"CREATE DATABASE {database}")
    r = await run_dispatch(tasks=tasks, agents=workers, slots=concurrency, prefetch=prefetch,
                           database=server.dsn(database))
    if r.succeeded != tasks:
        raise SystemExit(f"ours postgresql: {r.succeeded} of {tasks} tasks succeeded")
    return Figures(side="ours postgresql", done=r.succeeded, enqueue_per_s=tasks / r.queue_s,
                   processing_per_s=r.tasks_per_s, latency_name="lease round trip", latency_s=r.lease_rtts_s,
                   note=f"daemon CPU {r.daemon_cpu_s:.1f} s over {r.total_s:.1f} s")


OursRunner = Callable[..., Awaitable[Figures]]
OURS: dict[str, OursRunner] = {"sqlite": _ours_sqlite, "postgresql": _ours_postgresql}


# --- the session ----------------------------------------------------------------------------------------

def _machine_note(server: PostgresServer) -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return (f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"PostgreSQL {server.bin.parent.name} (fsync off), procrastinate {version('procrastinate')}, "
            f"psycopg {version('psycopg')}")


def _summary(side: str, runs: list[Figures]) -> str:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} (min {min(values):,.0f}, max {max(values):,.0f})"

    def med_ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.2f} ms"

    text = (f"{side}, median of {len(runs)}: enqueue {med([r.enqueue_per_s for r in runs])} tasks/s; "
            f"processing {med([r.processing_per_s for r in runs])} tasks/s; {runs[0].latency_name} "
            f"p50 {med_ms([percentile(r.latency_s, 50) for r in runs])} "
            f"p99 {med_ms([percentile(r.latency_s, 99) for r in runs])}")
    if runs[0].extra_name:
        text += (f"; {runs[0].extra_name} p50 {med_ms([percentile(list(r.extra_s), 50) for r in runs])} "
                 f"p99 {med_ms([percentile(list(r.extra_s), 99) for r in runs])}")
    return text


async def compare(args: argparse.Namespace, server: PostgresServer) -> None:
    pool_size = args.pool_size or args.concurrency + 1
    print(_machine_note(server))
    print(f"tasks={args.tasks} procrastinate: workers={args.workers} concurrency={args.concurrency} "
          f"pool={pool_size} batch={args.batch} analyze={'yes' if args.analyze else 'no'}"
          + (f"; ours {', '.join(args.ours)}: agents={args.workers} slots={args.concurrency} prefetch={args.prefetch}"
             if args.ours else ""), flush=True)
    results: dict[str, list[Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="cloudtask-bench-procrastinate-") as tmp:
        for run in range(1, args.runs + 1):
            # Interleaved, so a slower minute on a shared machine falls on both sides alike.
            figures = [await run_procrastinate(server, run=run, tasks=args.tasks, workers=args.workers,
                                               concurrency=args.concurrency, pool_size=pool_size,
                                               batch=args.batch, analyze=args.analyze, workdir=Path(tmp))]
            print(f"run {run}/{args.runs} {figures[-1].line()}", flush=True)
            for ours in args.ours or ():
                figures.append(await OURS[ours](server, tasks=args.tasks, workers=args.workers,
                                                concurrency=args.concurrency, prefetch=args.prefetch))
                print(f"run {run}/{args.runs} {figures[-1].line()}", flush=True)
            for f in figures:
                results.setdefault(f.side, []).append(f)
    for side, runs in results.items():
        print(_summary(side, runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tasks", type=int, default=DEFAULT_TASKS)
    ap.add_argument("--workers", type=int, default=2,
                    help="procrastinate worker processes; with --ours, also our agents")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="sub-workers per procrastinate worker; with --ours, also slots per agent")
    ap.add_argument("--pool-size", type=int, default=0,
                    help="connections per procrastinate worker (default: concurrency + 1, as procrastinate's "
                         "docs advise for short jobs)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="jobs per batch_defer_async call")
    ap.add_argument("--no-analyze", dest="analyze", action="store_false",
                    help="leave procrastinate_jobs without planner statistics after deferring (a fresh table)")
    ap.add_argument("--prefetch", type=int, default=512, help="our agents' prefetch (with --ours)")
    ap.add_argument("--ours", choices=sorted(OURS), action="append",
                    help="also run cloudtask's dispatch on this store, interleaved (repeatable)")
    ap.add_argument("--runs", type=int, default=1)
    # Internal: how the session starts each procrastinate worker process.
    ap.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dsn", help=argparse.SUPPRESS)
    ap.add_argument("--stats-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker_process:
        asyncio.run(worker_process(args.dsn, args.concurrency, args.pool_size, args.stats_file))
        return
    for flag, value in (("--tasks", args.tasks), ("--workers", args.workers), ("--concurrency", args.concurrency),
                        ("--batch", args.batch), ("--runs", args.runs)):
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1 (got {value})")
    _procrastinate()
    if (why := unavailable()) is not None:
        raise SystemExit(why)

    server = PostgresServer()
    # SIGTERM as an exception too, so the finally below stops the server by its PID (Ctrl-C already is one).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        server.start()
        asyncio.run(compare(args, server))
    finally:
        server.cleanup()


if __name__ == "__main__":
    os.chdir(ROOT)
    # Through the module's own name: procrastinate warns about an App built in `__main__` (its task
    # names would depend on how the script was started; ours are fixed, but the warning is noise).
    import procrastinate_compare

    procrastinate_compare.main()
