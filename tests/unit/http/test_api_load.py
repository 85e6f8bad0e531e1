"""The control API under load (issue 13): results followers fed from one read per job, resumable from
their cursor; API reads bounded by a gate that answers 503 + Retry-After rather than queueing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.core.store import Store
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import Busy
from cloudtaskd.http import feeds
from cloudtaskd.http.feeds import ReadGate
from tests.conftest import make_config, wait_for
from tests.procs import bundle

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(data['sleep'])\n"
               "    return data['n']\n",
}


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    d = Daemon(make_config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = ApiClient(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def submit(api: ApiClient, tmp_path: Path, sleeps: list[float]) -> int:
    worker = await api.upload_worker(bundle(WORKER))
    job = await api.create_job("load", worker["digest"])
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(f'{{"id": "t{i}", "data": {{"n": {i}, "sleep": {s}}}}}\n' for i, s in enumerate(sleeps)))
    await api.upload_tasks(job["id"], tasks)
    return int(job["id"])


async def raw_follow(api: ApiClient, job_id: int, cursor: int) -> list[dict[str, Any]]:
    return [r async for r in api._lines(f"/v1/jobs/{job_id}/results", {"follow": "1", "cursor": str(cursor)})]


async def test_follow_streams_each_result_once_in_finishing_order_and_resumes_from_a_cursor(
        daemon: Any, tmp_path: Path) -> None:
    _, api = daemon
    # Later ids finish first: a follower must still get every task once, as each finishes.
    sleeps = [0.8 - 0.05 * i for i in range(12)]
    job_id = await submit(api, tmp_path, sleeps)
    got = await asyncio.wait_for(raw_follow(api, job_id, 0), 60)  # ends by itself once the job is done
    assert sorted(r["task"] for r in got) == list(range(1, 13))
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in got)
    seqs = [r["seq"] for r in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finished_at = [r["finished_at"] for r in got]
    assert finished_at == sorted(finished_at)  # the order they finished in, not id order
    # Resumed from the 5th line's cursor: exactly the rest.
    rest = await asyncio.wait_for(raw_follow(api, job_id, seqs[4]), 30)
    assert [r["seq"] for r in rest] == seqs[5:]
    # The client's follower takes the cursor out of what it yields.
    mine = [r async for r in api.follow_results(job_id)]
    assert [r["task"] for r in mine] == [r["task"] for r in got] and "seq" not in mine[0]


async def test_followers_of_one_job_share_one_read(daemon: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, api = daemon
    calls = 0
    real = feeds.read_finished

    def counted(*args: Any, **kw: Any) -> feeds.Page:
        nonlocal calls
        calls += 1
        return real(*args, **kw)

    monkeypatch.setattr(feeds, "read_finished", counted)
    job_id = await submit(api, tmp_path, [0.05] * 200)
    followers = 20
    t0 = time.monotonic()
    streams = await asyncio.wait_for(asyncio.gather(*(raw_follow(api, job_id, 0) for _ in range(followers))), 90)
    elapsed = time.monotonic() - t0
    for got in streams:
        assert sorted(r["task"] for r in got) == sorted({r["task"] for r in got}) and len(got) == 200
    # One poller read per tick at most (plus a catch-up read each for followers that came in late),
    # where a poll per follower would be `followers` times that.
    assert calls <= elapsed / feeds.FEED_TICK_S + 2 * followers + 5, (calls, elapsed)


async def test_read_gate_refuses_with_busy_instead_of_queueing(store: Store) -> None:
    gate = ReadGate(store, concurrent=1, waiting=1, wait_max_s=0.3)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(db: Any) -> int:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return 1

    first = asyncio.create_task(gate.read(slow))
    await wait_for(lambda: asyncio.sleep(0, gate._slots.locked()), message="first read running")
    waiting = asyncio.create_task(gate.read(lambda db: 2))
    await wait_for(lambda: asyncio.sleep(0, gate.waiting == 1), message="second read waiting")
    with pytest.raises(Busy) as full:
        await gate.read(lambda db: 3)  # the line is full: refused at once
    assert full.value.retry_after_s > 0
    with pytest.raises(Busy, match="waited"):
        await waiting  # waited longer than wait_max_s
    release.set()
    assert await first == 1
    assert await gate.read(lambda db: 4) == 4
    assert gate.refused == 2
