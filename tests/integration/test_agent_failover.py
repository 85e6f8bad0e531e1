"""An agent given several daemon URLs (agents.urls, issue 17): a real daemon process and a real agent
process (`python -m agent.main --url A --url B`), TLS on.

- Given an address that never answers first and the live daemon second, it connects and works
  (the dial to the first is not waited out).
- Connected to daemon A, which is then SIGKILLed, it moves to daemon B started on another port over
  the same state directory (SQLite: one daemon at a time; PostgreSQL replicas come later), listing
  its leases in the hello: B keeps them, the job ends with each task's one result, no lease expired
  and no attempt repeated.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import wait_for
from tests.integration.test_crash import connected_agents
from tests.procs import ROOT, DaemonProcess, bundle, free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(data['sleep'])\n"
            "    return data['n']\n",
}


def agent_url(port: int) -> str:
    return f"wss://127.0.0.1:{port}/v1/agent"


def daemon_config(port: int, urls: list[str]) -> dict[str, Any]:
    return {"log_level": "info", "agents": {"listen_port": port, "lease_ttl_s": 30, "urls": urls},
            "providers": {"local": {"enabled": False}}, "scaling": {"tick_s": 0.2}}


def use_config(daemon: DaemonProcess, config: dict[str, Any]) -> None:
    """The next start of `daemon` (same state directory) reads this config."""
    daemon.config_path.write_text(yaml.safe_dump({"state_dir": str(daemon.state_dir), "log_level": "warning",
                                                  **config}))


@contextmanager
def stalled_listener() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers on them: a
    daemon frozen or behind a black hole. A dial to it hangs until something gives up."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def start_agent(workdir: Path, daemon: DaemonProcess, inst: dict[str, Any], digest: str, urls: list[str],
                slots: int = 4) -> subprocess.Popen[bytes]:
    workdir.mkdir(exist_ok=True)
    (workdir / "ca.pem").write_text(inst["ca_cert"])
    with (workdir / "agent.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.main", *(arg for url in urls for arg in ("--url", url)),
             "--instance", inst["id"], "--worker-dir", str(daemon.state_dir / "workers" / digest),
             "--slots", str(slots), "--ca-file", str(workdir / "ca.pem")],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir, stdin=subprocess.DEVNULL,
            env={**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)})


def stop_agent(agent: subprocess.Popen[bytes] | None) -> None:
    if agent is not None and agent.poll() is None:
        agent.kill()
        agent.wait()


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            out.append(entry)
    return out


async def submit(daemon: DaemonProcess, digest: str, n: int, sleep_s: float) -> int:
    job = await daemon.post("/v1/jobs", json={"name": "failover", "worker": digest})
    body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i, "sleep": sleep_s}}) + "\n" for i in range(n))
    await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=body.encode())
    return int(job["id"])


async def finish_exactly_once(daemon: DaemonProcess, job_id: int, n: int) -> None:
    async def done() -> Any:
        j = await daemon.get(f"/v1/jobs/{job_id}")
        return j if j["done"] else None
    j = await wait_for(done, timeout=120, message="the job done")
    assert j["counts"]["succeeded"] == n, j["counts"]
    results = [json.loads(line) for line in (await daemon.get(f"/v1/jobs/{job_id}/results")).splitlines()]
    assert sorted(r["id"] for r in results) == sorted(f"t{i}" for i in range(n)), "a task missing or twice"
    assert all(r["result"] == int(r["id"][1:]) and r["attempts"] == 1 for r in results), \
        "a task was run again: its lease was lost instead of reclaimed"


def event_counts(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
    finally:
        db.close()


async def test_an_agent_given_a_stalled_url_first_connects_to_the_live_daemon(tmp_path: Path) -> None:
    port = free_port()
    daemon = DaemonProcess(tmp_path, daemon_config(port, []))
    agent: subprocess.Popen[bytes] | None = None
    with stalled_listener() as stalled:
        await daemon.start()
        try:
            worker = await daemon.post("/v1/workers", data=bundle(WORKER))
            inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": 4})
            assert inst["urls"] == [inst["url"]] == [agent_url(port)]
            job_id = await submit(daemon, worker["digest"], 200, 0.01)
            # One comma-separated list (the flag's other form): the stalled address first.
            agent = start_agent(tmp_path / "agent", daemon, inst, worker["digest"],
                                [f"{agent_url(stalled)},{inst['url']}"])
            await finish_exactly_once(daemon, job_id, 200)
            connected = log_events(tmp_path / "agent" / "agent.log", "agent_connected")
            assert [c["url"] for c in connected] == [agent_url(port)], connected
        finally:
            stop_agent(agent)
            await daemon.stop()


@pytest.mark.timeout(300)
async def test_agent_moves_to_the_next_daemon_when_its_daemon_is_killed_keeping_its_leases(tmp_path: Path) -> None:
    n = 2000
    port_a, port_b = free_port(), free_port()
    urls = [agent_url(port_a), agent_url(port_b)]
    daemon = DaemonProcess(tmp_path, daemon_config(port_a, urls))
    await daemon.start()
    agent: subprocess.Popen[bytes] | None = None
    agent_log = tmp_path / "agent" / "agent.log"
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": 8})
        assert inst["urls"] == urls, "this daemon's URL first, then the other replica's"
        job_id = await submit(daemon, worker["digest"], n, 0.02)
        agent = start_agent(tmp_path / "agent", daemon, inst, worker["digest"], inst["urls"], slots=8)

        async def working() -> bool:
            j = await daemon.get(f"/v1/jobs/{job_id}")
            return bool(j["counts"]["succeeded"] >= n // 4 and j["counts"]["leased"] > 0)
        await wait_for(working, timeout=60, message="the agent working through the job on daemon A")

        daemon.kill()  # daemon A: SIGKILL, its leases left in the state as they were
        db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
        try:
            in_flight = db.execute("SELECT count(*) FROM tasks WHERE state = 'leased'").fetchone()[0]
        finally:
            db.close()
        assert in_flight > 0, "the kill should catch leases in flight"

        # Daemon B: another port, the same state directory.
        use_config(daemon, daemon_config(port_b, urls))
        await daemon.start()

        async def on_b() -> bool:
            return await connected_agents(daemon) == 1
        await wait_for(on_b, timeout=60, message="the agent connected to daemon B")
        await finish_exactly_once(daemon, job_id, n)
        assert agent.poll() is None, "the same agent process carried on (not restarted)"
    finally:
        stop_agent(agent)
        await daemon.stop()

    connected = log_events(agent_log, "agent_connected")
    assert [c["url"] for c in connected] == urls, connected
    # Dropped on B: only tasks whose result A committed but had not acknowledged when it died (the
    # agent lists them so the lease holds for the resent report); each still has one result above.
    assert connected[1]["kept"] > 0, "B kept the leases the hello listed"
    kinds = event_counts(daemon.state_dir / "cloudtask.db")
    assert kinds.get("lease_expired", 0) == 0, kinds
    assert kinds.get("stale_report_refused", 0) == 0, kinds
    assert kinds["task_succeeded"] == n
    # Every grant ran once or came back unstarted (a grant cut off in flight); none was granted twice.
    assert kinds["lease_granted"] == n + kinds.get("lease_handed_back", 0), kinds
