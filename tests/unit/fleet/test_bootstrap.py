"""Bootstrap over SSH against a real OpenSSH server on 127.0.0.1: install the agent and the worker,
run tasks through it, stop it; a second bootstrap is harmless; a wrong host key is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.bootstrap import (
    BootstrapLog,
    BootstrapSpec,
    HostKeyMismatch,
    SshTarget,
    bootstrap,
    connect,
    running_agents,
    stop_agent,
)
from cloudtaskd.fleet.providers.base import frame_args
from tests import paths
from tests.conftest import UnixApi, make_config, test_runtime, wait_for
from tests.fakes import sshd as sshd_mod
from tests.integration.test_daemon_e2e import finished, jsonl, results
from tests.procs import bundle

pytestmark = [
    pytest.mark.skipif(sshd_mod.available() is not None, reason=str(sshd_mod.available())),
    pytest.mark.timeout(300),  # a bootstrap installs aiohttp into a fresh virtualenv
]

WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n",
          "w.py": "import os\ndef run(task_id, data):\n    return {'n': data['n'], 'pid': os.getpid()}\n"}


async def test_bootstrap_runs_tasks_and_is_idempotent(tmp_path: Path, sshd: sshd_mod.Sshd) -> None:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    daemon = Daemon(config, shutdown_grace_s=2)
    await daemon.start()
    api = UnixApi(config.socket_path)
    inst: dict[str, Any] = {}
    target = SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key)
    try:
        bundle_path = tmp_path / "worker.tar.gz"
        bundle_path.write_bytes(bundle(WORKER))
        _, worker = await api.request("POST", "/v1/workers", data=bundle_path.read_bytes())
        _, inst = await api.request("POST", "/v1/instances", json={"worker": worker["digest"], "slots": 2})
        _, job = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks",
                          data=jsonl([{"id": i, "data": {"n": i}} for i in range(20)]).encode())
        spec = BootstrapSpec(inst["id"], inst["url"], inst["token"], 2, bundle_path, worker["spec"],
                             agent_args=frame_args(inst["max_message_bytes"]), ca_cert=inst["ca_cert"].encode())
        bootlog = BootstrapLog(tmp_path / "bootstrap.log")
        conn, host_key = await connect(target, instance=inst["id"], bootlog=bootlog)
        assert host_key.split()[:2] == sshd.public_host_key().split()[:2]  # what trust-on-first-use pins
        async with conn:
            pid = await bootstrap(conn, spec, bootlog, test_runtime())
            await wait_for(lambda: finished(api, job["id"]), timeout=60, message="job done on the ssh instance")
            res = await results(api, job["id"])
            assert {r["result"]["n"] for r in res.values()} == set(range(20))
            assert {r["result"]["pid"] for r in res.values()} == {pid}, "tasks ran in the bootstrapped agent"
            # A second bootstrap of the same instance is harmless: same agent, nothing restarted.
            assert await bootstrap(conn, spec, bootlog, test_runtime()) == pid
            assert inst["id"] in await running_agents(conn)
            token_mode = (await conn.run(f"stat -c %a .cloudtask/{inst['id']}/token", check=True)).stdout
            assert str(token_mode).strip() == "600"
            ps = (await conn.run("ps -eo args", check=True)).stdout
            assert inst["token"] not in str(ps), "the token must never be on a command line"
            # The agent reads frames as large as the daemon's largest task needs (issue 13).
            assert f"--max-message-bytes {inst['max_message_bytes']}" in str(ps)
            await stop_agent(conn, inst["id"], grace_s=5)
            assert inst["id"] not in await running_agents(conn)
        log_text = (tmp_path / "bootstrap.log").read_text()
        assert "agent.main" in log_text and inst["token"] not in log_text
    finally:
        await api.close()
        await daemon.stop()
        if inst:
            shutil.rmtree(Path("/root/.cloudtask") / inst["id"], ignore_errors=True)


async def test_pinned_host_key_mismatch_is_refused(tmp_path: Path, sshd: sshd_mod.Sshd) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = Path(f"{other}.pub").read_text().strip()
    target = SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key, host_key=wrong)
    with pytest.raises(HostKeyMismatch, match="does not match the pinned key"):
        await connect(target, instance="i-1", wait_s=5)
    # The right pinned key connects.
    right = replace(target, host_key=sshd.public_host_key())
    conn, _ = await connect(right, instance="i-1", wait_s=5)
    async with conn:
        assert str((await conn.run("echo ok", check=True)).stdout).strip() == "ok"


async def test_waits_for_ssh_then_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    from cloudtaskd.fleet.bootstrap import DeployError
    from tests.procs import free_port

    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    target = SshTarget("127.0.0.1", free_port(), "root", key)
    bootlog = BootstrapLog(tmp_path / "b.log")
    with pytest.raises(DeployError, match="did not answer within 3 s"):
        await asyncio.wait_for(connect(target, instance="i-2", wait_s=3, bootlog=bootlog), 20)
    assert "retrying" in (tmp_path / "b.log").read_text()


def test_cloudtaskctl_run_on_the_ssh_provider(tmp_path: Path, sshd: sshd_mod.Sshd) -> None:
    """The issue's check: `cloudtaskctl run` with localhost as the ssh host installs the agent and
    the worker, runs the tasks, and cleans up."""
    import os
    import sys

    import yaml

    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state),
        "scaling": {"tick_s": 0.2},
        "providers": {
            "local": {"enabled": False},
            "ssh": {"hosts": [{"address": "127.0.0.1", "port": sshd.port, "user": "root",
                               "key_file": str(sshd.client_key), "cpus": 2}]},
        },
    }))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(30)]))
    root = paths.ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "cloudtaskd.ctl", "run", "--tasks", str(tasks), "--worker",
         str(root / "examples" / "stream-worker"), "--config", str(config)],
        capture_output=True, text=True, timeout=110, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr + (state / "cloudtaskd.log").read_text()[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and all(r["status"] == "succeeded" for r in lines)
    assert {r["instance"].split("-")[0] for r in lines} == {"ssh"}
    assert lines[3]["result"] == {"square": 9}
    # Cleaned up: no agent left on the host, the host key pinned on first use.
    leftovers = [p for p in Path("/root/.cloudtask").glob("ssh-*")] if Path("/root/.cloudtask").exists() else []
    assert leftovers == []
    import sqlite3
    db = sqlite3.connect(state / "cloudtask.db")
    try:
        pinned = db.execute("SELECT key FROM host_keys").fetchall()
        states = db.execute("SELECT DISTINCT state FROM instances").fetchall()
    finally:
        db.close()
    assert len(pinned) == 1 and pinned[0][0].split()[:2] == sshd.public_host_key().split()[:2]
    assert states == [("stopped",)]


async def test_failed_bootstrap_keeps_its_log_and_stops_the_instance(tmp_path: Path, sshd: sshd_mod.Sshd) -> None:
    import os
    import sys

    from cloudtaskd.config import SshHostConfig, SshProviderConfig

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    host = SshHostConfig(address="127.0.0.1", port=sshd.port, user="root", key_file=str(stranger), cpus=1)
    config = replace(make_config(tmp_path), providers=ProvidersConfig(
        local=LocalProviderConfig(enabled=False), ssh=SshProviderConfig(hosts=(host,))))
    daemon = Daemon(config, shutdown_grace_s=2)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        _, worker = await api.request("POST", "/v1/workers", data=bundle(WORKER))
        _, job = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks", data=b'{"id": 1, "data": {"n": 1}}\n')

        async def failed() -> Any:
            _, body = await api.request("GET", "/v1/instances?all=1")
            done = [i for i in body["instances"] if i["state"] == "stopped" and i["last_error"]]
            return done[0] if done else None
        inst = await wait_for(failed, timeout=60, message="the failed launch recorded")
        assert "refused our key" in inst["last_error"]
        root = paths.ROOT
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloudtaskd.ctl", "instances", "--logs", inst["id"],
            "--socket", str(config.socket_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root)})
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert f"ssh root@127.0.0.1:{sshd.port}" in out.decode() and "permission denied" in out.decode()
        # The task is still queued, not lost, waiting for a host that works.
        _, j = await api.request("GET", f"/v1/jobs/{job['id']}")
        assert j["counts"]["queued"] == 1
    finally:
        await api.close()
        await daemon.stop()


async def test_instance_unpacks_by_the_agents_rules(tmp_path: Path, sshd: sshd_mod.Sshd) -> None:
    """The same rules on the instance's side: a hostile bundle that reached a machine some other
    way than the daemon's checks is refused there by `python3 -m agent.bundle`, nothing written
    outside the instance's directory; the step and the rule are in the error."""
    from cloudtaskd.fleet.bootstrap import DeployError
    from tests import hostile_bundles as hostile

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "existing.txt").write_text("original\n")
    hostile_path = tmp_path / "hostile.tar.gz"
    hostile_path.write_bytes(hostile.symlink_chain(str(outside)))
    inst = "i-hostile-bundle"
    spec = BootstrapSpec(inst, "ws://127.0.0.1:9/v1/agent", "token", 1, hostile_path, {"mode": "command"})
    conn, _ = await connect(SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key), instance=inst, wait_s=10)
    try:
        async with conn:
            with pytest.raises(DeployError, match=r"unpack: exit code 2: .*entry 'a': a symbolic link"):
                await bootstrap(conn, spec, BootstrapLog(tmp_path / "bootstrap.log"), test_runtime())
            listing = str((await conn.run(f"ls -A .cloudtask/{inst}", check=True)).stdout).split()
        assert "worker" not in listing and "worker.new" not in listing
        assert (outside / "existing.txt").read_text() == "original\n"
        assert sorted(p.name for p in outside.iterdir()) == ["existing.txt"]
    finally:
        shutil.rmtree(Path("/root/.cloudtask") / inst, ignore_errors=True)
