"""The lease round trip while a big upload commits: agents busy on a running job while a second job's
task file is uploaded to the same daemon.

    python benchmarks/upload_tail.py [--database pg|sqlite|postgresql://...] [--upload 1000000]
                                     [--running 200000] [--task-s 0.05] [--agents 2] [--slots 64]

Job 1 (`--running` tasks of `--task-s` each) is queued and leased first; once the agents have
results in, job 2's `--upload` tasks are posted, and the agents are stopped as that upload's answer
comes (its tasks then all queued), so their lease round trips are those of rounds run beside the
upload: staging, then the commit's chunks. Prints the upload's time and the round trips' p50, p99
and max (without each agent's first credit, which waits for job 1's upload).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from _common import ROOT, bundle, percentile
from dispatch import kill_agents, own_postgres, start_agents, start_replicas, stop_agents, write_tasks

SLEEPER = {"cloudtask.yaml": "mode: python\nfunction: sleeper:run\n",
           "sleeper.py": "import asyncio\nimport os\n\n\nasync def run(i, d):\n"
                         "    await asyncio.sleep(float(os.environ.get('BENCH_TASK_S', '0.05')))\n"}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", default="pg", help="pg (a PostgreSQL started here), sqlite or a postgresql:// URL")
    ap.add_argument("--upload", type=int, default=1_000_000, help="tasks of the second job, uploaded meanwhile")
    ap.add_argument("--running", type=int, default=200_000, help="tasks of the running job (enough to outlast it)")
    ap.add_argument("--task-s", type=float, default=0.05, help="each running task's sleep")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=512)
    args = ap.parse_args()
    os.environ["BENCH_TASK_S"] = str(args.task_s)  # the agents inherit it
    with ExitStack() as stack:
        database = "sqlite" if args.database == "sqlite" else (
            own_postgres(stack) if args.database == "pg" else args.database)
        (daemon,) = await start_replicas(database)
        agents = []
        try:
            digest = (await daemon.post("/v1/workers", data=bundle(SLEEPER)))["digest"]
            running = await daemon.post("/v1/jobs", json={"name": "running", "worker": digest})
            second = await daemon.post("/v1/jobs", json={"name": "upload", "worker": digest})
            tmp = Path(daemon.tmp.name)
            running_file = write_tasks(tmp / "running.jsonl", args.running)
            upload_file = write_tasks(tmp / "upload.jsonl", args.upload)
            agents = await start_agents([daemon], digest, agents=args.agents, slots=args.slots,
                                        prefetch=args.prefetch)
            with running_file.open("rb") as f:
                await daemon.post(f"/v1/jobs/{running['id']}/tasks", data=f)
            deadline = time.monotonic() + 60
            while (await daemon.get(f"/v1/jobs/{running['id']}"))["counts"]["succeeded"] < 1000:
                if time.monotonic() > deadline:
                    sys.exit("the running job had no 1,000 results in 60 s")
                await asyncio.sleep(0.1)
            with upload_file.open("rb") as f:
                t0 = time.monotonic()
                await daemon.post(f"/v1/jobs/{second['id']}/tasks", data=f)
                upload_s = time.monotonic() - t0
            j = await daemon.get(f"/v1/jobs/{running['id']}")
            _, later = stop_agents(agents)
            left = args.running - j["counts"]["succeeded"]
        finally:
            kill_agents(agents)
            await daemon.stop()
    db = "sqlite" if database == "sqlite" else "postgresql"
    print(f"database={db} upload={args.upload} running={args.running} task_s={args.task_s}"
          f" agents={args.agents} slots={args.slots} prefetch={args.prefetch}")
    print(f"upload of {args.upload:,} tasks while job 1 ran: {upload_s:.1f} s ({args.upload / upload_s:,.0f} tasks/s);"
          f" job 1 had {left:,} tasks left at its end" + ("" if left > 0 else " (WARNING: it ended first)"))
    print(f"lease round trip meanwhile ({len(later)} samples): p50 {percentile(later, 50) * 1000:.0f} ms,"
          f" p99 {percentile(later, 99) * 1000:.0f} ms, max {max(later, default=float('nan')) * 1000:.0f} ms")


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
