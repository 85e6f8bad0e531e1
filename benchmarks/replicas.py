"""Two cloudtaskd replicas on one PostgreSQL database against one (issue 17), real processes throughout.

    python benchmarks/replicas.py [--tasks 50000] [--agents 2] [--slots 64] [--prefetch 512] [--runs 1]

Starts its own PostgreSQL (Debian's package, fsync and synchronous_commit on: durable commits, as
SQLite's synchronous=FULL) and, per run, on a fresh database each time:

- dispatch, one replica: benchmarks/dispatch.py's run_dispatch, N no-op tasks;
- dispatch, two replicas: the same N, agents and slots, the agents spread evenly (agent a registered
  on replica a % 2, dialling it first). Tasks/s from the upload's end to the job done; the lease
  round trip p50/p99 as the agents measure it (their --stats-file lease_rtts_s);
- failover: two replicas, the first leading the orchestrator, the agents spread as above and a job
  of N tasks; when a quarter is done the leader is SIGKILLed. Measured from the kill: each of its
  agents' `agent_connected` on the survivor's URL (the agents' logs), and the survivor's
  `leader_work_started`. The job must then finish with every task exactly one result (the results
  endpoint, the tasks table and the events table).

`--runs N` interleaves them (one replica, two replicas, failover; N times) in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
from _common import DaemonProcess, percentile
from dispatch import (
    DispatchRun,
    agent_url,
    kill_agents,
    logged_at,
    new_database,
    postgres_server,
    run_dispatch,
    start_agents,
    start_replicas,
    until,
    upload_worker,
    write_tasks,
)

KILL_AT_FRACTION = 0.25  # of the tasks succeeded: mid-job, with leases in flight on both replicas
MOVE_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class FailoverRun:
    moves_s: list[float]  # SIGKILL to each of the killed replica's agents connected to the survivor
    leads_s: float  # SIGKILL to the survivor's orchestrator running
    done_at_kill: int  # tasks succeeded when the leader was killed
    finish_s: float  # SIGKILL to the job done


async def run_failover(*, dsn: str, tasks: int, agents: int, slots: int, prefetch: int) -> FailoverRun:
    """Kill the leading replica mid-job; time its agents' move and the survivor's leadership, then
    check each task has exactly one result."""
    # info: the leader's `leader_work_started` is an info line.
    leader, survivor = daemons = await start_replicas(dsn, 2, log_level="info", lead_first=True)
    procs = []
    try:
        digest = await upload_worker(daemons, "python")
        job = await leader.post("/v1/jobs", json={"name": "failover", "worker": digest})
        job_id = int(job["id"])
        procs = await start_agents(daemons, digest, agents=agents, slots=slots, prefetch=prefetch)
        with write_tasks(leader.workdir / "tasks.jsonl", tasks).open("rb") as f:
            await survivor.post(f"/v1/jobs/{job_id}/tasks", data=f)

        async def succeeded() -> int:
            return int((await survivor.get(f"/v1/jobs/{job_id}"))["counts"]["succeeded"])

        async def far_enough() -> bool:
            return await succeeded() >= tasks * KILL_AT_FRACTION
        await until(far_enough, FINISH_TIMEOUT_S, f"{KILL_AT_FRACTION:.0%} of the tasks done", interval_s=0.05)
        done_at_kill = await succeeded()
        if done_at_kill >= tasks:
            raise SystemExit("the job finished before the kill: use more --tasks")
        killed_at = time.time()
        leader.kill()

        moving = [a for a in procs if a.replica == 0]
        survivor_url = agent_url(survivor)

        def moved() -> list[float] | None:
            times = [_first_after(logged_at_url(a.log, survivor_url), killed_at) for a in moving]
            return None if None in times else [t - killed_at for t in times if t is not None]
        moves_s: list[float] = await until(moved, MOVE_TIMEOUT_S, "the killed replica's agents on the survivor")

        def leads() -> float | None:
            t = _first_after(logged_at(survivor.log_path, "leader_work_started"), killed_at)
            return None if t is None else t - killed_at
        leads_s: float = await until(leads, MOVE_TIMEOUT_S, "the survivor leading the orchestrator")

        async def done() -> bool:
            return bool((await survivor.get(f"/v1/jobs/{job_id}"))["done"])
        await until(done, FINISH_TIMEOUT_S, "the job done on the survivor", interval_s=0.1)
        finish_s = time.time() - killed_at
        await check_exactly_once(survivor, dsn, job_id, tasks)
        return FailoverRun(moves_s=moves_s, leads_s=leads_s, done_at_kill=done_at_kill, finish_s=finish_s)
    finally:
        kill_agents(procs)
        for d in daemons:
            await d.stop()


def logged_at_url(log: Path, url: str) -> list[float]:
    """When an agent logged `agent_connected` to `url` (its `ts`, wall clock)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == "agent_connected" and e.get("url") == url:
            out.append(float(e["ts"]))
    return out


def _first_after(times: list[float], t0: float) -> float | None:
    later = [t for t in times if t >= t0]
    return min(later) if later else None


