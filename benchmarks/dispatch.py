"""Dispatch throughput end to end: N no-op tasks through a real cloudtaskd process and real agent
processes over the websocket, with durable state (WAL, synchronous=FULL).

    python benchmarks/dispatch.py [--tasks 200000] [--agents 2] [--slots 64] [--mode python|stream]
                                  [--database sqlite|pg|postgresql://...] [--replicas 1]

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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, DaemonProcess, bundle, cpu_seconds, peak_rss_mb, percentile

from tests.procs import free_port, share_ca

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
    # lease_rtts_s without each agent's first: the credit it sends on connecting, before the upload
    # queued anything, waits for the upload, not for a round (it is the p99 of 2 agents' ~100 samples)
    later_rtts_s: list[float] = field(default_factory=list)

    @property
    def tasks_per_s(self) -> float:
        return self.succeeded / self.dispatch_s


@dataclass(frozen=True)
class AgentProc:
    proc: subprocess.Popen[bytes]
    replica: int  # the daemon it was registered on, and dials first
    stats: Path  # --stats-file: lease_rtts_s at its exit
    log: Path  # its stdout: JSON lines (agent_connected with its url)


async def start_replicas(database: str, replicas: int = 1, *, log_level: str = "warning",
                         lead_first: bool = False) -> list[DaemonProcess]:
    """`replicas` daemons on one database (more than one needs PostgreSQL), each with its own temp
    state dir and agent port, every agent URL in `agents.urls`: the first is started first (with
    `lead_first`, until it leads the orchestrator: needs log_level info), then the others with its
    TLS CA copied in. No instances are launched (local max_instances 0): agents are started by hand."""
    if replicas > 1 and database == "sqlite":
        raise ValueError("replicas > 1 needs a postgresql:// database: SQLite holds one daemon a state directory")
    ports = [free_port() for _ in range(replicas)]
    urls = [f"wss://127.0.0.1:{p}/v1/agent" for p in ports]  # as agent_url reads them back
    daemons = [DaemonProcess({"providers": {"local": {"max_instances": 0}}, "database": database,
                              "log_level": log_level,
                              "agents": {"lease_ttl_s": 120, "listen_port": port, "urls": urls}})
               for port in ports]
    try:
        await daemons[0].start()
        if lead_first:
            await until(lambda: logged_at(daemons[0].log_path, "leader_work_started"), 30, "the first replica leading")
        for d in daemons[1:]:
            share_ca(daemons[0], d)
            await d.start()
    except BaseException:
        for d in daemons:
            await d.stop()
        raise
    return daemons


def agent_url(daemon: DaemonProcess) -> str:
    """The agent URL a replica from start_replicas listens at."""
    port = yaml.safe_load(daemon.config_path.read_text())["agents"]["listen_port"]
    return f"wss://127.0.0.1:{port}/v1/agent"


async def start_agents(daemons: list[DaemonProcess], digest: str, *, agents: int, slots: int,
                       prefetch: int) -> list[AgentProc]:
    """Agent processes spread evenly: agent a registered on replica a % len(daemons), given that
    replica's URL list (its own first, then the others: docs/replicas.md)."""
    out = []
    for a in range(agents):
        r = a % len(daemons)
        daemon = daemons[r]
        inst = await daemon.post("/v1/instances", json={"worker": digest, "slots": slots})
        workdir = Path(daemon.tmp.name) / f"agent{a}"
        workdir.mkdir()
        (workdir / "ca.pem").write_text(inst["ca_cert"])
        env = {**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)}
        with (workdir / "agent.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.main", *(arg for url in inst["urls"] for arg in ("--url", url)),
                 "--instance", inst["id"], "--worker-dir", str(daemon.state_dir / "workers" / digest),
                 "--slots", str(slots), "--prefetch", str(prefetch), "--stats-file", str(workdir / "stats.json"),
                 "--ca-file", str(workdir / "ca.pem")],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            )
        out.append(AgentProc(proc, r, workdir / "stats.json", workdir / "agent.log"))
    return out


def stop_agents(agents: list[AgentProc]) -> tuple[list[float], list[float]]:
    """SIGTERM each agent and gather the lease round trips its stats file holds: all of them, and all
    but each agent's first (DispatchRun.later_rtts_s)."""
    for a in agents:
        a.proc.send_signal(signal.SIGTERM)
    rtts: list[float] = []
    later: list[float] = []
    for a in agents:
        a.proc.wait(timeout=60)
        own = json.loads(a.stats.read_text())["lease_rtts_s"]
        rtts += own
        later += own[1:]
    return rtts, later


def kill_agents(agents: list[AgentProc]) -> None:
    for a in agents:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


async def upload_worker(daemons: list[DaemonProcess], mode: str) -> str:
    """The worker bundle uploaded to every replica (each keeps bundles in its own state dir)."""
    digest = ""
    for d in daemons:
        digest = (await d.post("/v1/workers", data=bundle(WORKERS[mode])))["digest"]
    return digest


def write_tasks(path: Path, tasks: int) -> Path:
    with path.open("w") as f:
        for i in range(tasks):
            f.write(f'{{"id":"t{i}","data":{{"i":{i}}}}}\n')
    return path


