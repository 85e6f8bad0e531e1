"""SSH-tunnelled agents of a replica that dies are re-tunnelled by the new leader (issue 17,
docs/replicas.md): two cloudtaskd replicas as real processes on one real PostgreSQL, the ssh
provider against a real OpenSSH server (tests/fakes/sshd.py), no agents.public_url (so the agent
dials back through its launcher's SSH tunnel). Replica A launches the ssh instance and is SIGKILLed
mid-job; B becomes the leader, opens a tunnel of its own to the instance, rewrites its agent.url,
and the agent reconnects through it: the job ends with every task one result, on the same instance."""

from __future__ import annotations

import io
import json
import shutil
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cloudtaskd.fleet.bootstrap import SshTarget, connect, running_agents, stop_agent
from tests.conftest import wait_for
from tests.fakes import sshd as sshd_mod
from tests.integration.test_agent_failover import log_events
from tests.integration.test_replicas import _check_once, _done
from tests.procs import DaemonProcess, bundle, free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(0.05)\n    return data\n",
}


def _config(dsn: str, sshd: sshd_mod.Sshd) -> dict[str, Any]:
    host = {"address": "127.0.0.1", "port": sshd.port, "user": "root", "key_file": str(sshd.client_key), "cpus": 2}
    return {
        "database": dsn, "log_level": "info",
        "agents": {"listen_port": free_port(), "lease_ttl_s": 20},  # no public_url: tunnelled
        "providers": {"local": {"enabled": False}, "ssh": {"hosts": [host]}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 600, "max_instances": 1, "scale_up_after_s": 0},
        "queue": {"retry_backoff_s": 0.1},
    }


def _ssh_instances(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT id, state FROM instances WHERE provider = 'ssh' ORDER BY id").fetchall()]


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


@pytest.mark.skipif(sshd_mod.available() is not None, reason=str(sshd_mod.available()))
@pytest.mark.timeout(300)  # the first ssh bootstrap of a session builds the agent's runtime
async def test_the_survivor_retunnels_the_ssh_agent_of_a_killed_replica(tmp_path: Path, pg_dsn: str,
                                                                       sshd: sshd_mod.Sshd) -> None:
    n = 400
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = DaemonProcess(tmp_path / "a", _config(pg_dsn, sshd))
    b = DaemonProcess(tmp_path / "b", _config(pg_dsn, sshd))
    target = SshTarget("127.0.0.1", sshd.port, "root", sshd.client_key)
    try:
        await a.start()
        await wait_for(lambda: _logged(a, "leader_work_started"), timeout=20, message="A leads")
        (b.state_dir / "tls").mkdir(parents=True, mode=0o700)  # one CA: the agent pins it
        for name in ("ca.pem", "ca.key"):
            shutil.copy2(a.state_dir / "tls" / name, b.state_dir / "tls" / name)
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
        await wait_for(working, timeout=240, interval=0.2, message="the ssh agent working through A's tunnel")
        launched = _ssh_instances(pg_dsn)
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
        print(f"ssh agent leasing again through the survivor's tunnel {moved_s:.2f} s after the SIGKILL")

        await _done(b, int(job["id"]), timeout=120)
        await _check_once(b, pg_dsn, int(job["id"]), n)
        assert _ssh_instances(pg_dsn) == launched, "no second instance was launched for the host"
        assert [e["instances"] for e in log_events(b.log_path, "agents_retunnelled")] == [[inst]]
    finally:
        await a.stop()  # killed: its client session closed
        await b.stop()
        with suppress(Exception):
            conn, _ = await connect(target, instance="(test)", wait_s=5)
            async with conn:
                for left in await running_agents(conn):
                    await stop_agent(conn, left, grace_s=5)


async def _logged(daemon: DaemonProcess, event: str) -> bool:
    return bool(log_events(daemon.log_path, event))