async def check_exactly_once(daemon: DaemonProcess, dsn: str, job_id: int, n: int) -> None:
    """Every task one succeeded result: the results endpoint, the tasks table, the events table."""
    results = [json.loads(line) for line in (await daemon.get(f"/v1/jobs/{job_id}/results")).splitlines()]
    ids = [r["id"] for r in results]
    failures = []
    if not len(ids) == len(set(ids)) == n:
        failures.append(f"{len(ids)} results for {len(set(ids))} distinct tasks, of {n}")
    if any(r["status"] != "succeeded" for r in results):
        failures.append("a result is not a success")
    with psycopg.connect(dsn) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM tasks WHERE job_id = %s GROUP BY state",
                                   (job_id,)).fetchall())
        twice = conn.execute("SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
                             " AND job_id = %s GROUP BY task_id HAVING count(*) > 1) AS t", (job_id,)).fetchone()
    if states != {"succeeded": n}:
        failures.append(f"tasks table: {states}")
    if twice is None or twice[0] != 0:
        failures.append(f"{twice[0] if twice else '?'} tasks recorded as succeeded twice")
    if failures:
        raise SystemExit("ERROR: not exactly once after the kill: " + "; ".join(failures))


def _dispatch_line(label: str, r: DispatchRun) -> str:
    return (f"{label}: {r.succeeded} in {r.dispatch_s:.2f} s = {r.tasks_per_s:,.0f} tasks/s; lease p50 "
            f"{percentile(r.lease_rtts_s, 50) * 1000:.0f} ms, p99 {percentile(r.lease_rtts_s, 99) * 1000:.0f} ms"
            f" ({len(r.lease_rtts_s)}); daemons' CPU {r.daemon_cpu_s:.1f} s")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("--agents", type=int, default=2, help="in total, spread evenly over the replicas")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=512)
    ap.add_argument("--runs", type=int, default=1, help="one replica, two replicas, failover: interleaved, N times")
    ap.add_argument("--no-failover", action="store_true", help="dispatch figures only")
    args = ap.parse_args()
    if args.agents < 2:
        ap.error("--agents: at least 2, one on each replica")
    shape = dict(tasks=args.tasks, agents=args.agents, slots=args.slots, prefetch=args.prefetch)

    rows: list[tuple[DispatchRun, DispatchRun, FailoverRun | None]] = []
    with ExitStack() as stack:
        server = postgres_server(stack)
        for run in range(1, args.runs + 1):
            one = await run_dispatch(**shape, database=new_database(server), replicas=1)
            print(_dispatch_line(f"run {run} one replica ", one), flush=True)
            two = await run_dispatch(**shape, database=new_database(server), replicas=2)
            print(_dispatch_line(f"run {run} two replicas", two), flush=True)
            fail = None
            if not args.no_failover:
                fail = await run_failover(dsn=new_database(server), **shape)
                print(f"run {run} failover: agents on the survivor {', '.join(f'{m:.2f}' for m in fail.moves_s)} s"
                      f" after the SIGKILL; survivor leads at {fail.leads_s:.2f} s; killed at {fail.done_at_kill}"
                      f" done, job done {fail.finish_s:.1f} s later, each task one result", flush=True)
            for r in (one, two):
                if r.succeeded != args.tasks:
                    raise SystemExit(f"ERROR: {args.tasks - r.succeeded} tasks did not succeed")
            rows.append((one, two, fail))

    print(f"\ntasks={args.tasks} agents={args.agents} x {args.slots} slots, prefetch {args.prefetch};"
          f" PostgreSQL {server.bin.parent.name} fsync on; {os.cpu_count()} cores shared by all processes")
    print("| run | one replica tasks/s | lease p50 / p99 | two replicas tasks/s | lease p50 / p99 |"
          " agents moved after SIGKILL | survivor leads |")
    print("|---|---|---|---|---|---|---|")
    for i, (one, two, fail) in enumerate(rows, start=1):
        moved = "-" if fail is None else (f"{fail.moves_s[0]:.2f} s" if len(fail.moves_s) == 1 else
                                          f"{min(fail.moves_s):.2f} to {max(fail.moves_s):.2f} s")
        leads = f"{fail.leads_s:.2f} s" if fail else "-"
        print(f"| {i} | {one.tasks_per_s:,.0f} | {_ms(one)} | {two.tasks_per_s:,.0f} | {_ms(two)} | {moved}"
              f" | {leads} |")
    if len(rows) > 1:
        print(f"median: one replica {statistics.median(o.tasks_per_s for o, _, _ in rows):,.0f} tasks/s,"
              f" two replicas {statistics.median(t.tasks_per_s for _, t, _ in rows):,.0f} tasks/s")


def _ms(r: DispatchRun) -> str:
    return f"{percentile(r.lease_rtts_s, 50) * 1000:.0f} / {percentile(r.lease_rtts_s, 99) * 1000:.0f} ms"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    asyncio.run(main())
