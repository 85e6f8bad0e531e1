"""The daemon on PostgreSQL (`database: postgresql://…`, issue 17), one replica, as a real process
with local agents: a job of a few thousand tasks to its end with one result each, counters checked
against the rows; a SIGKILL mid-job and a start on the same database finish it with nothing lost or
doubled; cancel, retry and delete of a job. The password comes through ${VAR} and shows nowhere."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from cloudtaskd.core.pg.dbapi import PgDb, row_factory
from cloudtaskd.core.tables import tasks as queue
from tests.conftest import wait_for
from tests.fakes.postgres import PASSWORD
from tests.procs import DaemonProcess, bundle, free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": ("import asyncio\n"
             "async def run(task_id, data):\n"
             "    if data.get('slow'):\n"
             "        await asyncio.sleep(30)\n"
             "    return data['n']\n"),
}
AGENTS = 2
PASSWORD_VAR = "CLOUDTASK_TEST_PGPASSWORD"


def _config(pg_dsn: str) -> dict[str, Any]:
    url = urlsplit(pg_dsn)
    # The password through ${VAR}, as docs/replicas.md tells a deployment to write it.
    database = f"postgresql://{url.username}:${{{PASSWORD_VAR}}}@{url.hostname}:{url.port}{url.path}"
    return {
        "database": database,
        "log_level": "info",  # store_opened names the database: the log is checked for the password
        "agents": {"listen_port": free_port(), "lease_ttl_s": 10},
        "providers": {"local": {"max_instances": AGENTS, "cpus": 4}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 60},
        "queue": {"retry_backoff_s": 0.1},
    }


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    yield {**os.environ, PASSWORD_VAR: PASSWORD}


def _db_check(pg_dsn: str, job_id: int, n_tasks: int) -> None:
    """What the database holds once the job is done: one task_succeeded per task, counters equal to
    the rows (the same check_counters as on SQLite), no instance left running."""
    with psycopg.connect(pg_dsn, row_factory=row_factory) as conn:
        db: Any = PgDb(conn)
        assert db.execute("SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
                          " AND job_id = ? GROUP BY task_id HAVING count(*) != 1) AS twice",
                          (job_id,)).fetchone()[0] == 0, "some task has more than one recorded result"
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded' AND job_id = ?",
                          (job_id,)).fetchone()[0] == n_tasks
        assert db.execute("SELECT count(*) FROM tasks WHERE job_id = ?", (job_id,)).fetchone()[0] == n_tasks
        assert queue.check_counters(db) == []
        assert db.execute("SELECT count(*) FROM instances WHERE state != 'stopped'").fetchone()[0] == 0


async def _done(daemon: DaemonProcess, job_id: int, timeout: float = 300) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        j = await daemon.get(f"/v1/jobs/{job_id}")
        return j if j["done"] else None
    return await wait_for(done, timeout=timeout, message=f"job {job_id} done")  # type: ignore[no-any-return]


@pytest.mark.timeout(600)
async def test_a_job_runs_to_its_end_on_postgresql_through_a_sigkill(tmp_path: Path, pg_dsn: str,
                                                                       env: dict[str, str]) -> None:
    n_tasks = 4000
    daemon = DaemonProcess(tmp_path, _config(pg_dsn))
    await daemon.start(env=env)
    try:
        status = await daemon.get("/v1/status")
        url = urlsplit(pg_dsn)
        assert status["database"] == f"postgresql {url.hostname}:{url.port}{url.path}"
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "pg", "worker": worker["digest"], "max_attempts": 20})
        body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(n_tasks)).encode()
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))

        async def halfway() -> bool:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return bool(j["counts"]["succeeded"] >= n_tasks // 3 or j["done"])
        await wait_for(halfway, timeout=180, message="a third of the tasks done")
        daemon.kill()  # mid-job: leases out, agents connected, rounds in flight
        await daemon.start(env=env)  # the same database: the state is there, not in state_dir

        await _done(daemon, job["id"])
        results = [json.loads(line) for line in (await daemon.get(f"/v1/jobs/{job['id']}/results")).splitlines()]
    finally:
        await daemon.stop()
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == n_tasks, "a task is missing or reported twice"
    assert all(r["status"] == "succeeded" and r["result"] == int(r["id"][1:]) for r in results)
    _db_check(pg_dsn, job["id"], n_tasks)
    assert not (daemon.state_dir / "cloudtask.db").exists(), "the state went to SQLite, not PostgreSQL"
    log = daemon.log_path.read_text()
    assert PASSWORD not in log and "postgresql" in log  # named (store_opened), never with its password


@pytest.mark.timeout(300)
async def test_cancel_retry_and_delete_of_a_job_on_postgresql(tmp_path: Path, pg_dsn: str,
                                                              env: dict[str, str]) -> None:
    daemon = DaemonProcess(tmp_path, _config(pg_dsn))
    await daemon.start(env=env)
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "c", "worker": worker["digest"]})
        body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i, "slow": i < 4}}) + "\n"
                       for i in range(200)).encode()
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))

        async def slow_ones_running() -> bool:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return bool(j["counts"]["leased"] >= 1)
        await wait_for(slow_ones_running, timeout=120, message="a slow task leased")

        cancelled = await daemon.post(f"/v1/jobs/{job['id']}/cancel")
        j = await _done(daemon, job["id"], timeout=60) if not cancelled["done"] else cancelled
        counts = j["counts"]
        assert counts["cancelled"] >= 1 and counts["cancelled"] + counts["succeeded"] == 200, counts

        await daemon.post(f"/v1/jobs/{job['id']}/retry")  # the cancelled ones run again (the slow ones are slow)

        async def rerun() -> bool:
            c = (await daemon.get(f"/v1/jobs/{job['id']}"))["counts"]
            return bool(c["cancelled"] == 0 and c["leased"] >= 1)
        await wait_for(rerun, timeout=60, message="the retried tasks leased again")
        await daemon.post(f"/v1/jobs/{job['id']}/cancel")
        await _done(daemon, job["id"], timeout=60)

        assert daemon.session is not None
        async with daemon.session.delete(f"http://cloudtaskd/v1/jobs/{job['id']}") as resp:
            assert resp.status in (200, 202), await resp.text()

        async def gone() -> bool:
            async with daemon.session.get(f"http://cloudtaskd/v1/jobs/{job['id']}") as resp:  # type: ignore[union-attr]
                return resp.status == 404
        await wait_for(gone, timeout=60, message="the deleted job gone")

        def left() -> int:
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute("SELECT count(*) FROM tasks WHERE job_id = %s", (job["id"],)).fetchone()
                return int(row[0]) if row else -1

        async def purged() -> bool:
            return left() == 0
        await wait_for(purged, timeout=60, message="the deleted job's tasks removed")
    finally:
        await daemon.stop()
