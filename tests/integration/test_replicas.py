"""Two cloudtaskd replicas on one real PostgreSQL database (issue 17), as real processes, each with its
own state directory for its local files (the CA copied from the first, as docs/replicas.md says).
Agents are spread: the leader's local agents (launched by its orchestrator, given both URLs) and
agents registered on the other replica by hand (given that replica's URL first).

- A job of 50,000 no-op tasks; the leader is SIGKILLed mid-job: every task has exactly one result
  (results and the tasks table), the orchestrator moves to the survivor within 10 s (measured), and
  no instance is launched again or leaked (the local agents of the dead replica are adopted).
- PostgreSQL restarted mid-job: the replicas and the agents carry on, nothing lost or doubled.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.conftest import wait_for
from tests.fakes.postgres import PostgresServer
from tests.integration.test_agent_failover import log_events, start_agent, stop_agent
from tests.procs import DaemonProcess, bundle, free_port, share_ca

WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(task_id, data):\n    return data\n"}
LOCAL_AGENTS = 2
HAND_AGENTS = 2
FAILOVER_BOUND_S = 10.0


def _url(port: int) -> str:
    return f"wss://127.0.0.1:{port}/v1/agent"


def _config(dsn: str, port: int, urls: list[str]) -> dict[str, Any]:
    return {
        "database": dsn, "log_level": "info",
        "agents": {"listen_port": port, "lease_ttl_s": 20, "urls": urls},
        "providers": {"local": {"max_instances": LOCAL_AGENTS, "cpus": 4}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 600, "max_instances": LOCAL_AGENTS},
        "queue": {"retry_backoff_s": 0.1},
    }


class Pair:
    """Replica A (started first: it leads) and replica B, with B's hand-registered agents."""

    def __init__(self, tmp: Path, dsn: str) -> None:
        self.ports = free_port(), free_port()
        urls = [_url(p) for p in self.ports]
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        self.a = DaemonProcess(tmp / "a", _config(dsn, self.ports[0], urls))
        self.b = DaemonProcess(tmp / "b", _config(dsn, self.ports[1], urls))
        self.tmp = tmp
        self.agents: list[subprocess.Popen[bytes]] = []
        self.digest = ""

    async def start(self) -> None:
        await self.a.start()
        await wait_for(lambda: _logged(self.a, "leader_work_started"), timeout=20, message="A leads")
        share_ca(self.a, self.b)
        await self.b.start()
        for d in (self.a, self.b):  # bundles live in each replica's state directory
            self.digest = (await d.post("/v1/workers", data=bundle(WORKER)))["digest"]
        for i in range(HAND_AGENTS):
            inst = await self.b.post("/v1/instances", json={"worker": self.digest, "slots": 4})
            assert inst["urls"][0] == _url(self.ports[1])
            self.agents.append(start_agent(self.tmp / f"hand{i}", self.b, inst, self.digest, inst["urls"]))

    async def submit(self, n: int) -> int:
        job = await self.a.post("/v1/jobs", json={"name": "replicas", "worker": self.digest, "max_attempts": 20})
        body = "".join(json.dumps({"id": f"t{i}", "data": i}) + "\n" for i in range(n)).encode()
        await self.b.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))  # either replica answers
        return int(job["id"])

    def local_pids(self, daemon: DaemonProcess) -> dict[str, int]:
        return {p.stem: int(json.loads(p.read_text())["pid"]) for p in (daemon.state_dir / "local").glob("*.json")}

    async def close(self) -> None:
        for agent in self.agents:
            stop_agent(agent)
        left = {**self.local_pids(self.a), **self.local_pids(self.b)}
        await self.b.stop()
        await self.a.stop()
        for pid in left.values():  # the killed replica's local agents: started by this test's daemon
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


async def _logged(daemon: DaemonProcess, event: str) -> bool:
    return bool(log_events(daemon.log_path, event))


