"""A standing queue end to end (issue 17, the two-node spec's API): a job created open takes single
tasks over HTTP, each answered with its id and run by a real agent on the local provider; it stays
active when idle, and finishes once closed. `results --top N` (the spec's pullCompleted) answers the
N newest finished. Real daemon, real SQLite, real agent processes, the real command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.ctl.progress import format_progress
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, ctl, make_config, wait_for
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import bundle


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    d = Daemon(make_config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def open_job(api: UnixApi) -> int:
    status, body = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
    assert status == 200, body
    status, body = await api.request("POST", "/v1/jobs", json={"name": "queue", "worker": body["digest"],
                                                                "open": True})
    assert status == 201 and body["open"] is True, body
    return int(body["id"])


async def get_job(api: UnixApi, job_id: int) -> dict[str, Any]:
    status, job = await api.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200, job
    return dict(job)


async def results(api: UnixApi, job_id: int, query: str = "") -> list[dict[str, Any]]:
    _, text = await api.request("GET", f"/v1/jobs/{job_id}/results{query}")
    return [json.loads(line) for line in text.splitlines()]


async def test_an_open_job_runs_single_tasks_stays_open_when_idle_and_finishes_once_closed(daemon: Any) -> None:
    d, api = daemon
    job_id = await open_job(api)
    for n in range(4):
        # One task at a time, each answered with its id, run, and its result read back before the next.
        status, answer = await api.request("POST", f"/v1/jobs/{job_id}/tasks", json={"data": {"n": n}})
        assert status == 201, answer
        task_id = answer["id"]
        assert answer["key"] == str(task_id)  # no id given: the task is named by its number

        async def its_result(task_id: int = task_id) -> dict[str, Any] | None:
            found = [r for r in await results(api, job_id) if r["task"] == task_id]
            return found[0] if found else None

        result = await wait_for(its_result, message=f"task {task_id}'s result")
        assert result["status"] == "succeeded" and result["result"] == {"double": 2 * n}
        # Every task it has is finished, and the job stays open for more: not done, no outcome.
        job = await get_job(api, job_id)
        assert (job["state"], job["done"], job["outcome"], job["open"]) == ("active", False, None, True)
        assert job["counts"]["succeeded"] == n + 1 == job["counts"]["total"]
    assert "open: waiting for tasks" in format_progress(job, 140)
    status, out, _ = await ctl(d, "status", str(job_id))
    assert status == 0 and f"job {job_id} 'queue': open" in out and "open: waiting for tasks" in out

    # The command line's enqueue: a task with an id, and copies of one.
    status, out, err = await ctl(d, "enqueue", str(job_id), "--data", '{"id": "k", "data": {"n": 10}}')
    assert status == 0, err
    k_id = int(out.strip())
    status, out, err = await ctl(d, "enqueue", str(job_id), "--data", '{"id": "r", "data": {"n": 20}}',
                                 "--copies", "3")
    assert status == 0, err
    copies = [int(line) for line in out.split()]
    assert len(copies) == 3 and k_id not in copies
    # A bad task is refused naming the flag the user typed, and queues nothing.
    for data, named in (("nonsense", "--data: not valid JSON"), ('{"n": 1}', "--data: unknown key 'n'")):
        status, out, err = await ctl(d, "enqueue", str(job_id), "--data", data)
        assert status == 2 and named in err and not out, (data, status, err)

    async def all_eight() -> list[dict[str, Any]] | None:
        got = await results(api, job_id)
        return got if len(got) == 8 else None

    by_key = {r["id"]: r for r in await wait_for(all_eight, message="all 8 results")}
    assert by_key["k"]["task"] == k_id and by_key["k"]["result"] == {"double": 20}
    assert {by_key[f"r-{i}"]["task"] for i in (1, 2, 3)} == set(copies)
    assert not (await get_job(api, job_id))["done"]
    # Every task finished, but open: not over, so not deleted (nor purged by retention).
    status, body = await api.request("DELETE", f"/v1/jobs/{job_id}")
    assert status == 409 and "close it first" in body["error"]["message"], body

    # A follower of the results stays on while the job is open, and ends once it is closed and done.
    follower = asyncio.create_task(results(api, job_id, "?follow=1"))

    async def following() -> bool:
        return d.api.feeds.followers >= 1

    await wait_for(following, message="the follower connected")
    assert not follower.done()
    status, out, err = await ctl(d, "close", str(job_id))
    assert status == 0, err
    job = await get_job(api, job_id)
    assert (job["state"], job["done"], job["outcome"], job["open"]) == ("active", True, "succeeded", False)
    assert len(await asyncio.wait_for(follower, 20)) == 8
    # Closed: it takes no more.
    status, answer = await api.request("POST", f"/v1/jobs/{job_id}/tasks", json={"data": {"n": 1}})
    assert status == 400 and "closed" in answer["error"]["message"], answer
    # `watch` ends at once on the finished job, as on any other.
    status, _, _ = await ctl(d, "watch", str(job_id))
    assert status == 0


async def test_top_n_is_the_n_newest_finished_by_finish_time(daemon: Any) -> None:
    d, api = daemon
    job_id = await open_job(api)
    # The slow task has the lowest number but finishes last: newest by finish time, not by number.
    status, slow = await api.request("POST", f"/v1/jobs/{job_id}/tasks",
                                     json={"id": "slow", "data": {"n": 0, "sleep": 1.5}})
    assert status == 201, slow
    for n in range(1, 6):
        status, answer = await api.request("POST", f"/v1/jobs/{job_id}/tasks", json={"id": f"t{n}", "data": {"n": n}})
        assert status == 201, answer

    async def six() -> list[dict[str, Any]] | None:
        got = await results(api, job_id)
        return got if len(got) == 6 else None

    everything = await wait_for(six, message="all 6 results")
    newest = sorted(everything, key=lambda r: (r["finished_at"], r["task"]), reverse=True)
    top = await results(api, job_id, "?top=3")
    assert [r["id"] for r in top] == [r["id"] for r in newest[:3]]
    assert top[0]["id"] == "slow" and top[0]["task"] == slow["id"] == min(r["task"] for r in everything)
    # The command line's results --top, the spec's pullCompleted.
    status, out, err = await ctl(d, "results", str(job_id), "--top", "2")
    assert status == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [r["id"] for r in newest[:2]]
