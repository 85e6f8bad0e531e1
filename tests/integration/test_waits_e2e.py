"""A job of another worker at the instance limit: it says why it waits, and gets the place as soon as
the first worker's instance is idle, not after idle_timeout_s (real daemon, local provider, limit 1)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cloudtaskd.ctl.progress import format_progress
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, make_config, wait_for
from tests.integration.test_daemon_e2e import finished, jsonl, submit

IDLE_TIMEOUT_S = 600.0  # far beyond the test's deadlines: only the reclaim can free the place in time

# Worker X: a task that runs until the test lets it finish.
HELD_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": (
        "import asyncio, os\n"
        "async def run(task_id, data):\n"
        "    while not os.path.exists(data['until']):\n"
        "        await asyncio.sleep(0.02)\n"
        "    return 'released'\n"
    ),
}
# Worker Y: another bundle, so another pool; an instance runs one worker.
OTHER_WORKER = {
    "cloudtask.yaml": f"mode: command\ncommand: {sys.executable} w.py\n",
    "w.py": "import json,sys\nt=json.load(sys.stdin)\nprint(json.dumps(t['data']['n'] * 2))\n",
}


async def test_a_job_of_another_worker_says_why_it_waits_and_takes_the_idle_place_at_once(tmp_path: Path) -> None:
    d = Daemon(make_config(tmp_path, idle_timeout_s=IDLE_TIMEOUT_S), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        release = tmp_path / "release"
        job_a = await submit(api, HELD_WORKER, jsonl([{"id": "a", "data": {"until": str(release)}}]))

        async def leased(job_id: int) -> dict[str, Any] | None:
            _, job = await api.request("GET", f"/v1/jobs/{job_id}")
            return job if job["counts"]["leased"] else None

        await wait_for(lambda: leased(job_a), timeout=60, message="job A's task running")
        job_b = await submit(api, OTHER_WORKER, jsonl([{"id": f"b{i}", "data": {"n": i}} for i in range(5)]))

        # The one local place is job A's worker's, busy: B's answer says so, in the API, the
        # status page's row and the progress line `run`/`watch` draw.
        async def waiting_busy() -> dict[str, Any] | None:
            _, job = await api.request("GET", f"/v1/jobs/{job_b}")
            return job if "busy" in (job.get("waiting") or "") else None

        job = await wait_for(waiting_busy, message="job B waiting behind job A's busy instance")
        assert job["waiting"].startswith(f"waiting: instance limit 1 reached (local), held by job {job_a}'s worker")
        assert job["counts"]["leased"] == 0 and job["instances"] == 0
        assert "waiting: instance limit 1 reached (local)" in format_progress(job, 200)
        assert "ETA --" not in format_progress(job, 200)
        _, status = await api.request("GET", "/v1/status")
        row = next(j for j in status["jobs"] if j["id"] == job_b)
        assert row["waiting"] == job["waiting"]
        # Job A is running: nothing waits there, so its answer carries no reason.
        _, a = await api.request("GET", f"/v1/jobs/{job_a}")
        assert a["waiting"] is None

        # A finishes; its instance is idle with nothing queued for its worker, and B waits at the
        # limit: the instance is drained at once, and B runs long before idle_timeout_s.
        release.touch()
        await wait_for(lambda: finished(api, job_a), message="job A done")
        a_done = time.monotonic()
        seen: set[str] = set()

        async def b_done() -> dict[str, Any] | None:
            _, job = await api.request("GET", f"/v1/jobs/{job_b}")
            if job.get("waiting"):
                seen.add(job["waiting"])
            return job if job["done"] else None

        job = await wait_for(b_done, timeout=60, interval=0.02, message="job B done (its place reclaimed)")
        took_s = time.monotonic() - a_done
        assert job["counts"]["succeeded"] == 5 and job["waiting"] is None
        assert took_s < IDLE_TIMEOUT_S / 10, took_s
        # While it waited after A, the answer named the place being freed or the launch under way.
        assert seen and all(w.startswith("waiting: ") for w in seen), seen
        assert any("being drained" in w or "launching 1 instance (local)" in w for w in seen), seen
        print(f"job B done {took_s:.2f} s after job A (idle_timeout_s {IDLE_TIMEOUT_S:g}); reasons seen: {seen}")
    finally:
        await api.close()
        await d.stop()


async def test_an_idle_instance_of_a_cancelled_job_stops_after_idle_timeout(tmp_path: Path) -> None:
    """A pool no active job uses is still scaled down: its idle instance stops after idle_timeout_s,
    instead of running (and costing) until another job needs the place."""
    d = Daemon(make_config(tmp_path, idle_timeout_s=1.0), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        job = await submit(api, HELD_WORKER, jsonl([{"id": "a", "data": {"until": str(tmp_path / "never")}}]))

        async def running() -> list[dict[str, Any]] | None:
            _, body = await api.request("GET", "/v1/instances")
            live = [i for i in body["instances"] if i["state"] == "running"]
            return live or None

        await wait_for(running, timeout=60, message="the job's instance running")
        status, _ = await api.request("POST", f"/v1/jobs/{job}/cancel")
        assert status == 200

        async def all_stopped() -> bool:
            _, body = await api.request("GET", "/v1/instances?all=1")
            return bool(body["instances"]) and all(i["state"] == "stopped" for i in body["instances"])

        await wait_for(all_stopped, timeout=60, message="the cancelled job's idle instance stopped")
    finally:
        await api.close()
        await d.stop()
