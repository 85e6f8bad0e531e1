"""A service stop or restart keeps remote instances: their agents hold their leases through the
downtime, reconnect, and every task ends with one result and no attempt counted as failed. Only
the local provider's agents (processes on the control host) are drained and stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import (
    AgentsConfig,
    LocalProviderConfig,
    ProvidersConfig,
    ScalingConfig,
    SshHostConfig,
    SshProviderConfig,
)
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.bootstrap import SshTarget, connect, running_agents, stop_agent
from tests import paths
from tests.conftest import UnixApi, make_config, wait_for
from tests.fakes import sshd as sshd_mod
from tests.integration.test_daemon_e2e import finished, jsonl, results
from tests.integration.test_service import events
from tests.procs import DaemonProcess, bundle, free_port

ROOT = paths.ROOT

SLOW_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(data['sleep'])\n"
            "    return data['n']\n",
}


def task_events(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT kind, count(*) FROM events WHERE task_id IS NOT NULL GROUP BY kind"))
    finally:
        db.close()


def instance_states(db_path: Path) -> dict[str, str]:
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT id, state FROM instances"))
    finally:
        db.close()


def assert_nothing_failed(db_path: Path, n: int) -> None:
    """Every task succeeded once, and no lease expired or failed on the way (a hand-back is free)."""
    kinds = task_events(db_path)
    assert kinds.get("task_succeeded") == n, kinds
    for kind in ("lease_expired", "lease_expired_dead", "task_failed", "task_dead", "stale_report_refused"):
        assert kinds.get(kind, 0) == 0, kinds
    assert kinds["lease_granted"] == n + kinds.get("lease_handed_back", 0), kinds


async def test_sigterm_keeps_an_external_agent_and_its_leases_until_the_daemon_is_back(tmp_path: Path) -> None:
    config = {"log_level": "info", "agents": {"listen_port": free_port(), "lease_ttl_s": 30},
              "providers": {"local": {"enabled": False}}, "scaling": {"tick_s": 0.2}}
    daemon = DaemonProcess(tmp_path, config)
    await daemon.start()
    agent: subprocess.Popen[bytes] | None = None
    agent_log = tmp_path / "agent.log"
    n = 40
    try:
        worker = await daemon.post("/v1/workers", data=bundle(SLOW_WORKER))
        inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": 4})
        job = await daemon.post("/v1/jobs", json={"name": "restart", "worker": worker["digest"]})
        await daemon.post(f"/v1/jobs/{job['id']}/tasks",
                          data=jsonl([{"id": f"t{i}", "data": {"n": i, "sleep": 0.3}} for i in range(n)]).encode())
        (tmp_path / "agent").mkdir()
        ca = tmp_path / "agent" / "ca.pem"
        ca.write_text(inst["ca_cert"])
        with agent_log.open("wb") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.main", "--url", inst["url"], "--instance", inst["id"],
                 "--worker-dir", str(daemon.state_dir / "workers" / worker["digest"]), "--slots", "4",
                 "--ca-file", str(ca)],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path / "agent", stdin=subprocess.DEVNULL,
                env={**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)})

        async def working() -> bool:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return bool(j["counts"]["succeeded"] >= 8 and j["counts"]["leased"] > 0)
        await wait_for(working, timeout=60, message="the agent working through the job")

        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 60) == 0
        log = events(daemon.log_path)
        assert log[-1]["event"] == "daemon_stopped"
        assert [e for e in log if e.get("event") == "daemon_stopping"][-1]["keep_remote"] is True
        assert not [e for e in log if e.get("level") == "error" or "raw" in e], log

        # Down: the instance is still running as far as the state goes, its leases still held, and
        # the agent runs on, trying to reconnect.
        db_path = daemon.state_dir / "cloudtask.db"
        assert instance_states(db_path) == {inst["id"]: "running"}
        db = sqlite3.connect(db_path)
        try:
            leased = db.execute("SELECT count(*) FROM tasks WHERE state = 'leased'").fetchone()[0]
        finally:
            db.close()
        assert leased > 0, "the stop should have caught leases in flight"

        async def reconnecting() -> bool:
            text = agent_log.read_text()
            return "agent_connect_failed" in text or "connection closed" in text
        await wait_for(reconnecting, message="the agent trying to reconnect")
        assert agent.poll() is None, agent_log.read_text()[-2000:]

        await daemon.start()
        j = await wait_for(lambda: _finished(daemon, job["id"]), timeout=90, message="the job done after the restart")
        assert j["counts"]["succeeded"] == n
        text = await daemon.get(f"/v1/jobs/{job['id']}/results")
        res = [json.loads(line) for line in text.splitlines()]
        assert sorted(r["result"] for r in res) == list(range(n))
        assert {r["attempts"] for r in res} == {1} and {r["instance"] for r in res} == {inst["id"]}
        assert agent_log.read_text().count('"agent_connected"') >= 2, "the agent never reconnected"
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)  # it drains and exits
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        assert await daemon.stop() == 0
    assert_nothing_failed(daemon.state_dir / "cloudtask.db", n)


async def _finished(daemon: DaemonProcess, job_id: int) -> Any:
    j = await daemon.get(f"/v1/jobs/{job_id}")
    return j if j["done"] else None


# ---- the ssh provider (remote) beside the local one ----

@pytest.mark.skipif(sshd_mod.available() is not None, reason=str(sshd_mod.available()))
@pytest.mark.timeout(300)  # the ssh instance's bootstrap installs aiohttp into a fresh virtualenv
async def test_service_stop_keeps_ssh_instances_running_and_stops_local_ones(tmp_path: Path,
                                                                            sshd: sshd_mod.Sshd) -> None:
    host = SshHostConfig(address="127.0.0.1", port=sshd.port, user="root", key_file=str(sshd.client_key), cpus=2)
    config = make_config(
        tmp_path,
        # A fixed agent port: the remote agent dials the same address after the restart.
        agents=AgentsConfig(listen_port=free_port(), lease_ttl_s=30),
        scaling=ScalingConfig(tick_s=0.1, idle_timeout_s=60, max_instances=2, scale_up_after_s=0),
        providers=ProvidersConfig(local=LocalProviderConfig(max_instances=1, cpus=2),
                                  ssh=SshProviderConfig(hosts=(host,))))
    target = SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key)
    db_path = config.state_path / "cloudtask.db"
    n = 300
    daemon = Daemon(config, shutdown_grace_s=10)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        _, worker = await api.request("POST", "/v1/workers", data=bundle(SLOW_WORKER))
        _, job = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks",
                          data=jsonl([{"id": f"t{i}", "data": {"n": i, "sleep": 0.2}} for i in range(n)]).encode())

        async def both_working() -> dict[str, str] | None:
            _, body = await api.request("GET", "/v1/instances")
            running = {i["provider"]: i["id"] for i in body["instances"] if i["state"] == "running" and i["leases"]}
            return running if {"ssh", "local"} <= running.keys() else None
        running = await wait_for(both_working, timeout=200, message="an ssh and a local instance holding leases")
        ssh_id, local_id = running["ssh"], running["local"]

        await daemon.stop(keep_remote=True)
        await api.close()
        states = instance_states(db_path)
        assert states[ssh_id] == "running", "a service stop must leave remote instances running"
        assert states[local_id] == "stopped", "the local agent dies with the service: drained and stopped"
        conn, _ = await connect(target, instance="(test)")
        async with conn:
            assert ssh_id in await running_agents(conn), "the ssh agent was stopped"
        assert not list((config.state_path / "local").glob("*.json")), "a local agent was left running"

        daemon = Daemon(config, shutdown_grace_s=10)
        await daemon.start()
        api = UnixApi(config.socket_path)
        await wait_for(lambda: finished(api, job["id"]), timeout=200, message="the job done after the restart")
        res = await results(api, job["id"])
        assert sorted(r["result"] for r in res.values()) == list(range(n))
        assert {r["attempts"] for r in res.values()} == {1}
        db = sqlite3.connect(db_path)
        try:
            # The same ssh instance went on after the restart (no second one was launched for the host).
            ssh_rows = db.execute("SELECT id FROM instances WHERE provider = 'ssh'").fetchall()
            restarted_at = db.execute(
                "SELECT max(ts) FROM events WHERE kind = 'lease_granted' AND instance_id = ?", (ssh_id,)).fetchone()[0]
            stopped_at = db.execute("SELECT ts FROM events WHERE kind = 'instance_terminated'"
                                    " AND instance_id = ?", (local_id,)).fetchone()[0]
        finally:
            db.close()
        assert ssh_rows == [(ssh_id,)]
        assert restarted_at > stopped_at, "the ssh agent took no new lease from the restarted daemon"
    finally:
        await api.close()
        await daemon.stop()  # the default: everything stopped, the ssh agent too
        with suppress(Exception):
            conn, _ = await connect(target, instance="(test)", wait_s=5)
            async with conn:
                for inst in await running_agents(conn):
                    if inst in instance_states(db_path):
                        await stop_agent(conn, inst, grace_s=5)
    assert_nothing_failed(db_path, n)
    assert set(instance_states(db_path).values()) == {"stopped"}


async def test_a_launch_cut_short_by_the_stop_is_recorded_as_failed(tmp_path: Path) -> None:
    """The stop cancels a launch in progress (here an ssh host that accepts and never speaks): its
    row must not stay PENDING, which no later daemon would ever resolve."""
    import asyncssh

    key = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    held: list[asyncio.StreamWriter] = []  # connections accepted (the sync's list, the launch), never answered

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    host = SshHostConfig(address="127.0.0.1", port=port, user="root", key_file=str(key), cpus=1,
                         host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
    config = make_config(tmp_path, providers=ProvidersConfig(local=LocalProviderConfig(enabled=False),
                                                             ssh=SshProviderConfig(hosts=(host,))))
    daemon = Daemon(config, shutdown_grace_s=1)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        _, worker = await api.request("POST", "/v1/workers", data=bundle(SLOW_WORKER))
        _, job = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks", data=jsonl([{"id": 1, "data": {"n": 1, "sleep": 0}}]))

        async def launching() -> bool:
            return list(instance_states(config.state_path / "cloudtask.db").values()) == ["pending"]
        await wait_for(launching, message="the launch under way")
        await wait_for(lambda: _true(len(held) >= 2), message="the launch connecting to the host")
    finally:
        await api.close()
        await daemon.stop(keep_remote=True)
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    db = sqlite3.connect(config.state_path / "cloudtask.db")
    try:
        rows = db.execute("SELECT state, last_error FROM instances").fetchall()
    finally:
        db.close()
    assert rows == [("stopped", "the daemon stopped during the launch")]


async def _true(value: bool) -> bool:
    return value
