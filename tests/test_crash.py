"""kill -9 the daemon again and again during a run; every task ends with exactly one result and
every agent comes back.

CI: 50,000 tasks, ten kills (one of them in the middle of the task upload). Soak (--soak): 200,000
tasks, thirty kills. The kills land at random moments: a random point of progress plus a random
delay, so they fall inside dispatch rounds, commits, uploads and reconnects alike.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cloudtaskd import queue
from tests.conftest import wait_for
from tests.procs import DaemonProcess, bundle, free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "async def run(task_id, data):\n    return data['n']\n",
}
AGENTS = 2


async def connected_agents(daemon: DaemonProcess) -> int:
    text = await daemon.get("/metrics")
    m = re.search(r"^cloudtask_agents_connected (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


async def running_ids(daemon: DaemonProcess) -> set[str]:
    return {i["id"] for i in (await daemon.get("/v1/instances"))["instances"] if i["state"] == "running"}


async def upload_killed_midway(daemon: DaemonProcess, job_id: int, body: bytes, rng: random.Random) -> None:
    """Stream the task file and SIGKILL the daemon part-way through it."""
    cut = rng.randrange(len(body) // 4, len(body) * 3 // 4)

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            if i >= cut:
                daemon.kill()
                await asyncio.sleep(0.05)
            yield body[i:i + 64 * 1024]

    try:
        await daemon.post(f"/v1/jobs/{job_id}/tasks", data=stream())
    except (aiohttp.ClientError, OSError, RuntimeError):
        pass  # the connection died with the daemon: the client sees an error and retries
    else:
        raise AssertionError("the upload finished although the daemon was killed during it")


@pytest.mark.timeout(1800)
async def test_sigkill_during_run_loses_nothing_and_records_once(tmp_path: Path, soak: bool) -> None:
    n_tasks, kills = (200_000, 30) if soak else (50_000, 10)
    rng = random.Random(7)
    config = {
        "agents": {"listen_port": free_port(), "lease_ttl_s": 10},
        "providers": {"local": {"max_instances": AGENTS, "cpus": 4}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 60},
        "queue": {"retry_backoff_s": 0.1},
    }
    daemon = DaemonProcess(tmp_path, config)
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "crash", "worker": worker["digest"], "max_attempts": 20})
        body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(n_tasks)).encode()

        # Kill 1: in the middle of the upload. Nothing of it may be queued; the client uploads again.
        await upload_killed_midway(daemon, job["id"], body, rng)
        await daemon.start()
        j = await daemon.get(f"/v1/jobs/{job['id']}")
        assert sum(j["counts"].values()) == 0, f"a half upload left tasks behind: {j['counts']}"
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))

        async def all_agents_up() -> bool:
            return len(await running_ids(daemon)) == AGENTS and await connected_agents(daemon) == AGENTS
        await wait_for(all_agents_up, timeout=60, message=f"{AGENTS} agents connected")

        marks = sorted(rng.sample(range(n_tasks // 20, n_tasks * 9 // 10), kills - 1))
        for k, mark in enumerate(marks, start=2):
            async def reached(mark: int = mark) -> bool:
                j = await daemon.get(f"/v1/jobs/{job['id']}")
                return bool(j["counts"]["succeeded"] >= mark or j["done"])
            await wait_for(reached, timeout=120, message=f"{mark} tasks done")
            await asyncio.sleep(rng.uniform(0, 0.3))  # anywhere in a round, a commit, a reconnect
            before = await running_ids(daemon)
            daemon.kill()
            await daemon.start()

            # Every agent back: the same instances, adopted and connected again (none replaced).
            async def back(before: set[str] = before) -> bool:
                return await running_ids(daemon) == before and await connected_agents(daemon) == len(before)
            await wait_for(back, timeout=60, message=f"the agents {sorted(before)} back after kill {k}")

        async def done() -> bool:
            return bool((await daemon.get(f"/v1/jobs/{job['id']}"))["done"])
        await wait_for(done, timeout=300, message="job done after the crashes")
        text = await daemon.get(f"/v1/jobs/{job['id']}/results")
        results = [json.loads(line) for line in text.splitlines()]
    finally:
        await daemon.stop()

    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == n_tasks, "a task is missing or reported twice"
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in results)
    db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
    try:
        once = db.execute(
            "SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
            " GROUP BY task_id HAVING count(*) != 1)").fetchone()[0]
        assert once == 0, "some task has more than one recorded result"
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == n_tasks
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == n_tasks
        assert queue.check_counters(db) == []
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # Agents outlived each crash and were adopted, not leaked: nothing is left running.
        assert db.execute("SELECT count(*) FROM instances WHERE state != 'stopped'").fetchone()[0] == 0
    finally:
        db.close()
    assert not list((daemon.state_dir / "local").glob("*.json")), "an agent process was left running"
