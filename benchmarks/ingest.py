"""Ingest throughput: submit N tasks from a JSON Lines file to a real cloudtaskd process.

    python benchmarks/ingest.py [--tasks 1000000] [--database sqlite|pg|postgresql://...]

Prints tasks/s from the first byte sent to the commit that makes them all visible, and the
daemon's peak RSS while ingesting and its RSS with all of them queued.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from contextlib import ExitStack
from pathlib import Path

from _common import ROOT, DaemonProcess, bundle, peak_rss_mb
from dispatch import own_postgres

WORKER = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--database", default="sqlite",
                    help="sqlite (default), pg (a PostgreSQL started here, durable) or a postgresql:// URL")
    args = ap.parse_args()
    with ExitStack() as stack:
        database = "sqlite" if args.database == "sqlite" else (
            own_postgres(stack) if args.database == "pg" else args.database)
        await ingest(args.tasks, database)


async def ingest(tasks: int, database: str) -> None:
    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}}, "database": database})
    await daemon.start()
    assert daemon.proc is not None
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "ingest", "worker": worker["digest"]})
        path = Path(daemon.tmp.name) / "tasks.jsonl"
        with path.open("w") as f:
            for i in range(tasks):
                f.write(f'{{"id": "task-{i}", "data": {{"n": {i}, "payload": "abcdefghijklmnop"}}}}\n')
        size_mb = path.stat().st_size / 1e6
        rss_before = rss_mb(daemon.proc.pid)
        with path.open("rb") as f:
            t0 = time.monotonic()
            body = await daemon.post(f"/v1/jobs/{job['id']}/tasks?source=tasks.jsonl", data=f)
            elapsed = time.monotonic() - t0
        j = await daemon.get(f"/v1/jobs/{job['id']}")
        assert body["accepted"] == tasks == j["counts"]["queued"], (body, j["counts"])
        db = "sqlite" if database == "sqlite" else "postgresql"
        print(f"ingested {tasks:,} tasks into {db} ({size_mb:.0f} MB JSON Lines) in {elapsed:.2f} s"
              f" = {tasks / elapsed:,.0f} tasks/s")
        print(f"daemon RSS: {rss_before:.0f} MiB before, {rss_mb(daemon.proc.pid):.0f} MiB with all queued,"
              f" peak {peak_rss_mb(daemon.proc.pid):.0f} MiB")
    finally:
        await daemon.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
