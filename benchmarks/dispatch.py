"""Dispatch throughput end to end: N no-op tasks through a real cloudtaskd process and real agent
processes over the websocket, with durable state (WAL, synchronous=FULL).

    python benchmarks/dispatch.py [--tasks 200000] [--agents 2] [--slots 64] [--mode python|stream]
                                  [--database sqlite|pg|postgresql://USER:PASSWORD@HOST:PORT/DBNAME]

--database pg starts a PostgreSQL of its own (tests/fakes/postgres.py: Debian's postgresql package,
127.0.0.1, a free port, a temp dir, fsync and synchronous_commit on) and runs the daemon on a fresh database there.

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
        await run(args, database)


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


async def run(args: argparse.Namespace, database: str) -> None:
    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}}, "agents": {"lease_ttl_s": 120},
                            "database": database})
    await daemon.start()
    assert daemon.proc is not None
    agents: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKERS[args.mode]))
        job = await daemon.post("/v1/jobs", json={"name": "bench", "worker": worker["digest"]})
        tasks_file = Path(daemon.tmp.name) / "tasks.jsonl"
        with tasks_file.open("w") as f:
            for i in range(args.tasks):
                f.write(f'{{"id":"t{i}","data":{{"i":{i}}}}}\n')
        worker_dir = daemon.state_dir / "workers" / worker["digest"]
        for a in range(args.agents):
            inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": args.slots})
            stats = Path(daemon.tmp.name) / f"agent{a}.json"
            ca = Path(daemon.tmp.name) / "ca.pem"
            ca.write_text(inst["ca_cert"])
            env = {**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.main", "--url", inst["url"], "--instance", inst["id"],
                 "--worker-dir", str(worker_dir), "--slots", str(args.slots), "--prefetch", str(args.prefetch),
                 "--stats-file", str(stats), "--ca-file", str(ca)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            agents.append((proc, stats))
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
        agent_rss = [peak_rss_mb(p.pid) for p, _ in agents]
        for p, _ in agents:
            p.send_signal(signal.SIGTERM)
        rtts: list[float] = []
        for p, stats in agents:
            p.wait(timeout=60)
            rtts += json.loads(stats.read_text())["lease_rtts_s"]
        succeeded = j["counts"]["succeeded"]
        dispatch_s = t_end - t_queued
        print(f"mode={args.mode} tasks={args.tasks} agents={args.agents} slots={args.slots} prefetch={args.prefetch}"
              f" database={'sqlite' if database == 'sqlite' else 'postgresql'}")
        print(f"upload+queue: {t_queued - t0:.2f} s ({args.tasks / (t_queued - t0):,.0f} tasks/s)")
        print(f"dispatched end to end: {succeeded} in {dispatch_s:.2f} s = {succeeded / dispatch_s:,.0f} tasks/s"
              f" (upload start to last result: {succeeded / (t_end - t0):,.0f} tasks/s)")
        print(f"lease round trip: p50 {percentile(rtts, 50) * 1000:.2f} ms, p99 {percentile(rtts, 99) * 1000:.2f} ms"
              f" ({len(rtts)} samples)")
        print(f"daemon: peak RSS {daemon_rss:.0f} MiB, CPU {cpu:.1f} s ({cpu / (t_end - t0) * 100:.0f}% of a core)")
        print("agents: peak RSS " + ", ".join(f"{r:.0f} MiB" for r in agent_rss))
        if succeeded != args.tasks:
            print(f"ERROR: {args.tasks - succeeded} tasks did not succeed", file=sys.stderr)
            sys.exit(1)
    finally:
        for p, _ in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
        await daemon.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
