"""kill -9 the daemon again and again during a run; every task ends with exactly one result."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

from cloudtaskd import queue
from tests.conftest import wait_for
from tests.procs import DaemonProcess, bundle, free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(0.002)\n    return data['n']\n",
}
N_TASKS = 4000
KILLS = 4


async def test_sigkill_during_run_loses_nothing_and_records_once(tmp_path: Path) -> None:
    rng = random.Random(7)
    config = {
        "agents": {"listen_port": free_port(), "lease_ttl_s": 10},
        "providers": {"local": {"max_instances": 2, "cpus": 4}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 60},
        "queue": {"retry_backoff_s": 0.1},
    }
    daemon = DaemonProcess(tmp_path, config)
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "crash", "worker": worker["digest"], "max_attempts": 20})
        tasks = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(N_TASKS))
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=tasks.encode())

        progress_marks = sorted(rng.sample(range(N_TASKS // 10, N_TASKS * 8 // 10), KILLS))
        for mark in progress_marks:
            async def reached(mark: int = mark) -> bool:
                j = await daemon.get(f"/v1/jobs/{job['id']}")
                return bool(j["counts"]["succeeded"] >= mark or j["done"])
            await wait_for(reached, timeout=60, message=f"{mark} tasks done")
            daemon.kill()
            await daemon.start()

        async def done() -> bool:
            return bool((await daemon.get(f"/v1/jobs/{job['id']}"))["done"])
        await wait_for(done, timeout=120, message="job done after the crashes")
        text = await daemon.get(f"/v1/jobs/{job['id']}/results")
        results = [json.loads(line) for line in text.splitlines()]
    finally:
        await daemon.stop()

    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == N_TASKS, "a task is missing or reported twice"
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in results)
    db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
    try:
        once = db.execute(
            "SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
            " GROUP BY task_id HAVING count(*) != 1)").fetchone()[0]
        assert once == 0, "some task has more than one recorded result"
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == N_TASKS
        assert queue.check_counters(db) == []
        # Agents outlived each crash and were adopted, not leaked: nothing is left running.
        assert db.execute("SELECT count(*) FROM instances WHERE state != 'stopped'").fetchone()[0] == 0
    finally:
        db.close()
    assert not list((daemon.state_dir / "local").glob("*.json")), "an agent process was left running"


