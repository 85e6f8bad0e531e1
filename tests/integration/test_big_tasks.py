"""Tasks of hundreds of KB (issue 13): grants packed under the agent's frame limit, and a delivery
that cannot succeed made an error the user sees instead of an endless grant/reconnect loop."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, agent_ssl, make_config, wait_for
from tests.integration.test_daemon_e2e import finished, jsonl, results
from tests.procs import bundle

KB = 1000
MIB = 1024 * 1024

SIZE_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": "async def run(task_id, data):\n    return {'chars': len(data['s'])}\n",
}


def big(prefix: str, n: int, chars: int) -> list[dict[str, Any]]:
    # Non-ASCII in part: frame limits count UTF-8 bytes, not characters.
    return [{"id": f"{prefix}{i}", "data": {"s": "é" * 100 + "x" * (chars - 200)}} for i in range(n)]


@pytest.fixture
async def eight_slots(tmp_path: Path) -> Any:
    """A real daemon whose local provider starts one real agent process of 8 slots (16 credits with
    its prefetch: 16 tasks of 300 KB are 4.8 MB, over the 4 MiB frame limit in one grant)."""
    config = make_config(tmp_path)
    config = replace(config, providers=ProvidersConfig(local=LocalProviderConfig(max_instances=1, cpus=8)))
    d = Daemon(config, shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def test_tasks_whose_sizes_sum_past_the_frame_limit_are_delivered_and_run(eight_slots: Any) -> None:
    d, api = eight_slots
    tasks = big("m", 40, 300 * KB) + big("l", 8, int(0.95 * MIB))
    status, body = await api.request("POST", "/v1/workers", data=bundle(SIZE_WORKER))
    assert status == 200, body
    job_id = await job(api, body["digest"], tasks, max_attempts=3)
    done = await wait_for(lambda: finished(api, job_id), timeout=120, interval=0.2, message="job done")
    assert done["counts"]["succeeded"] == 48, done["counts"]
    res = await results(api, job_id)
    assert all(res[t["id"]]["result"] == {"chars": len(t["data"]["s"])} for t in tasks)
    assert all(r["attempts"] == 1 for r in res.values())
    # Delivered the first time: no grant was lost with a connection, no agent reconnected.
    _, ev = await api.request("GET", f"/v1/events?job={job_id}&limit=10000")
    kinds = [e["kind"] for e in ev["events"]]
    assert kinds.count("lease_granted") == 48 and "lease_handed_back" not in kinds
    assert await d.store.read(queue.check_counters) == []


async def test_a_raised_task_limit_raises_the_frame_limit_of_the_agents_the_daemon_starts(tmp_path: Path) -> None:
    """queue.max_task_bytes above the old 4 MiB frame: the frame limit follows it, the local agent is
    started reading frames that large, and a 4.5 MiB task runs."""
    config = make_config(tmp_path)
    config = replace(config, queue=replace(config.queue, max_task_bytes=5 * MIB),
                     agents=replace(config.agents, max_message_bytes=0),  # 0: follow the task limit
                     providers=ProvidersConfig(local=LocalProviderConfig(max_instances=1, cpus=2)))
    assert config.agents.max_message_bytes == 5 * MIB + 8192
    d = Daemon(config, shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        _, body = await api.request("POST", "/v1/workers", data=bundle(SIZE_WORKER))
        tasks = big("h", 2, int(4.5 * MIB))
        job_id = await job(api, body["digest"], tasks, max_attempts=1)
        done = await wait_for(lambda: finished(api, job_id), timeout=120, interval=0.2, message="job done")
        assert done["counts"]["succeeded"] == 2, (await results(api, job_id))
        # A task over the limit is refused at upload, naming its line.
        _, body = await api.request("POST", "/v1/jobs", json={"worker": body["digest"]})
        status, err = await api.request("POST", f"/v1/jobs/{body['id']}/tasks?source=t.jsonl",
                                        data=io.BytesIO(jsonl(big("x", 1, 5 * MIB + 1)).encode()))
        assert status == 400 and "t.jsonl:1: the task is larger than 5242880 bytes" in err["error"]["message"]
    finally:
        await api.close()
        await d.stop()


# ---- agents played by the test ----------------------------------------------------------------


@pytest.fixture
async def env(tmp_path: Path) -> Any:
    config = make_config(tmp_path, lease_ttl_s=30.0)
    config = replace(config, providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(d.config.socket_path)
    http = aiohttp.ClientSession()
    _, worker = await api.request("POST", "/v1/workers", data=bundle(SIZE_WORKER))
    yield d, api, http, worker["digest"]
    await http.close()
    await api.close()
    await d.stop()


async def job(api: UnixApi, digest: str, tasks: list[dict[str, Any]], max_attempts: int) -> int:
    _, body = await api.request("POST", "/v1/jobs", json={"worker": digest, "max_attempts": max_attempts})
    # A stream, not bytes: aiohttp warns of a large body sent in one piece.
    status, _ = await api.request("POST", f"/v1/jobs/{body['id']}/tasks", data=io.BytesIO(jsonl(tasks).encode()))
    assert status == 200
    return int(body["id"])


def hello(inst: dict[str, Any], max_message_bytes: int | None) -> str:
    msg: dict[str, Any] = {"t": "hello", "version": 1, "instance": inst["id"], "token": inst["token"],
                           "slots": 4, "held": []}
    if max_message_bytes is not None:
        msg["max_message_bytes"] = max_message_bytes
    return json.dumps(msg)


async def test_a_task_bigger_than_the_agent_reads_fails_with_the_reason_and_the_rest_runs(env: Any) -> None:
    """An agent that says it reads frames of 64 KiB: the daemon never sends it the 100 KB task (the
    small ones still come, packed under the limit); that task's attempts fail, saying why, until it
    is dead, and nothing loops."""
    _, api, http, digest = env
    small = [{"id": f"s{i}", "data": {"s": "x" * 20_000}} for i in range(12)]
    job_id = await job(api, digest, [*small, *big("b", 1, 100 * KB)], max_attempts=2)
    _, inst = await api.request("POST", "/v1/instances", json={"worker": digest, "slots": 4})
    assert inst["max_message_bytes"] == 4 * MIB  # what an agent run by hand should read to take any task
    ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst), max_msg_size=64 * 1024)
    await ws.send_str(hello(inst, 64 * 1024))
    assert json.loads((await ws.receive(timeout=5)).data)["t"] == "welcome"
    await ws.send_str('{"t":"lease","n":8}')

    async def serve() -> Any:
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg  # never a frame over our limit (that closes: 1009)
        frame = json.loads(msg.data)
        if frame["t"] == "grant" and frame["tasks"]:
            await ws.send_str(json.dumps({"t": "done", "n": len(frame["tasks"]), "results": [
                {"id": t["id"], "token": t["token"], "result": len(t["data"]["s"]), "duration_s": 0.0}
                for t in frame["tasks"]]}))
        return await finished(api, job_id)

    done = await wait_for(serve, timeout=60, interval=0, message="job done")
    assert done["counts"]["succeeded"] == 12 and done["counts"]["dead"] == 1
    res = await results(api, job_id)
    dead = res["b0"]
    assert dead["status"] == "dead" and dead["attempts"] == 2, dead
    assert dead["error"].startswith(f"could not be delivered to instance {inst['id']}: the grant frame (")
    assert "exceeds the agent's limit of 65536 bytes" in dead["error"]
    await ws.close()


async def test_an_old_agent_that_keeps_losing_a_grant_ends_with_an_error_not_a_loop(env: Any) -> None:
    """An agent that does not say its limit (assumed 4 MiB) but reads only 64 KiB: the 100 KB grant
    closes its connection with 1009 each time and it reconnects without the task. After
    MAX_LOST_GRANTS losses in a row the attempt fails with the reason; the last attempt makes the
    task dead. Before, this went on for ever (thousands of grants, no error anywhere)."""
    d, api, http, digest = env
    job_id = await job(api, digest, big("b", 1, 100 * KB), max_attempts=2)
    _, inst = await api.request("POST", "/v1/instances", json={"worker": digest, "slots": 4})
    closes: list[int | None] = []

    async def connect_once() -> Any:
        async with http.ws_connect(inst["url"], ssl=agent_ssl(inst), max_msg_size=64 * 1024) as ws:
            await ws.send_str(hello(inst, None))
            assert json.loads((await ws.receive(timeout=5)).data)["t"] == "welcome"
            await ws.send_str('{"t":"lease","n":4}')
            while True:
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    closes.append(ws.close_code)
                    break
        return await finished(api, job_id)

    done = await wait_for(connect_once, timeout=60, interval=0, message="job done")
    assert done["counts"]["dead"] == 1
    assert closes and set(closes) == {1009}
    [dead] = (await results(api, job_id)).values()
    assert dead["status"] == "dead" and dead["attempts"] == 2
    # The daemon mostly sees 1006: the agent's reader drops the socket with the big frame unread.
    assert dead["error"].startswith(f"could not be delivered to instance {inst['id']}: its connection closed "
                                    "(code 100"), dead["error"]
    assert (f"before the agent held the task, {queue.MAX_LOST_GRANTS} times in a row; the largest grant frame "
            "sent on it was 100") in dead["error"]
    assert "the agent reads 4194304" in dead["error"]
    _, ev = await api.request("GET", f"/v1/events?job={job_id}&limit=10000")
    kinds = [e["kind"] for e in ev["events"]]
    # Bounded: MAX_LOST_GRANTS grants per attempt, then the attempt failed.
    assert kinds.count("lease_granted") == 2 * queue.MAX_LOST_GRANTS
    assert kinds.count("task_failed") == 1 and kinds.count("task_dead") == 1
    assert await d.store.read(queue.check_counters) == []
