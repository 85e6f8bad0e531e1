"""Cancel, then delete, a big job on a real cloudtaskd process while another job's agents work (issue 15).

    python benchmarks/big_cancel.py [--tasks 1000000] [--other-tasks 1000000] [--agents 1] [--slots 64]
                                    [--chunk-rows 10000] [--same-worker]

The big job's tasks are uploaded through the API (as `cloudtaskctl submit` does) and stay queued: no
agent serves its worker. Another job, of another worker (--same-worker: of the same one, so both
share a pool and the lease query must skip the cancelled job's queued tasks), is worked by real
agent processes throughout (with --same-worker the big job's tasks come first, priority 1: the agents
work on them until the cancel, and the lease query then skips its queued tasks, the worst case for it).
Prints the cancel's time (the API's answer, and until the last chunk),
the daemon's peak RSS during the cancel (VmRSS of its PID sampled every 20 ms, and VmHWM since its
start), the other job's tasks/s before and during the cancel, and the database and WAL sizes before
the cancel, after it, and after `DELETE /v1/jobs/ID` once the housekeeper has purged and compacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, DaemonProcess, bundle, peak_rss_mb

NOOP = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}
OTHER = {**NOOP, "other.txt": "another worker: another pool\n"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sizes(state: Path) -> str:
    db = state / "cloudtask.db"
    wal = state / "cloudtask.db-wal"
    main = db.stat().st_size / 2**20
    w = wal.stat().st_size / 2**20 if wal.exists() else 0.0
    return f"db {main:.1f} MiB + wal {w:.1f} MiB = {main + w:.1f} MiB"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--other-tasks", type=int, default=1_000_000)
    ap.add_argument("--agents", type=int, default=1)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=10_000)
    ap.add_argument("--same-worker", action="store_true")
    args = ap.parse_args()

    daemon = DaemonProcess({"providers": {"local": {"max_instances": 0}}, "agents": {"lease_ttl_s": 120},
                            "retention": {"chunk_rows": args.chunk_rows}})
    await daemon.start(timeout_s=60)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    agents: list[subprocess.Popen[bytes]] = []
    tmp = Path(daemon.tmp.name)
    try:
        big_worker = await daemon.post("/v1/workers", data=bundle(NOOP))
        other_worker = big_worker if args.same_worker else await daemon.post("/v1/workers", data=bundle(OTHER))
        big = await daemon.post("/v1/jobs", json={"name": "big", "worker": big_worker["digest"]})
        other = await daemon.post("/v1/jobs", json={"name": "other", "worker": other_worker["digest"]})
        for job, n, name in ((big, args.tasks, "big"), (other, args.other_tasks, "other")):
            path = tmp / f"{name}.jsonl"
            priority = ',"priority":1' if name == "big" and args.same_worker else ""
            with path.open("w") as f:
                for i in range(n):
                    f.write(f'{{"id":"{name}{i}","data":{{"i":{i}}}{priority}}}\n')
            t0 = time.monotonic()
            with path.open("rb") as f:
                await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=f)
            print(f"uploaded {n} tasks to job {job['id']} ({name}) in {time.monotonic() - t0:.1f} s")
            path.unlink()
        worker_dir = daemon.state_dir / "workers" / other_worker["digest"]
        ca = tmp / "ca.pem"
        for _ in range(args.agents):
            inst = await daemon.post("/v1/instances", json={"worker": other_worker["digest"], "slots": args.slots})
            ca.write_text(inst["ca_cert"])
            env = {**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)}
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "agent.main", "--url", inst["url"], "--instance", inst["id"],
                 "--worker-dir", str(worker_dir), "--slots", str(args.slots), "--ca-file", str(ca)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        async def succeeded() -> int:  # work done: the other job's (--same-worker: both jobs')
            n = int((await daemon.get(f"/v1/jobs/{other['id']}"))["counts"]["succeeded"])
            if args.same_worker:
                n += int((await daemon.get(f"/v1/jobs/{big['id']}"))["counts"]["succeeded"])
            return n

        while True:  # until the agents are up and working
            if await succeeded() >= 1000:
                break
            await asyncio.sleep(0.05)
        s0, t0 = await succeeded(), time.monotonic()
        await asyncio.sleep(3.0)
        before_rate = (await succeeded() - s0) / (time.monotonic() - t0)
        print(f"before the cancel: {sizes(daemon.state_dir)}; daemon RSS {rss_mb(pid):.0f} MiB"
              f" (peak since start {peak_rss_mb(pid):.0f} MiB); other job {before_rate:.0f} tasks/s")

        peak = [rss_mb(pid)]
        sampling = True

        async def sample() -> None:
            while sampling:
                peak.append(rss_mb(pid))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        s0, t0 = await succeeded(), time.monotonic()
        answer = await daemon.post(f"/v1/jobs/{big['id']}/cancel")
        s0 = await succeeded()  # the big job's tasks that finished before the cancel are not counted
        t_answer = time.monotonic() - t0
        busy_until, busy_done = t0, s0  # the other job's progress while it still had work
        while True:
            j = await daemon.get(f"/v1/jobs/{big['id']}")
            o = await daemon.get(f"/v1/jobs/{other['id']}")
            if not o["done"]:
                busy_until, busy_done = time.monotonic(), o["counts"]["succeeded"] + j["counts"]["succeeded"] * (
                    args.same_worker)
            if not j["cancelling"] and j["done"]:  # every task cancelled (or finished before the cancel)
                break
            await asyncio.sleep(0.02)
        t_cancel = time.monotonic() - t0
        during_rate = (busy_done - s0) / max(1e-9, busy_until - t0)
        if busy_until - t0 < t_cancel * 0.95:
            print(f"note: the other job ran out of work {busy_until - t0:.1f} s into the cancel; its rate is"
                  " measured over that part (give more --other-tasks)")
        sampling = False
        await sampler
        c = answer.get("cancelling") or {}
        print(f"cancel: answered in {t_answer * 1000:.0f} ms ({c.get('cancelled')} of {c.get('total')} cancelled"
              f" in the answer), all {j['counts']['cancelled']} cancelled after {t_cancel:.2f} s"
              f" ({j['counts']['cancelled'] / t_cancel:.0f} tasks/s)")
        print(f"during the cancel: daemon RSS peak {max(peak):.0f} MiB (sampled every 20 ms),"
              f" other job {during_rate:.0f} tasks/s ({during_rate / before_rate:.0%} of before)")
        print(f"after the cancel: {sizes(daemon.state_dir)}")
        for a in agents:
            a.terminate()
        for a in agents:
            a.wait()
        agents.clear()

        t0 = time.monotonic()
        deleted = await daemon.session.delete(f"http://cloudtaskd/v1/jobs/{big['id']}")  # type: ignore[union-attr]
        assert deleted.status == 200, await deleted.text()
        while True:
            events = await daemon.get("/v1/events?tail=20&kind=job_purged")
            if any(json.loads(e.get("detail") or "{}").get("job") == big["id"] for e in events["events"]):
                break
            await asyncio.sleep(0.1)
        t_purge = time.monotonic() - t0
        last, still = -1, 0
        while still < 15:  # compaction (incremental vacuum, then the WAL cut) has settled
            now = sum(p.stat().st_size for p in daemon.state_dir.glob("cloudtask.db*"))
            still = still + 1 if now == last else 0
            last = now
            await asyncio.sleep(0.2)
        print(f"after delete: rows purged in {t_purge:.1f} s, compacted after {time.monotonic() - t0:.1f} s:"
              f" {sizes(daemon.state_dir)}; daemon peak RSS since start {peak_rss_mb(pid):.0f} MiB")
    finally:
        for a in agents:
            a.terminate()
            a.wait()
        await daemon.stop()


if __name__ == "__main__":
    asyncio.run(main())
