"""A standing queue's enqueue rate (issue 17): single-task POSTs per second into an open job.

    python benchmarks/enqueue.py [--clients 8] [--duration 10] [--copies 1] [--rate-limit 1000000]

A real cloudtaskd process (durable state, the control socket) with an open job and no instance (the
tasks stay queued, so only the enqueue path is measured). --clients concurrent clients, each on its
own connection, POST one task object at a time (`Content-Type: application/json`, each with an id of
its own, so the duplicate-id check is exercised) back to back for --duration s; --copies N asks
for N copies per request. The API's rate limit is per unix uid (`api.rate_limit_per_s`, 100 by
default): every client here is the same uid, so it is raised to --rate-limit to measure the daemon,
not the limit. Printed: requests/s, tasks/s, latency p50/p99, and the job's queued count (every
answered task is there).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from _common import DaemonProcess, bundle, cpu_seconds, percentile

WORKER = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}


async def client(socket: str, job_id: int, n: int, stop_at: float, copies: int,
                 latencies: list[float]) -> int:
    answered = 0
    query = f"?copies={copies}" if copies > 1 else ""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket)) as http:
        i = 0
        while time.monotonic() < stop_at:
            body = {"id": f"c{n}-{i}", "data": {"n": i, "payload": "x" * 64}}
            t0 = time.monotonic()
            async with http.post(f"http://cloudtaskd/v1/jobs/{job_id}/tasks{query}", json=body) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"enqueue answered {resp.status}: {await resp.text()}")
            latencies.append(time.monotonic() - t0)
            answered += 1
            i += 1
    return answered


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--rate-limit", type=float, default=1e6)
    args = p.parse_args()
    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}},
                            "api": {"rate_limit_per_s": args.rate_limit}})
    await daemon.start()
    assert daemon.proc is not None
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "queue", "worker": worker["digest"], "open": True})
        latencies: list[float] = []
        cpu0 = cpu_seconds(daemon.proc.pid)
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        counts = await asyncio.gather(*(client(str(daemon.socket), job["id"], n, stop_at, args.copies,
                                               latencies) for n in range(args.clients)))
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(daemon.proc.pid) - cpu0
        requests = sum(counts)
        queued = (await daemon.get(f"/v1/jobs/{job['id']}"))["counts"]["queued"]
        print(f"clients={args.clients} copies={args.copies} duration={elapsed:.1f}s")
        print(f"enqueue: {requests / elapsed:,.0f} requests/s, {requests * args.copies / elapsed:,.0f} tasks/s;"
              f" latency p50 {percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms")
        print(f"daemon CPU {cpu / elapsed * 100:.0f}% of a core; queued {queued} of {requests * args.copies}"
              " answered")
        assert queued == requests * args.copies
    finally:
        await daemon.stop()


if __name__ == "__main__":
    asyncio.run(main())
