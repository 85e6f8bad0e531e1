"""The control API under load against a running job (issue 13): does dispatch keep its rate?

    python benchmarks/api_load.py [--tasks 200000] [--agents 50] [--task-ms 100] [--followers 100]
                                  [--status-loops 100] [--duration 30]

A real cloudtaskd process (durable state, TLS agent channel, the default API rate limits) runs one big
job on --agents simulated agents (benchmarks/scale.py's simulator: the real protocol, tasks of
--task-ms +-50 %, --slots at once). Dispatch is measured twice for --duration s, from the job's own
counters read straight from the database (so the measurement adds no API load):
  1. with no API clients;
  2. with --followers `cloudtaskctl results --follow` and --status-loops status loops (each asks
     `GET /v1/jobs/{id}` or `GET /v1/status` back to back, alternately), all in a separate process
     with the real ApiClient and its retries, so their CPU is not the daemon's.
Printed: dispatch tasks/s in both and their ratio, the status calls' latency p50/p99 (retries included)
and how many failed, the results each follower received, and the daemon's peak RSS and CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, DaemonProcess, bundle, cpu_seconds, peak_rss_mb, percentile

WORKER = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}


# ---- the API clients (a process of their own) -------------------------------------------------------


async def clients_main(spec: dict[str, Any], out: Path) -> None:
    from cloudtaskd.ctl.client import ApiClient
    from cloudtaskd.ctl.commands import follow_results

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    latencies: list[float] = []
    errors: list[str] = []
    received = [0] * spec["followers"]

    async def follower(i: int) -> None:
        async with ApiClient(spec["socket"]) as api:
            def emit(result: dict[str, Any]) -> None:
                received[i] += 1
            try:
                await follow_results(api, spec["job"], emit)
            except Exception as exc:
                errors.append(f"follower: {type(exc).__name__}: {exc}")

    async def status_loop(i: int) -> None:
        async with ApiClient(spec["socket"]) as api:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    if i % 2:
                        await api.get_job(spec["job"])
                    else:
                        await api._call("GET", "/v1/status")
                except Exception as exc:
                    errors.append(f"status: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(1)  # as a shell loop would go on after a failed command
                latencies.append(time.monotonic() - t0)

    tasks = [asyncio.create_task(follower(i)) for i in range(spec["followers"])]
    tasks += [asyncio.create_task(status_loop(i)) for i in range(spec["status_loops"])]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.write_text(json.dumps({"latencies": latencies, "errors": errors, "received": received,
                               "rss_mb": peak_rss_mb(os.getpid()), "cpu_s": cpu_seconds(os.getpid())}))


# ---- the benchmark ------------------------------------------------------------------------------------


def succeeded(db_path: Path, job_id: int) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as db:
        return int(db.execute("SELECT n_succeeded FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


async def window(db_path: Path, job_id: int, pid: int, duration_s: float) -> tuple[float, float]:
    """(tasks/s, daemon CPU % of a core) over duration_s."""
    n0, c0, t0 = succeeded(db_path, job_id), cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(duration_s)
    n1, c1, t1 = succeeded(db_path, job_id), cpu_seconds(pid), time.monotonic()
    return (n1 - n0) / (t1 - t0), (c1 - c0) / (t1 - t0) * 100


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200_000)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--task-ms", type=float, default=100.0, help="how long a simulated task takes (+-50 %%)")
    ap.add_argument("--followers", type=int, default=100)
    ap.add_argument("--status-loops", type=int, default=100)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each phase is measured")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before each measurement")
    ap.add_argument("--clients-nice", type=int, default=10,
                    help="niceness of the clients' process: on this 2-core machine their JSON parsing would"
                         " otherwise take the CPU the daemon and the agents need (clients run elsewhere in life)")
    args = ap.parse_args()

    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}}, "agents": {"lease_ttl_s": 120}})
    await daemon.start()
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    db_path = daemon.state_dir / "cloudtask.db"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        insts = [await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": args.slots})
                 for _ in range(args.agents)]
        job = await daemon.post("/v1/jobs", json={"name": "api-load", "worker": worker["digest"]})
        tasks_file = Path(daemon.tmp.name) / "tasks.jsonl"
        with tasks_file.open("w") as f:
            for i in range(args.tasks):
                f.write(f'{{"id":"t{i}","data":{{"i":{i}}}}}\n')
        with tasks_file.open("rb") as f:
            await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=f)
        spec = Path(daemon.tmp.name) / "sim.json"
        spec.write_text(json.dumps({"slots": args.slots, "prefetch": args.prefetch, "task_ms": args.task_ms,
                                    "ca_cert": insts[0]["ca_cert"], "instances": insts}))
        sim_out = Path(daemon.tmp.name) / "sim.out.json"
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--simulate",
                                       str(spec), str(sim_out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}))
        await asyncio.sleep(args.warmup)
        quiet_rate, quiet_cpu = await window(db_path, job["id"], dpid, args.duration)
        quiet_rss = peak_rss_mb(dpid)

        cspec = Path(daemon.tmp.name) / "clients.json"
        cspec.write_text(json.dumps({"socket": str(daemon.socket), "job": job["id"], "followers": args.followers,
                                     "status_loops": args.status_loops}))
        clients_out = Path(daemon.tmp.name) / "clients.out.json"
        clients = subprocess.Popen(["nice", "-n", str(args.clients_nice), sys.executable, __file__, "--clients",
                                    str(cspec), str(clients_out)],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(clients)
        await asyncio.sleep(args.warmup)
        load_rate, load_cpu = await window(db_path, job["id"], dpid, args.duration)
        left = args.tasks - succeeded(db_path, job["id"])
        clients.send_signal(signal.SIGTERM)
        clients.wait(timeout=120)
        stats = json.loads(clients_out.read_text())
        alive = daemon.proc.poll() is None
        rss = peak_rss_mb(dpid)

        lat = stats["latencies"]
        errors = stats["errors"]
        print(f"agents={args.agents} x {args.slots} slots, tasks of {args.task_ms:g} ms +-50 %, {args.tasks:,} tasks;"
              f" {args.followers} followers + {args.status_loops} status loops; {args.duration:g} s per phase")
        print(f"dispatch, no API clients:   {quiet_rate:,.0f} tasks/s (daemon CPU {quiet_cpu:.0f}% of a core,"
              f" peak RSS {quiet_rss:.0f} MiB)")
        print(f"dispatch, {args.followers + args.status_loops} API clients: {load_rate:,.0f} tasks/s (daemon CPU"
              f" {load_cpu:.0f}% of a core)")
        print(f"ratio: {load_rate / quiet_rate if quiet_rate else float('nan'):.2f} (target >= 0.80)")
        print(f"status calls: {len(lat):,} in {args.duration + args.warmup:g} s,"
              f" latency p50 {percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms,"
              f" max {max(lat, default=0) * 1000:.0f} ms"
              f" (retries of 429/503 included)")
        rec = stats["received"]
        print(f"followers: results received min {min(rec, default=0):,} / max {max(rec, default=0):,};"
              f" tasks left in the job {left:,}")
        print(f"daemon: peak RSS {rss:.0f} MiB (target <= 250 MB), {'alive' if alive else 'DEAD'};"
              f" clients process {stats['rss_mb']:.0f} MiB, CPU {stats['cpu_s']:.1f} s")
        print(f"client errors: {len(errors)}")
        for e in sorted(set(errors))[:10]:
            print("  ", e[:300])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        await daemon.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--clients":
        asyncio.run(clients_main(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])))
    else:
        os.chdir(ROOT)
        asyncio.run(main())
