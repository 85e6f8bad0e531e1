"""The real agent through a network blip: it keeps its leases, resends unacked results, and every
task is recorded once."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.connection import Agent
from cloudtask_wire.workerspec import WorkerSpec
from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, make_config, wait_for
from tests.fakes.netproxy import Proxy
from tests.integration.test_daemon_e2e import finished, jsonl, results
from tests.procs import bundle

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(0.05)\n    return data['n']\n",
}


async def test_blips_lose_nothing_and_keep_leases(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path, lease_ttl_s=30.0),
                     providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    daemon = Daemon(config, shutdown_grace_s=2)
    await daemon.start()
    api = UnixApi(config.socket_path)
    port = int(daemon.agent_url.split(":")[2].split("/")[0])
    proxy = Proxy("127.0.0.1", port)
    await proxy.start()
    agent_task: asyncio.Task[int] | None = None
    try:
        _, worker = await api.request("POST", "/v1/workers", data=bundle(WORKER))
        _, inst = await api.request("POST", "/v1/instances", json={"worker": worker["digest"], "slots": 8})
        _, job = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
        n = 400
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks",
                          data=jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(n)]).encode())
        worker_dir = config.state_path / "workers" / worker["digest"]
        ca = tmp_path / "ca.pem"
        ca.write_text(inst["ca_cert"])
        agent = Agent(f"wss://127.0.0.1:{proxy.port}/v1/agent", inst["id"], inst["token"], worker_dir, 8, ca_file=ca,
                      spec=WorkerSpec.from_dict({"mode": "python", "function": "w:run"}))
        agent_task = asyncio.get_running_loop().create_task(agent.run())
        for mark in (50, 150, 300):
            async def progressed(mark: int = mark) -> bool:
                _, j = await api.request("GET", f"/v1/jobs/{job['id']}")
                return bool(j["counts"]["succeeded"] >= mark)
            await wait_for(progressed, message=f"{mark} done")
            assert agent.held, "the agent should hold leases when the blip comes"
            proxy.cut()
        j = await wait_for(lambda: finished(api, job["id"]), message="job done")
        assert j["counts"]["succeeded"] == n
        assert proxy.connections >= 4, "the agent should have reconnected after each cut"
        res = await results(api, job["id"])
        assert all(r["result"] == int(r["id"][1:]) and r["attempts"] == 1 for r in res.values())
    finally:
        if agent_task is not None:
            agent.start_drain("test over")
            await asyncio.wait_for(agent_task, timeout=30)
        await proxy.stop()
        await api.close()
        await daemon.stop()
    db = sqlite3.connect(config.state_path / "cloudtask.db")
    try:
        kinds: dict[str, Any] = dict(db.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
    finally:
        db.close()
    # Leases survived the blips: none expired and no result was refused. A grant cut off in flight
    # comes back at the reconnect (handed back, no attempt counted) and is granted again.
    assert kinds.get("lease_expired", 0) == 0
    assert kinds.get("stale_report_refused", 0) == 0
    assert kinds["task_succeeded"] == n
    assert kinds["lease_granted"] == n + kinds.get("lease_handed_back", 0)