async def run_dispatch(*, tasks: int, agents: int, slots: int, prefetch: int = 512,
                       mode: str = "python", database: str = "sqlite", replicas: int = 1,
                       on_queued: Callable[[], None] | None = None) -> DispatchRun:
    """Run `tasks` no-op tasks through fresh daemons (their own temp state dirs) and `agents` agent
    processes; `database`: sqlite (in the state dir) or a postgresql:// URL; `replicas` > 1: that
    many daemons on that database, the agents spread evenly over them (benchmarks/replicas.py).
    daemon_cpu_s sums the replicas; daemon_rss_mb is the largest. `on_queued` is called once the
    upload is queued, as the dispatch phase starts (benchmarks/pg_statements.py resets its counts)."""
    daemons = await start_replicas(database, replicas)
    procs: list[AgentProc] = []
    try:
        digest = await upload_worker(daemons, mode)
        first = daemons[0]
        job = await first.post("/v1/jobs", json={"name": "bench", "worker": digest})
        tasks_file = write_tasks(Path(first.tmp.name) / "tasks.jsonl", tasks)
        procs = await start_agents(daemons, digest, agents=agents, slots=slots, prefetch=prefetch)
        pids = [d.proc.pid for d in daemons if d.proc is not None]
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        with tasks_file.open("rb") as f:
            t0 = time.monotonic()
            await first.post(f"/v1/jobs/{job['id']}/tasks", data=f)
        t_queued = time.monotonic()
        if on_queued is not None:
            on_queued()
        while True:
            j = await first.get(f"/v1/jobs/{job['id']}")
            if j["done"]:
                break
            await asyncio.sleep(0.05)
        t_end = time.monotonic()
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
        daemon_rss = max(peak_rss_mb(pid) for pid in pids)
        agent_rss = [peak_rss_mb(a.proc.pid) for a in procs]
        rtts, later = stop_agents(procs)
        return DispatchRun(tasks=tasks, succeeded=j["counts"]["succeeded"], queue_s=t_queued - t0,
                           dispatch_s=t_end - t_queued, total_s=t_end - t0, lease_rtts_s=rtts,
                           daemon_cpu_s=cpu, daemon_rss_mb=daemon_rss, agent_rss_mb=agent_rss,
                           later_rtts_s=later)
    finally:
        kill_agents(procs)
        for d in daemons:
            await d.stop()


def logged_at(path: Path, event: str) -> list[float]:
    """Wall-clock times (s) of a daemon's or agent's log lines for `event`: the daemon's ISO
    `timestamp`, the agent's `ts`."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if not isinstance(e, dict) or e.get("event") != event:
            continue
        if "ts" in e:
            out.append(float(e["ts"]))
        elif "timestamp" in e:
            out.append(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp())
    return out


async def until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Poll `check` (sync or async) until it answers something truthy; exit naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200_000)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=512)
    ap.add_argument("--mode", choices=sorted(WORKERS), default="python")
    ap.add_argument("--database", default="sqlite",
                    help="sqlite (default), pg (a PostgreSQL started here) or a postgresql:// URL")
    ap.add_argument("--replicas", type=int, default=1,
                    help="daemons on the one PostgreSQL database, the agents spread over them (needs --database pg"
                         " or a URL; benchmarks/replicas.py compares 1 and 2)")
    args = ap.parse_args()

    with ExitStack() as stack:
        database = "sqlite" if args.database == "sqlite" else (
            own_postgres(stack) if args.database == "pg" else args.database)
        r = await run_dispatch(tasks=args.tasks, agents=args.agents, slots=args.slots, prefetch=args.prefetch,
                               mode=args.mode, database=database, replicas=args.replicas)
    print(f"mode={args.mode} tasks={args.tasks} agents={args.agents} slots={args.slots} prefetch={args.prefetch}"
          f" database={'sqlite' if database == 'sqlite' else 'postgresql'} replicas={args.replicas}")
    print(f"upload+queue: {r.queue_s:.2f} s ({args.tasks / r.queue_s:,.0f} tasks/s)")
    print(f"dispatched end to end: {r.succeeded} in {r.dispatch_s:.2f} s = {r.tasks_per_s:,.0f} tasks/s"
          f" (upload start to last result: {r.succeeded / r.total_s:,.0f} tasks/s)")
    print(f"lease round trip: p50 {percentile(r.lease_rtts_s, 50) * 1000:.2f} ms,"
          f" p99 {percentile(r.lease_rtts_s, 99) * 1000:.2f} ms ({len(r.lease_rtts_s)} samples)")
    print(f"  without each agent's first (its credit at connect, before the upload queued anything):"
          f" p50 {percentile(r.later_rtts_s, 50) * 1000:.2f} ms, p99 {percentile(r.later_rtts_s, 99) * 1000:.2f} ms")
    print(f"daemon: peak RSS {r.daemon_rss_mb:.0f} MiB, CPU {r.daemon_cpu_s:.1f} s"
          f" ({r.daemon_cpu_s / r.total_s * 100:.0f}% of a core)")
    print("agents: peak RSS " + ", ".join(f"{m:.0f} MiB" for m in r.agent_rss_mb))
    if r.succeeded != args.tasks:
        print(f"ERROR: {args.tasks - r.succeeded} tasks did not succeed", file=sys.stderr)
        sys.exit(1)


def own_postgres(stack: ExitStack) -> str:
    """A PostgreSQL server for this run only, stopped at the end: a fresh database's URL."""
    return new_database(postgres_server(stack))


def postgres_server(stack: ExitStack) -> Any:
    """A PostgreSQL server (tests.fakes.postgres.PostgresServer) started for this session, durable
    (fsync on, as SQLite's synchronous=FULL), stopped and removed when `stack` closes."""
    from tests.fakes.postgres import PostgresServer, unavailable

    reason = unavailable()
    if reason is not None:
        sys.exit(f"--database pg: {reason}")
    server = PostgresServer(fsync=True)
    stack.callback(server.cleanup)
    server.start()
    return server


def new_database(server: Any) -> str:
    """A fresh database on `server`: each run starts on empty tables."""
    import psycopg

    name = f"bench{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return str(server.dsn(name))


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