async def _done(daemon: DaemonProcess, job_id: int, timeout: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        try:
            j = await daemon.get(f"/v1/jobs/{job_id}")
        except aiohttp.ClientResponseError as exc:
            if exc.status == 503:  # the database restarting: the API says so, and answers again after
                return None
            raise
        return j if j["done"] else None
    return await wait_for(done, timeout=timeout, interval=0.5, message=f"job {job_id} done")  # type: ignore[no-any-return]


async def _check_once(daemon: DaemonProcess, dsn: str, job_id: int, n: int) -> None:
    results = [json.loads(line) for line in (await daemon.get(f"/v1/jobs/{job_id}/results")).splitlines()]
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == n, "a task is missing or has two results"
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in results)
    with psycopg.connect(dsn) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM tasks WHERE job_id = %s GROUP BY state",
                                   (job_id,)).fetchall())
        assert states == {"succeeded": n}, states
        twice = conn.execute("SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
                             " AND job_id = %s GROUP BY task_id HAVING count(*) > 1) AS t", (job_id,)).fetchone()
        assert twice is not None and twice[0] == 0, "a task recorded as succeeded twice"


def _instances(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT id, state FROM instances WHERE provider = 'local' ORDER BY id").fetchall()]


@pytest.mark.timeout(400)
async def test_the_leader_killed_mid_job_of_50000_tasks(tmp_path: Path, pg_dsn: str) -> None:
    n = 50_000
    pair = Pair(tmp_path, pg_dsn)
    try:
        await pair.start()
        job_id = await pair.submit(n)

        async def started() -> bool:
            j = await pair.b.get(f"/v1/jobs/{job_id}")
            return bool(j["counts"]["succeeded"] >= n // 4)
        await wait_for(started, timeout=180, interval=0.2, message="a quarter of the tasks done")
        launched = _instances(pg_dsn)
        assert len(launched) == LOCAL_AGENTS and all(s == "running" for _, s in launched), launched
        a_agents = pair.local_pids(pair.a)
        assert set(a_agents) == {i for i, _ in launched}, "A's orchestrator launched the local agents"
        j = await pair.b.get(f"/v1/jobs/{job_id}")
        assert j["counts"]["succeeded"] < n, "the kill should come mid-job"

        pair.a.kill()
        killed_at = time.monotonic()

        async def b_leads() -> float | None:
            return time.monotonic() - killed_at if await _logged(pair.b, "leader_work_started") else None
        moved_s = await wait_for(b_leads, timeout=30, interval=0.05, message="B's orchestrator running")
        print(f"orchestrator moved to the survivor {moved_s:.2f} s after the leader's SIGKILL")
        assert moved_s < FAILOVER_BOUND_S

        await _done(pair.b, job_id, timeout=240)
        await _check_once(pair.b, pg_dsn, job_id, n)
        # A's local agents were adopted, not relaunched, and none was ended as lost.
        after = _instances(pg_dsn)
        assert after == launched, after
        assert all(_alive(pid) for pid in a_agents.values()), "an adopted agent was stopped"
        assert pair.local_pids(pair.b) == {}, "the survivor launched an instance of its own"
    finally:
        await pair.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
async def test_postgresql_restarted_mid_job(tmp_path: Path, pg_server: PostgresServer, pg_dsn: str) -> None:
    n = 20_000
    pair = Pair(tmp_path, pg_dsn)
    try:
        await pair.start()
        job_id = await pair.submit(n)

        async def started() -> bool:
            j = await pair.b.get(f"/v1/jobs/{job_id}")
            return bool(j["counts"]["succeeded"] >= n // 4)
        await wait_for(started, timeout=120, interval=0.2, message="a quarter of the tasks done")
        pair_agents = pair.local_pids(pair.a)
        pg_server.restart()

        await _done(pair.b, job_id, timeout=200)
        await _check_once(pair.b, pg_dsn, job_id, n)
        assert pair.a.proc is not None and pair.a.proc.poll() is None
        assert pair.b.proc is not None and pair.b.proc.poll() is None
        assert _instances(pg_dsn) == sorted((i, "running") for i in pair_agents), "an agent was lost or relaunched"
        assert all(a.poll() is None for a in pair.agents), "a hand-started agent gave up"
    finally:
        await pair.close()
