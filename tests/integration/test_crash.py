"""kill -9 the daemon again and again during a run; every task ends with exactly one result and
every agent comes back.

CI: 50,000 tasks, ten kills (one of them in the middle of the task upload). Soak (--soak): 200,000
tasks, thirty kills. The kills land at random moments: a random point of progress plus a random
delay, so they fall inside dispatch rounds, commits, uploads and reconnects alike.

Below it, restarts with config.example.yaml as shipped (agents.listen_port 0): the port kept or,
taken, another one the local agent follows; an agent that never comes back replaced after
agents.reconnect_grace_s; an agent with no daemon giving up (issue 15).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cloudtask_wire.workerspec import RESOLVED_SPEC_FILE, WorkerSpec
from cloudtaskd.core.tables import tasks as queue
from tests import paths
from tests.conftest import wait_for
from tests.procs import ROOT, DaemonProcess, bundle, free_port

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


# ---- restarts with the example config as shipped (issue 15) ----

EXAMPLE_CONFIG = paths.ROOT / "config.example.yaml"


def example_config(**agents: Any) -> dict[str, Any]:
    """config.example.yaml as shipped (agents.listen_port 0, TLS, local max_instances 1), with only
    state_dir and log_level left to the test harness, plus the agents keys given."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config.pop("state_dir"), config.pop("log_level")
    assert config["agents"]["listen_port"] == 0
    config["agents"].update(agents)
    return config


async def _job(daemon: DaemonProcess, n_tasks: int) -> int:
    worker = await daemon.post("/v1/workers", data=bundle(WORKER))
    job = await daemon.post("/v1/jobs", json={"name": "restart", "worker": worker["digest"], "max_attempts": 20})
    body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(n_tasks)).encode()
    await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))
    return int(job["id"])


async def _until_done(daemon: DaemonProcess, job_id: int, mark: int) -> None:
    async def reached() -> bool:
        j = await daemon.get(f"/v1/jobs/{job_id}")
        return bool(j["counts"]["succeeded"] >= mark or j["done"])
    await wait_for(reached, timeout=300, message=f"{mark} tasks of job {job_id} done")


async def _finish_exactly_once(daemon: DaemonProcess, job_id: int, n_tasks: int) -> None:
    async def done() -> bool:
        return bool((await daemon.get(f"/v1/jobs/{job_id}"))["done"])
    await wait_for(done, timeout=300, message="job done after the restart")
    text = await daemon.get(f"/v1/jobs/{job_id}/results")
    results = [json.loads(line) for line in text.splitlines()]
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == n_tasks, "a task is missing or reported twice"
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in results)
    db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
    try:
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == n_tasks
        assert queue.check_counters(db) == []
    finally:
        db.close()


@pytest.mark.parametrize("port_taken", [False, True], ids=["same_port", "port_taken"])
@pytest.mark.timeout(600)
async def test_example_config_sigkill_and_restart_finishes(tmp_path: Path, port_taken: bool) -> None:
    """listen_port 0 as shipped: the daemon binds the port it had again, or (taken) another one,
    and the orphaned local agent finds it through its agent.url; the job ends, each task once."""
    n_tasks = 6000
    daemon = DaemonProcess(tmp_path, example_config())
    await daemon.start()
    blocker: socket.socket | None = None
    try:
        job_id = await _job(daemon, n_tasks)
        await _until_done(daemon, job_id, n_tasks * 4 // 10)
        before = await running_ids(daemon)
        assert len(before) == 1
        port = int((daemon.state_dir / "agent.port").read_text())
        daemon.kill()
        if port_taken:
            blocker = socket.socket()
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the agent's old connection lingers
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
        await daemon.start()
        new_port = int((daemon.state_dir / "agent.port").read_text())
        if port_taken:
            assert new_port != port
            assert "agent_port_taken" in daemon.log_path.read_text()
        else:
            assert new_port == port

        async def back() -> bool:
            return await running_ids(daemon) == before and await connected_agents(daemon) == 1
        await wait_for(back, timeout=90, message=f"the agent {sorted(before)} back after the restart")
        await _finish_exactly_once(daemon, job_id, n_tasks)
    finally:
        if blocker is not None:
            blocker.close()
        await daemon.stop()


@pytest.mark.timeout(600)
async def test_agent_not_back_within_grace_is_replaced(tmp_path: Path) -> None:
    """An instance whose agent has not reconnected within agents.reconnect_grace_s of a restart is
    lost (its leases requeued) and replaced; the job finishes, each task once."""
    n_tasks = 3000
    daemon = DaemonProcess(tmp_path, example_config(reconnect_grace_s=2))
    await daemon.start()
    pid = 0
    try:
        job_id = await _job(daemon, n_tasks)
        await _until_done(daemon, job_id, n_tasks // 3)
        (old,) = await running_ids(daemon)
        pid = json.loads((daemon.state_dir / "local" / f"{old}.json").read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)  # alive, adopted, but never reconnecting
        daemon.kill()
        await daemon.start()

        async def lost() -> bool:
            rows = (await daemon.get("/v1/instances"))["instances"]
            return any(i["id"] == old and i["state"] != "running" for i in rows)
        await wait_for(lost, timeout=60, message=f"{old} lost after the grace")
        os.kill(pid, signal.SIGCONT)  # it may now take the SIGTERM of its termination

        async def replaced() -> bool:
            ids = await running_ids(daemon)
            return bool(ids) and old not in ids and await connected_agents(daemon) == 1
        await wait_for(replaced, timeout=90, message="a replacement agent connected")
        await _finish_exactly_once(daemon, job_id, n_tasks)
        db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
        try:
            err = db.execute("SELECT last_error FROM instances WHERE id = ?", (old,)).fetchone()[0] or ""
        finally:
            db.close()
        assert "reconnect_grace_s" in err, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            if pid:
                os.kill(pid, signal.SIGCONT)
        await daemon.stop()


async def test_agent_gives_up_on_an_unreachable_daemon(tmp_path: Path) -> None:
    """An agent that cannot reach any daemon for --give-up-after seconds exits with code 3."""
    worker_dir = tmp_path / "w"
    worker_dir.mkdir()
    (worker_dir / RESOLVED_SPEC_FILE).write_text(json.dumps(WorkerSpec(mode="command", command="true").to_dict()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.main", "--url", f"ws://127.0.0.1:{free_port()}/v1/agent",
        "--instance", "local-x", "--worker-dir", str(worker_dir), "--slots", "1", "--give-up-after", "1",
        env={**os.environ, "CLOUDTASK_AGENT_TOKEN": "t" * 32}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 3, out.decode()[-2000:]
    assert b"agent_gave_up" in out
