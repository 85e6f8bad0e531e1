"""The whole path on the local provider: real daemon, real SQLite, real agent processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, make_config, wait_for
from tests.procs import bundle

PY_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": (
        "import asyncio\n"
        "async def run(task_id, data):\n"
        "    if data.get('fail') == 'permanent':\n"
        "        class PermanentFailure(Exception): pass\n"
        "        raise PermanentFailure('bad data')\n"
        "    if data.get('fail') == 'retry':\n"
        "        raise RuntimeError('flaky')\n"
        "    await asyncio.sleep(data.get('sleep', 0))\n"
        "    return {'double': data['n'] * 2}\n"
    ),
}

CMD_WORKER = {
    "cloudtask.yaml": f"mode: command\ncommand: {sys.executable} w.py\n",
    "w.py": "import json,sys\nt=json.load(sys.stdin)\nprint(json.dumps({'id': t['id'], 'n': t['data']['n']}))\n",
}

STREAM_WORKER = {
    "cloudtask.yaml": f"mode: stream\ncommand: {sys.executable} -u w.py\n",
    "w.py": (
        "import json,sys\n"
        "for line in sys.stdin:\n"
        "    t=json.loads(line)\n"
        "    print(json.dumps({'id': t['id'], 'result': t['data']['n'] + 1}), flush=True)\n"
    ),
}


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    d = Daemon(make_config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def submit(api: UnixApi, worker: dict[str, str], tasks: str, **job: Any) -> int:
    status, body = await api.request("POST", "/v1/workers", data=bundle(worker))
    assert status == 200, body
    status, body = await api.request("POST", "/v1/jobs", json={"name": "t", "worker": body["digest"], **job})
    assert status == 201, body
    job_id = int(body["id"])
    status, body = await api.request("POST", f"/v1/jobs/{job_id}/tasks?source=tasks.jsonl", data=tasks.encode())
    assert status == 200, body
    return job_id


async def finished(api: UnixApi, job_id: int) -> dict[str, Any] | None:
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    return job if job["done"] else None


async def results(api: UnixApi, job_id: int) -> dict[str, dict[str, Any]]:
    _, text = await api.request("GET", f"/v1/jobs/{job_id}/results")
    lines = [json.loads(line) for line in text.splitlines()]
    return {r["id"]: r for r in lines}


def jsonl(tasks: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(t) + "\n" for t in tasks)


@pytest.mark.parametrize("worker", [PY_WORKER, CMD_WORKER, STREAM_WORKER], ids=["python", "command", "stream"])
async def test_each_mode_runs_a_job_to_the_end(daemon: Any, worker: dict[str, str]) -> None:
    d, api = daemon
    job_id = await submit(api, worker, jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(30)]))
    job = await wait_for(lambda: finished(api, job_id), message="job done")
    assert job["counts"]["succeeded"] == 30
    res = await results(api, job_id)
    assert set(res) == {f"t{i}" for i in range(30)}
    expected = {
        "python": lambda i: {"double": 2 * i},
        "command": lambda i: {"id": f"t{i}", "n": i},
        "stream": lambda i: i + 1,
    }[{id(PY_WORKER): "python", id(CMD_WORKER): "command", id(STREAM_WORKER): "stream"}[id(worker)]]
    for i in range(30):
        r = res[f"t{i}"]
        assert r["status"] == "succeeded" and r["result"] == expected(i) and r["attempts"] == 1
        assert r["instance"].startswith("local-")
    # The instance is drained and stopped once the pool is idle.
    async def stopped() -> bool:
        _, body = await api.request("GET", "/v1/instances")
        return body["instances"] == []
    await wait_for(stopped, message="idle instance stopped")
    assert await d.store.read(__import__("cloudtaskd.core.tables.tasks", fromlist=["x"]).check_counters) == []


async def test_retry_then_dead_and_permanent_failures(daemon: Any) -> None:
    _, api = daemon
    tasks = [{"id": "ok", "data": {"n": 1}}, {"id": "perm", "data": {"fail": "permanent"}},
             {"id": "flaky", "data": {"fail": "retry"}, "max_attempts": 2}]
    job_id = await submit(api, PY_WORKER, jsonl(tasks))
    await wait_for(lambda: finished(api, job_id), message="job done")
    res = await results(api, job_id)
    assert res["ok"]["status"] == "succeeded"
    assert res["perm"]["status"] == "dead" and res["perm"]["attempts"] == 1 and "bad data" in res["perm"]["error"]
    assert res["flaky"]["status"] == "dead" and res["flaky"]["attempts"] == 2 and "flaky" in res["flaky"]["error"]


@pytest.mark.parametrize(("files", "error"), [
    ({"cloudtask.yaml": "mode: command\ncommand: ./no-such-program\n"}, "worker command not found, not retried"),
    ({"cloudtask.yaml": "mode: command\ncommand: ./prog\n", "prog": "#!/bin/sh\necho {}\n"},
     "worker command cannot be executed, not retried"),
], ids=["127", "126"])
async def test_a_command_the_shell_cannot_run_is_dead_after_one_attempt(daemon: Any, files: dict[str, str],
                                                                         error: str) -> None:
    _, api = daemon
    job_id = await submit(api, files, jsonl([{"id": "t", "data": {}}]))
    job = await wait_for(lambda: finished(api, job_id), message="job done")
    assert job["outcome"] == "failed"
    res = (await results(api, job_id))["t"]
    assert res["status"] == "dead" and res["attempts"] == 1 and str(res["error"]).startswith(error)


async def test_per_task_timeout(daemon: Any) -> None:
    _, api = daemon
    tasks = [{"id": "slow", "data": {"n": 1, "sleep": 30}, "timeout": 0.3, "max_attempts": 1},
             {"id": "fast", "data": {"n": 2}}]
    job_id = await submit(api, PY_WORKER, jsonl(tasks))
    await wait_for(lambda: finished(api, job_id), message="job done")
    res = await results(api, job_id)
    assert res["slow"]["status"] == "dead" and "timed out" in res["slow"]["error"]
    assert res["fast"]["status"] == "succeeded"


async def test_cancel_stops_running_work(daemon: Any) -> None:
    _, api = daemon
    tasks = [{"id": f"s{i}", "data": {"n": i, "sleep": 60}} for i in range(4)]
    job_id = await submit(api, PY_WORKER, jsonl(tasks))

    async def leased() -> bool:
        _, job = await api.request("GET", f"/v1/jobs/{job_id}")
        return job["counts"]["leased"] > 0
    await wait_for(leased, message="a task leased")
    status, job = await api.request("POST", f"/v1/jobs/{job_id}/cancel")
    assert status == 200 and job["counts"]["cancelled"] == 4 and job["done"]
    res = await results(api, job_id)
    assert {r["status"] for r in res.values()} == {"cancelled"}


async def test_bad_task_file_is_refused_whole(daemon: Any) -> None:
    _, api = daemon
    status, body = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
    _, job = await api.request("POST", "/v1/jobs", json={"worker": body["digest"]})
    good = jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(20_000)])
    bad = good + '{"data": {}}\n'
    status, body = await api.request("POST", f"/v1/jobs/{job['id']}/tasks?source=big.jsonl", data=bad.encode())
    assert status == 400
    assert body["error"]["line"] == 20_001 and body["error"]["message"].startswith("big.jsonl:20001:")
    _, job = await api.request("GET", f"/v1/jobs/{job['id']}")
    assert job["counts"]["total"] == 0
    dup = good + '{"id": "t7"}\n'
    status, body = await api.request("POST", f"/v1/jobs/{job['id']}/tasks?source=dup.jsonl", data=dup.encode())
    assert status == 400 and "duplicate id 't7'" in body["error"]["message"] and body["error"]["line"] == 20_001
    _, job = await api.request("GET", f"/v1/jobs/{job['id']}")
    assert job["counts"]["total"] == 0


async def test_bad_worker_spec_names_the_key(daemon: Any) -> None:
    _, api = daemon
    status, body = await api.request("POST", "/v1/workers", data=bundle({"cloudtask.yaml": "mode: python\n"}))
    assert status == 400 and "cloudtask.yaml: function" in body["error"]["message"]
    status, body = await api.request("POST", "/v1/workers", data=b"not a tarball")
    assert status == 400 and "not a valid tar" in body["error"]["message"]


async def test_sigterm_drains_the_agent_and_hands_back_without_counting(daemon: Any) -> None:
    import os
    import signal

    _, api = daemon
    tasks = [{"id": f"s{i}", "data": {"n": i, "sleep": 1.0}} for i in range(6)]
    job_id = await submit(api, PY_WORKER, jsonl(tasks), max_attempts=1)

    async def busy_instance() -> Any:
        _, body = await api.request("GET", "/v1/instances")
        running = [i for i in body["instances"] if i["state"] == "running" and i["leases"] >= 2]
        return running[0] if running else None
    inst = await wait_for(busy_instance, message="an agent holding leases")
    os.kill(int(inst["cloud_id"]), signal.SIGTERM)
    job = await wait_for(lambda: finished(api, job_id), timeout=40, message="job done after the drain")
    # max_attempts=1: had a hand-back counted as an attempt, tasks would be dead.
    assert job["counts"]["succeeded"] == 6
    res = await results(api, job_id)
    assert all(r["attempts"] == 1 for r in res.values())
    _, body = await api.request("GET", "/v1/instances?all=1")
    first = next(i for i in body["instances"] if i["id"] == inst["id"])
    assert first["state"] == "stopped" and first["last_error"] is None
    _, ev = await api.request("GET", f"/v1/events?job={job_id}&limit=10000")
    assert any(e["kind"] == "lease_handed_back" for e in ev["events"])


async def test_a_connected_agent_is_seen_now_not_at_its_hello(daemon: Any) -> None:
    """`instances` showed SEEN 0:51 ago for a busy connected agent: last_seen_at was its hello."""
    d, api = daemon
    slow = {"cloudtask.yaml": f"mode: command\ncommand: {sys.executable} w.py\n",
            "w.py": "import json, sys, time\njson.load(sys.stdin)\ntime.sleep(0.5)\nprint(1)\n"}
    job_id = await submit(api, slow, jsonl([{"id": i, "data": {}} for i in range(40)]))

    async def busy_for_a_while() -> dict[str, Any] | None:
        _, body = await api.request("GET", "/v1/instances")
        running = [i for i in body["instances"] if i["state"] == "running" and i["started_at"]]
        now = d.store.clock.now()
        return running[0] if running and now - running[0]["started_at"] >= 2.5 else None
    inst = await wait_for(busy_for_a_while, timeout=60, message="an agent busy for 2.5 s")
    assert inst["connected"] is True
    assert inst["last_seen_at"] >= d.store.clock.now() - 1.0, inst
    assert inst["last_seen_at"] - inst["started_at"] >= 2.0, "seen at its hello, not now"
    await api.request("POST", f"/v1/jobs/{job_id}/cancel")
