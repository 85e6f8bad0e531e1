"""SSH-tunnelled agents of a replica that dies are re-tunnelled by the new leader (issue 17,
docs/replicas.md): two cloudtaskd replicas as real processes on one real PostgreSQL, no
agents.public_url (so the agent dials back through its launcher's SSH tunnel). Replica A launches
the instance and is SIGKILLed mid-job; B becomes the leader, opens a tunnel of its own to the
instance, rewrites its agent.url, and the agent reconnects through it: the job ends with every
task one result, on the same instance.

One test, two providers:
- `ssh`: the ssh provider against a real OpenSSH server on this host (tests/fakes/sshd.py);
- `aws`: the aws provider against moto as a real HTTP server (tests/fakes/moto_ec2.py), the VM
  being a foreign host (tests/fakes/foreign_host.py: a Debian 11 root with its own Python 3.9 in a
  network namespace of its own, reached through `ssh_address_override`), its host key pinned from
  the console output. Neither a second VM is launched nor the first terminated (moto's own list).

GCP and Azure are not run here: they take the same path as aws. Every cloud is a `CloudProvider`
(fleet/providers/cloud.py, built by descriptors.cloud()) around its driver, and the retunneller
reaches an instance through `CloudProvider.ssh` (driver.get for the VM, the pinned host key from the
instance row, ssh_address_override): only driver.get differs per cloud, and it finds the VM by the
daemon id the replicas share through the database."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cloudtaskd.fleet.bootstrap import SshTarget, connect, running_agents, stop_agent
from tests.conftest import wait_for
from tests.fakes import foreign_host as fh
from tests.fakes import sshd as sshd_mod
from tests.fakes.moto_ec2 import MotoEc2
from tests.integration.test_agent_failover import log_events
from tests.integration.test_replicas import _check_once, _done
from tests.procs import DaemonProcess, bundle, free_port, share_ca

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(0.05)\n    return data\n",
}
REGION = "us-east-1"


@dataclass
class Machine:
    """Where the tunnelled agent runs, as both replicas' `providers` section reaches it."""
    provider: str
    section: dict[str, Any]
    shell: Callable[[str], str]  # a shell command on the machine, as root: its stdout
    moto: MotoEc2 | None = None


@pytest.fixture(params=["ssh", "aws"])
async def machine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Machine]:
    if request.param == "ssh":
        if sshd_mod.available() is not None:
            pytest.skip(str(sshd_mod.available()))
        sshd: sshd_mod.Sshd = request.getfixturevalue("sshd")
        host = {"address": "127.0.0.1", "port": sshd.port, "user": "root", "key_file": str(sshd.client_key), "cpus": 2}
        yield Machine("ssh", {"hosts": [host]}, _local_shell)
        with suppress(Exception):  # the agent it left (the foreign host's namespace is killed whole)
            conn, _ = await connect(SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key),
                                    instance="(test)", wait_s=5)
            async with conn:
                for left in await running_agents(conn):
                    await stop_agent(conn, left, grace_s=5)
        return
    if fh.unavailable() is not None:
        pytest.skip(str(fh.unavailable()))
    from tests.unit.fleet.test_aws import console_with_keys, moto_image

    request.getfixturevalue("creds")  # the replicas inherit the environment's fake AWS credentials
    moto: MotoEc2 = request.getfixturevalue("moto")
    with fh.foreign_host(tmp_path / "vm") as host:
        moto.reset()
        moto.console = console_with_keys(host.public_host_key())  # the host key, pinned before connecting
        section = {"enabled": True, "region": REGION, "max_instances": 1, "machine_type": "t3.micro", "cpus": 2,
                   "spot": False, "image": await moto_image(moto), "endpoint_url": moto.url, "ssh_user": "root",
                   "ssh_key_file": str(host.client_key), "ssh_address_override": f"{host.address}:22"}
        yield Machine("aws", section, lambda cmd: host.run(cmd).stdout, moto)


def _local_shell(command: str) -> str:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60).stdout


def _config(dsn: str, machine: Machine) -> dict[str, Any]:
    return {
        "database": dsn, "log_level": "info",
        "agents": {"listen_port": free_port(), "lease_ttl_s": 20},  # no public_url: tunnelled
        "providers": {"local": {"enabled": False}, machine.provider: machine.section},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 600, "max_instances": 1, "scale_up_after_s": 0},
        "queue": {"retry_backoff_s": 0.1},
    }


