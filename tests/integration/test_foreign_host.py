"""What runs on an instance, run on a host that is not the control host: a Debian 11 root with its
own python3 (3.9, no venv module's ensurepip, no pip), its own network namespace and loopback, no
internet (tests/fakes/foreign_host.py). `cloudtaskctl run` on the ssh provider bootstraps the agent there
and runs a whole job; the worker's setup and its processes run in the agent's environment."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, wait_for
from tests.fakes import foreign_host as fh

pytestmark = [
    pytest.mark.skipif(fh.unavailable() is not None, reason=str(fh.unavailable())),
    # The first run of a fresh machine builds the Debian root (~80 s) unless .ci/run did.
    pytest.mark.timeout(600),
]

WORKER = {
    "cloudtask.yaml": (
        "mode: command\n"
        "command: python3 worker.py\n"
        # The setup runs where the worker will: the agent's venv, its pip (no internet needed to ask).
        "setup: python3 -c 'import sys; assert sys.prefix != sys.base_prefix, sys.prefix' && pip --version > pip.txt\n"
    ),
    "worker.py": (
        "import json, socket, sys\n"
        "task = json.load(sys.stdin)\n"
        "pip = open('pip.txt').read().split()[1]\n"
        "print(json.dumps({'n': task['data']['n'] ** 2, 'python': sys.version.split()[0], 'prefix': sys.prefix,"
        " 'pip': pip, 'host': socket.gethostname()}))\n"
    ),
}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[fh.ForeignHost]:
    with fh.foreign_host(tmp_path / "vm") as h:
        yield h


def test_cloudtaskctl_run_on_a_foreign_host(tmp_path: Path, host: fh.ForeignHost) -> None:
    assert host.python_version().startswith("3.9."), "the foreign host must have its own, older python3"
    assert host.run("python3 -c 'import ensurepip'").returncode != 0, "no ensurepip, as on the clouds' images"
    assert host.run("command -v pip pip3").returncode != 0, "no pip, as on the clouds' images"
    worker = tmp_path / "worker"
    worker.mkdir()
    for name, text in WORKER.items():
        (worker / name).write_text(text)
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state),
        "scaling": {"tick_s": 0.2},
        # No agents section: the daemon listens on our 127.0.0.1 only, which the foreign host cannot
        # reach (its 127.0.0.1 is its own); its agent comes through the SSH tunnel.
        "providers": {
            "local": {"enabled": False},
            "ssh": {"hosts": [{"address": host.address, "port": 22, "user": "root", "key_file": str(host.client_key),
                               "cpus": 2, "host_key": host.public_host_key()}]},
        },
    }))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(12)))
    proc = subprocess.run(
        [sys.executable, "-m", "cloudtaskd.ctl", "run", "--tasks", str(tasks), "--worker", str(worker),
         "--config", str(config)],
        capture_output=True, text=True, timeout=90, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    logs = sorted(state.glob("instances/*/bootstrap.log"))
    detail = proc.stderr[-3000:] + "".join(p.read_text()[-3000:] for p in logs)
    assert proc.returncode == 0, detail
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(r["status"] == "succeeded" for r in lines), lines
    results = [r["result"] for r in lines]
    assert sorted(r["n"] for r in results) == [i * i for i in range(12)]
    # Ran on the foreign host's own 3.9, inside the agent's venv, with the runtime's pip.
    assert {r["python"] for r in results} == {host.python_version()}
    assert all(r["prefix"].endswith("/venv") for r in results), results[0]
    assert all(r["pip"] for r in results)
    log = "".join(p.read_text() for p in logs)
    assert "# agent tunnel: wss://127.0.0.1:" in log, log[-2000:]
    # Cleaned up: no agent left in the namespace but sshd.
    leftovers = host.run("ls /root/.cloudtask").stdout.split()
    assert [d for d in leftovers if d.startswith("ssh-")] == [], leftovers


async def test_daemon_killed_mid_job_tunnels_come_back_and_each_task_runs_once(
        tmp_path: Path, host: fh.ForeignHost) -> None:
    """SIGKILL the daemon while the foreign host's agent works through its tunnel: the restarted
    daemon (on a new agent port: listen_port 0, as the example config) sets the tunnel up again, the
    agent reads the new port from agent.url and reconnects with its leases, and the job finishes
    with every task recorded once."""
    from tests.integration.test_crash import connected_agents, running_ids
    from tests.procs import DaemonProcess, bundle

    daemon = DaemonProcess(tmp_path, {
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 120},
        "agents": {"lease_ttl_s": 20},
        "providers": {
            "local": {"enabled": False},
            "ssh": {"hosts": [{"address": host.address, "port": 22, "user": "root", "key_file": str(host.client_key),
                               "cpus": 2, "host_key": host.public_host_key()}]},
        },
    })
    n = 60
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle({
            "cloudtask.yaml": "mode: command\ncommand: python3 w.py\n",
            "w.py": "import json, sys, time\nt = json.load(sys.stdin)\ntime.sleep(0.2)\n"
                    "print(json.dumps(t['data']['n']))\n"}))
        job = await daemon.post("/v1/jobs", json={"worker": worker["digest"], "max_attempts": 10})
        await daemon.post(f"/v1/jobs/{job['id']}/tasks",
                          data="".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(n)).encode())

        async def progress(at_least: int) -> bool:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return bool(j["counts"]["succeeded"] >= at_least)
        await wait_for(lambda: progress(n // 4), timeout=120, message="a quarter done through the tunnel")
        before = await running_ids(daemon)
        assert len(before) == 1
        daemon.kill()
        await daemon.start()

        async def back() -> bool:
            return await running_ids(daemon) == before and await connected_agents(daemon) == 1
        await wait_for(back, timeout=90, message="the same agent back through a new tunnel")
        await wait_for(lambda: progress(n), timeout=180, message="the job finished after the restart")
        results = [json.loads(line) for line in (await daemon.get(f"/v1/jobs/{job['id']}/results")).splitlines()]
    finally:
        await daemon.stop()
    assert sorted(r["result"] for r in results) == list(range(n))
    db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
    try:
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == n
        once = db.execute("SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
                          " GROUP BY task_id HAVING count(*) != 1)").fetchone()[0]
        assert once == 0
    finally:
        db.close()
    # The restarted daemon's tunnel listens on another port; the agent read it from agent.url.
    agent_log = host.run("cat /root/.cloudtask/ssh-*/agent.log").stdout
    assert agent_log.count('"agent_connected"') >= 2 and '"agent_url_changed"' in agent_log, agent_log[-2000:]


@pytest.mark.usefixtures("creds")
async def test_a_job_on_aws_runs_on_a_foreign_host(tmp_path: Path, host: fh.ForeignHost, moto: Any) -> None:
    """The AWS path end to end on a machine that is not the control host: the daemon launches the VM
    in (emulated) EC2, pins the host key from the console output, bootstraps the foreign host
    (reached through the documented ssh_address_override) through its tunnel, runs the job there on
    its Python 3.9, and terminates the idle VM."""
    from cloudtaskd.config import AwsProviderConfig, LocalProviderConfig, ProvidersConfig
    from cloudtaskd.daemon import Daemon
    from tests.cloud_e2e import CloudRun
    from tests.conftest import UnixApi, make_config
    from tests.unit.fleet.test_aws import console_with_keys, moto_image

    moto.reset()
    moto.console = console_with_keys(host.public_host_key())
    aws = AwsProviderConfig(enabled=True, max_instances=1, machine_type="t3.micro", cpus=2, spot=False,
                            image=await moto_image(moto), endpoint_url=moto.url, ssh_user="root",
                            ssh_key_file=str(host.client_key), ssh_address_override=f"{host.address}:22")
    config = replace(make_config(tmp_path, idle_timeout_s=0.5),
                     providers=ProvidersConfig(local=LocalProviderConfig(enabled=False), aws=aws))
    daemon = Daemon(config, shutdown_grace_s=5)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        run = CloudRun(daemon, api, None)  # type: ignore[arg-type]  # no local sshd: the foreign host's
        res = await run.job("[d['n'] * 3, __import__('sys').version.split()[0]]", 20, timeout=240)
        assert sorted(r["result"][0] for r in res.values()) == [3 * i for i in range(20)]
        assert {r["result"][1] for r in res.values()} == {host.python_version()}
        assert {r["instance"].split("-")[0] for r in res.values()} == {"aws"}
        rows = await run.instance_rows("aws")
        assert [r["host_key"] for r in rows] == [" ".join(host.public_host_key().split()[:2])]

        async def terminated() -> bool:
            return all(r["state"] == "stopped" for r in await run.instance_rows("aws"))
        await run.until(terminated, "the idle VM terminated", timeout=60)
    finally:
        await api.close()
        await daemon.stop()


async def test_a_dropped_ssh_connection_brings_the_tunnel_back(tmp_path: Path, host: fh.ForeignHost) -> None:
    """The SSH connection that carries an agent's tunnel is cut (its sshd session process killed on
    the host, as a network blip or an sshd restart would): the daemon connects again with the pinned
    key, forwards a new port, writes it to agent.url, and the agent reconnects and finishes the job."""
    from cloudtaskd.config import LocalProviderConfig, ProvidersConfig, SshHostConfig, SshProviderConfig
    from cloudtaskd.daemon import Daemon
    from tests.conftest import UnixApi, make_config

    ssh_host = SshHostConfig(address=host.address, port=22, user="root", key_file=str(host.client_key), cpus=2,
                             host_key=host.public_host_key())
    config = replace(make_config(tmp_path, idle_timeout_s=60), providers=ProvidersConfig(
        local=LocalProviderConfig(enabled=False), ssh=SshProviderConfig(hosts=(ssh_host,))))
    daemon = Daemon(config, shutdown_grace_s=5)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        from tests.integration.test_daemon_e2e import finished, jsonl, results
        from tests.procs import bundle

        _, worker = await api.request("POST", "/v1/workers", data=bundle({
            "cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(i, d):\n    return d['n']\n"}))

        async def job(n: int) -> dict[str, Any]:
            _, j = await api.request("POST", "/v1/jobs", json={"worker": worker["digest"]})
            await api.request("POST", f"/v1/jobs/{j['id']}/tasks",
                              data=jsonl([{"id": i, "data": {"n": i}} for i in range(n)]).encode())
            await wait_for(lambda: finished(api, j["id"]), timeout=120, message=f"job {j['id']} finished")
            return await results(api, j["id"])

        first = await job(4)
        assert sorted(r["result"] for r in first.values()) == [0, 1, 2, 3]
        assert daemon.tunnels is not None
        (inst,) = daemon.tunnels.ports()
        # sshd's per-connection processes on the host: everything in its namespace named sshd but
        # the listener.
        listener = int((host.root / "run" / "sshd-ct.pid").read_text())
        sessions = [p for p in host.net.pids() if p != listener
                    and Path(f"/proc/{p}/comm").read_text().strip() == "sshd"]
        assert sessions, "no sshd session process found for the tunnel"
        for pid in sessions:
            os.kill(pid, 9)

        async def moved() -> bool:
            tunnels = daemon.tunnels
            return tunnels is not None and tunnels.opened(inst) >= 2 and inst in daemon.dispatcher.sessions
        await wait_for(moved, timeout=60, message="the tunnel set up again and the agent back through it")
        second = await job(6)
        assert sorted(r["result"] for r in second.values()) == list(range(6))
        assert {r["instance"] for r in second.values()} == {inst}, "the same agent, not a replacement"
    finally:
        await api.close()
        await daemon.stop()
