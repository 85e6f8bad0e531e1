"""Dispatch throughput end to end: N no-op tasks through a real cloudtaskd process and real agent
processes over the websocket, with durable state (WAL, synchronous=FULL).

    python benchmarks/dispatch.py [--tasks 200000] [--agents 2] [--slots 64] [--mode python|stream]
                                  [--database sqlite|pg|postgresql://...]

Prints tasks/s (first grant to last commit), lease round-trip p50/p99 as the agents measured it,
the daemon's peak RSS and CPU, and each agent's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT, DaemonProcess, bundle, cpu_seconds, peak_rss_mb, percentile

WORKERS = {
    "python": {
        "cloudtask.yaml": "mode: python\nfunction: noop:run\n",
        "noop.py": "async def run(i, d):\n    return None\n",
    },
    "stream": {
        "cloudtask.yaml": f"mode: stream\ncommand: {sys.executable} -u s.py\n",
        "s.py": "import sys\nfor l in sys.stdin:\n    i = l[7:l.index('\"', 8)]\n"
                "    sys.stdout.write('{\"id\": \"' + i + '\", \"result\": null}\\n'); sys.stdout.flush()\n",
    },
}


@dataclass(frozen=True)
class DispatchRun:
    """One run's figures; benchmarks/procrastinate_compare.py runs it beside another queue."""

    tasks: int
    succeeded: int
    queue_s: float  # upload start to the job's tasks committed
    dispatch_s: float  # tasks committed to the last result (the agents were connected before)
    total_s: float  # upload start to the last result
    lease_rtts_s: list[float]  # each credit's round trip to its grant, as the agents measured it
    daemon_cpu_s: float
    daemon_rss_mb: float
    agent_rss_mb: list[float]

    @property
    def tasks_per_s(self) -> float:
        return self.succeeded / self.dispatch_s


async def run_dispatch(*, tasks: int, agents: int, slots: int, prefetch: int = 512,
                       mode: str = "python", database: str = "sqlite") -> DispatchRun:
    """Run `tasks` no-op tasks through a fresh daemon (its own temp state dir) and `agents` agent
    processes; `database`: sqlite (in the state dir) or a postgresql:// URL."""
    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}}, "agents": {"lease_ttl_s": 120},
                            "database": database})
    await daemon.start()
    assert daemon.proc is not None
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKERS[mode]))
        job = await daemon.post("/v1/jobs", json={"name": "bench", "worker": worker["digest"]})
        tasks_file = Path(daemon.tmp.name) / "tasks.jsonl"
        with tasks_file.open("w") as f:
            for i in range(tasks):
                f.write(f'{{"id":"t{i}","data":{{"i":{i}}}}}\n')
        worker_dir = daemon.state_dir / "workers" / worker["digest"]
        for a in range(agents):
            inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": slots})
            stats = Path(daemon.tmp.name) / f"agent{a}.json"
            ca = Path(daemon.tmp.name) / "ca.pem"
            ca.write_text(inst["ca_cert"])
            env = {**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.main", "--url", inst["url"], "--instance", inst["id"],
                 "--worker-dir", str(worker_dir), "--slots", str(slots), "--prefetch", str(prefetch),
                 "--stats-file", str(stats), "--ca-file", str(ca)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append((proc, stats))
        cpu0 = cpu_seconds(daemon.proc.pid)
        with tasks_file.open("rb") as f:
            t0 = time.monotonic()
            await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=f)
        t_queued = time.monotonic()
        while True:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            if j["done"]:
                break
            await asyncio.sleep(0.05)
        t_end = time.monotonic()
        cpu = cpu_seconds(daemon.proc.pid) - cpu0
        daemon_rss = peak_rss_mb(daemon.proc.pid)
        agent_rss = [peak_rss_mb(p.pid) for p, _ in procs]
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        rtts: list[float] = []
        for p, stats in procs:
            p.wait(timeout=60)
            rtts += json.loads(stats.read_text())["lease_rtts_s"]
        return DispatchRun(tasks=tasks, succeeded=j["counts"]["succeeded"], queue_s=t_queued - t0,
                           dispatch_s=t_end - t_queued, total_s=t_end - t0, lease_rtts_s=rtts,
                           daemon_cpu_s=cpu, daemon_rss_mb=daemon_rss, agent_rss_mb=agent_rss)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await daemon.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200_000)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=512)
    ap.add_argument("--mode", choices=sorted(WORKERS), default="python")
    ap.add_argument("--database", default="sqlite",
                    help="sqlite (default), pg (a PostgreSQL started here) or a postgresql:// URL")
    args = ap.parse_args()

    with ExitStack() as stack:
        database = "sqlite" if args.database == "sqlite" else (
            own_postgres(stack) if args.database == "pg" else args.database)
        r = await run_dispatch(tasks=args.tasks, agents=args.agents, slots=args.slots, prefetch=args.prefetch,
                               mode=args.mode, database=database)
    print(f"mode={args.mode} tasks={args.tasks} agents={args.agents} slots={args.slots} prefetch={args.prefetch}"
          f" database={'sqlite' if database == 'sqlite' else 'postgresql'}")
    print(f"upload+queue: {r.queue_s:.2f} s ({args.tasks / r.queue_s:,.0f} tasks/s)")
    print(f"dispatched end to end: {r.succeeded} in {r.dispatch_s:.2f} s = {r.tasks_per_s:,.0f} tasks/s"
          f" (upload start to last result: {r.succeeded / r.total_s:,.0f} tasks/s)")
    print(f"lease round trip: p50 {percentile(r.lease_rtts_s, 50) * 1000:.2f} ms,"
          f" p99 {percentile(r.lease_rtts_s, 99) * 1000:.2f} ms ({len(r.lease_rtts_s)} samples)")
    print(f"daemon: peak RSS {r.daemon_rss_mb:.0f} MiB, CPU {r.daemon_cpu_s:.1f} s"
          f" ({r.daemon_cpu_s / r.total_s * 100:.0f}% of a core)")
    print("agents: peak RSS " + ", ".join(f"{m:.0f} MiB" for m in r.agent_rss_mb))
    if r.succeeded != args.tasks:
        print(f"ERROR: {args.tasks - r.succeeded} tasks did not succeed", file=sys.stderr)
        sys.exit(1)








def own_postgres(stack: ExitStack) -> str:
    """A PostgreSQL server for this run only, stopped at the end: a fresh database's URL."""
    sys.path.insert(0, str(ROOT))
    import psycopg

    from tests.fakes.postgres import PostgresServer, unavailable

    reason = unavailable()
    if reason is not None:
        sys.exit(f"--database pg: {reason}")
    server = PostgresServer(fsync=True)  # durable commits, as SQLite's synchronous=FULL
    stack.callback(server.cleanup)
    server.start()
    name = f"bench{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server.dsn(name)


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