def _instances(dsn: str, provider: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT id, state FROM instances WHERE provider = %s ORDER BY id", (provider,)).fetchall()]


def _last_event(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        return int(row[0]) if row is not None else 0


def _granted_since(dsn: str, instance_id: str, event_id: int) -> int:
    """Leases granted to the instance after that event (the killed replica wrote none after its kill)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE kind = 'lease_granted' AND instance_id = %s"
                           " AND id > %s", (instance_id, event_id)).fetchone()
        return int(row[0]) if row is not None else 0


def _moto_vms(moto: MotoEc2) -> list[tuple[str, str]]:
    """Every VM moto holds, whoever launched it and in any state: (instance id tag, state)."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto.url)
    out = []
    for reservation in ec2.describe_instances()["Reservations"]:
        for inst in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            out.append((tags.get("cloudtask-instance", ""), inst["State"]["Name"]))
    return out


# The first ssh bootstrap of a session builds the agent's runtime; the aws one on the foreign host
# builds its own for Python 3.9 (and the host's root on a fresh machine, unless .ci/run did).
@pytest.mark.timeout(600)
async def test_the_survivor_retunnels_the_agent_of_a_killed_replica(tmp_path: Path, pg_dsn: str,
                                                                   machine: Machine) -> None:
    n = 400
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = DaemonProcess(tmp_path / "a", _config(pg_dsn, machine))
    b = DaemonProcess(tmp_path / "b", _config(pg_dsn, machine))
    try:
        await a.start()
        await wait_for(lambda: _logged(a, "leader_work_started"), timeout=20, message="A leads")
        share_ca(a, b)  # one CA: the agent pins it
        await b.start()
        digest = ""
        for d in (a, b):
            digest = (await d.post("/v1/workers", data=bundle(WORKER)))["digest"]
        job = await a.post("/v1/jobs", json={"name": "retunnel", "worker": digest, "max_attempts": 1})
        body = "".join(json.dumps({"id": f"t{i}", "data": i}) + "\n" for i in range(n)).encode()
        await a.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))

        async def working() -> bool:
            j = await b.get(f"/v1/jobs/{job['id']}")
            return bool(j["counts"]["succeeded"] >= 20)
        await wait_for(working, timeout=400, interval=0.2,
                       message=f"the {machine.provider} agent working through A's tunnel")
        launched = _instances(pg_dsn, machine.provider)
        assert len(launched) == 1 and launched[0][1] == "running", launched
        inst = launched[0][0]
        assert (await b.get(f"/v1/jobs/{job['id']}"))["counts"]["succeeded"] < n, "the kill should come mid-job"

        a.kill()
        killed_at, last = time.monotonic(), _last_event(pg_dsn)
        await wait_for(lambda: _logged(b, "agents_retunnelled"), timeout=30, interval=0.1,
                       message="B re-tunnels the orphaned agent")

        async def back() -> float | None:
            return time.monotonic() - killed_at if _granted_since(pg_dsn, inst, last) else None
        moved_s = await wait_for(back, timeout=30, interval=0.1, message="the agent leasing from B")
        print(f"{machine.provider} agent leasing again through the survivor's tunnel {moved_s:.2f} s after the SIGKILL")

        await _done(b, int(job["id"]), timeout=120)
        await _check_once(b, pg_dsn, int(job["id"]), n)
        assert _instances(pg_dsn, machine.provider) == launched, "no second instance was launched, none ended"
        assert [e["instances"] for e in log_events(b.log_path, "agents_retunnelled")] == [[inst]]
        # The agent read B's tunnel from its rewritten agent.url and connected through it.
        agent_log = machine.shell(f"cat /root/.cloudtask/{inst}/agent.log")
        assert '"agent_url_changed"' in agent_log and agent_log.count('"agent_connected"') >= 2, agent_log[-2000:]
        if machine.moto is not None:
            assert _moto_vms(machine.moto) == [(inst, "running")], "EC2: one VM, never launched again or ended"
            assert machine.moto.calls["RunInstances"] == 1 and machine.moto.calls["TerminateInstances"] == 0
    finally:
        await a.stop()  # killed: its client session closed
        await b.stop()


async def _logged(daemon: DaemonProcess, event: str) -> bool:
    return bool(log_events(daemon.log_path, event))
