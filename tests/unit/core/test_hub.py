"""The agent websocket: auth, malformed frames, fencing over the wire, reconnects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, agent_ssl, make_config, wait_for
from tests.integration.test_daemon_e2e import PY_WORKER, jsonl
from tests.procs import bundle


@pytest.fixture
async def env(tmp_path: Path) -> Any:
    # No local instances: these tests play the agent themselves.
    config = make_config(tmp_path, lease_ttl_s=2.0)
    from dataclasses import replace

    from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
    config = replace(config, providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(d.config.socket_path)
    http = aiohttp.ClientSession()
    _, worker = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
    yield d, api, http, worker["digest"]
    await http.close()
    await api.close()
    await d.stop()


async def agent(api: UnixApi, http: aiohttp.ClientSession, digest: str) -> tuple[dict[str, Any], Any]:
    status, inst = await api.request("POST", "/v1/instances", json={"worker": digest, "slots": 4})
    assert status == 201
    ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
    return inst, ws


async def hello(ws: Any, inst: dict[str, Any], held: list[list[int]] | None = None) -> dict[str, Any]:
    await ws.send_str(json.dumps({"t": "hello", "version": 1, "instance": inst["id"], "token": inst["token"],
                                  "slots": 4, "held": held or []}))
    return json.loads((await ws.receive(timeout=5)).data)


async def job_with_tasks(api: UnixApi, digest: str, n: int) -> int:
    _, job = await api.request("POST", "/v1/jobs", json={"worker": digest})
    tasks = jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(n)])
    status, _ = await api.request("POST", f"/v1/jobs/{job['id']}/tasks", data=tasks.encode())
    assert status == 200
    return int(job["id"])


async def test_wrong_token_is_refused(env: Any) -> None:
    _, api, http, digest = env
    inst, ws = await agent(api, http, digest)
    inst["token"] = "not-the-token"
    msg = await hello(ws, inst)
    assert msg["t"] == "error" and msg["code"] == "unauthorized"
    closed = await ws.receive(timeout=5)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    await ws.close()


@pytest.mark.parametrize("frame", [
    "not json", '{"t": "nope"}', '{"t": "lease", "n": "many"}', '{"t": "done", "results": [{"id": 1}]}',
    '[1, 2]', '{"t": "hb", "leases": [[1]]}',
])
async def test_malformed_frame_closes_only_that_connection(env: Any, frame: str) -> None:
    _, api, http, digest = env
    job_id = await job_with_tasks(api, digest, 3)
    good_inst, good = await agent(api, http, digest)
    assert (await hello(good, good_inst))["t"] == "welcome"
    bad_inst, bad = await agent(api, http, digest)
    assert (await hello(bad, bad_inst))["t"] == "welcome"
    await bad.send_str(frame)
    msg = await bad.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["t"] == "error"
    # The well-behaved agent still works end to end.
    await good.send_str('{"t": "lease", "n": 3}')
    grant = json.loads((await good.receive(timeout=5)).data)
    assert grant["t"] == "grant" and len(grant["tasks"]) == 3
    await good.send_str(json.dumps({"t": "done", "results": [
        {"id": t["id"], "token": t["token"], "result": t["key"], "duration_s": 0.0} for t in grant["tasks"]]}))
    ack = json.loads((await good.receive(timeout=5)).data)
    assert ack == {"t": "ack", "ok": [t["id"] for t in grant["tasks"]], "refused": []}
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    assert job["counts"]["succeeded"] == 3
    await good.close()
    await bad.close()


async def test_oversized_frame_closes_the_connection(env: Any) -> None:
    d, api, http, digest = env
    inst, ws = await agent(api, http, digest)
    await hello(ws, inst)
    try:
        await ws.send_str('{"t": "hb", "leases": [], "pad": "' + "x" * d.config.agents.max_message_bytes + '"}')
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    except ConnectionError:
        pass  # the daemon cut us off while the frame was still being sent
    await ws.close()
    await wait_for(lambda: _no_sessions(d), message="session dropped")
    # Another agent is served as usual.
    inst2, ws2 = await agent(api, http, digest)
    assert (await hello(ws2, inst2))["t"] == "welcome"
    await ws2.close()


async def _no_sessions(d: Daemon) -> bool:
    return not d.dispatcher.sessions


async def test_reconnect_keeps_valid_leases_and_stale_result_is_refused(env: Any) -> None:
    _, api, http, digest = env
    job_id = await job_with_tasks(api, digest, 2)
    inst, ws = await agent(api, http, digest)
    await hello(ws, inst)
    await ws.send_str('{"t": "lease", "n": 2}')
    grant = json.loads((await ws.receive(timeout=5)).data)
    a, b = grant["tasks"]
    await ws.close()  # a network blip
    ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
    welcome = await hello(ws, inst, held=[[a["id"], a["token"]], [b["id"], b["token"] + 1]])
    assert welcome["kept"] == [a["id"]] and welcome["dropped"] == [b["id"]]
    # Keep a alive with heartbeats while b's lease runs out (ttl 2 s) and b is retried elsewhere.
    other_inst, other = await agent(api, http, digest)
    await hello(other, other_inst)
    await other.send_str('{"t": "lease", "n": 1}')

    async def regrant() -> Any:
        await ws.send_str(json.dumps({"t": "hb", "leases": [[a["id"], a["token"]]]}))
        try:
            msg = await other.receive(timeout=0.3)
        except TimeoutError:
            return None
        return json.loads(msg.data)
    b2 = (await wait_for(regrant, timeout=15, message="b leased again"))["tasks"][0]
    assert b2["id"] == b["id"] and b2["token"] > b["token"]
    # The first agent's late result for b is fenced off; its result for a lands.
    await ws.send_str(json.dumps({"t": "done", "results": [
        {"id": a["id"], "token": a["token"], "result": "a", "duration_s": 0.0},
        {"id": b["id"], "token": b["token"], "result": "stale", "duration_s": 0.0}]}))

    async def ack() -> Any:
        msg = json.loads((await ws.receive(timeout=5)).data)
        return msg if msg["t"] == "ack" else None
    got = await wait_for(ack, message="ack")
    assert got["ok"] == [a["id"]] and got["refused"] == [b["id"]]
    await other.send_str(json.dumps({"t": "done", "results": [
        {"id": b2["id"], "token": b2["token"], "result": "b", "duration_s": 0.0}]}))

    async def results() -> Any:
        _, text = await api.request("GET", f"/v1/jobs/{job_id}/results")
        lines = [json.loads(x) for x in text.splitlines()]
        return lines if len(lines) == 2 else None
    res = {r["id"]: r for r in await wait_for(results, message="two results")}
    assert res["t0"]["result"] in ("a", "b") and {res["t0"]["result"], res["t1"]["result"]} == {"a", "b"}
    assert all(r["status"] == "succeeded" for r in res.values())
    await ws.close()
    await other.close()
