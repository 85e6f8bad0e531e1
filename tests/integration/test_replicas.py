"""Two cloudtaskd replicas on one real PostgreSQL database (issue 17), as real processes, each with its
own state directory for its local files (the CA copied from the first, as docs/replicas.md says).
Agents are spread: the leader's local agents (launched by its orchestrator, given both URLs) and
agents registered on the other replica by hand (given that replica's URL first).

- A job of 50,000 no-op tasks; the leader is SIGKILLed mid-job: every task has exactly one result
  (results and the tasks table), the orchestrator moves to the survivor within 10 s (measured), and
  no instance is launched again or leaked (the local agents of the dead replica are adopted).
- PostgreSQL restarted mid-job: the replicas and the agents carry on, nothing lost or doubled.
- The leader cut off from the database (its path black-holed: packets swallowed, nothing refused):
  it steps down and stops leasing before the other leads, its agents move to the other, the job
  ends with each task once; back on the network it follows.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest

from cloudtaskd.core.pg.leader import PING_INTERVAL_S, PING_TIMEOUT_S, RETRY_S, SESSION_TIMEOUT_S
from tests.conftest import wait_for
from tests.fakes.netproxy import Proxy
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

    def __init__(self, tmp: Path, dsn: str, *, a_dsn: str | None = None,
                 worker: dict[str, str] = WORKER, upload_on: str = "ab") -> None:
        self.ports = free_port(), free_port()
        urls = [_url(p) for p in self.ports]
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        self.worker = worker
        self.a = DaemonProcess(tmp / "a", _config(a_dsn or dsn, self.ports[0], urls))
        self.b = DaemonProcess(tmp / "b", _config(dsn, self.ports[1], urls))
        self.tmp = tmp
        self.agents: list[subprocess.Popen[bytes]] = []
        self.digest = ""
        self.upload_on = upload_on  # which replicas receive the worker: the others take it from the database

    async def start(self) -> None:
        await self.a.start()
        await wait_for(lambda: _logged(self.a, "leader_work_started"), timeout=20, message="A leads")
        share_ca(self.a, self.b)
        await self.b.start()
        for d in (self.a if name == "a" else self.b for name in self.upload_on):
            self.digest = (await d.post("/v1/workers", data=bundle(self.worker)))["digest"]
        for i in range(HAND_AGENTS):
            inst = await self.b.post("/v1/instances", json={"worker": self.digest, "slots": 4})
            assert inst["urls"][0] == _url(self.ports[1])
            self.agents.append(start_agent(self.tmp / f"hand{i}", self.b, inst, self.digest, inst["urls"]))

    async def submit(self, n: int, on: str = "a") -> int:
        job = await (self.a if on == "a" else self.b).post(
            "/v1/jobs", json={"name": "replicas", "worker": self.digest, "max_attempts": 20})
        body = "".join(json.dumps({"id": f"t{i}", "data": i}) + "\n" for i in range(n)).encode()
        await self.b.post(f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(body))  # either replica answers
        return int(job["id"])

    async def wait_succeeded(self, job_id: int, at_least: int, *, timeout: float, interval: float,
                             message: str) -> None:
        async def enough() -> bool:
            j = await self.b.get(f"/v1/jobs/{job_id}")
            return bool(j["counts"]["succeeded"] >= at_least)
        await wait_for(enough, timeout=timeout, interval=interval, message=message)

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


@asynccontextmanager
async def running_pair(tmp: Path, dsn: str, **kwargs: Any) -> AsyncIterator[Pair]:
    """Both replicas started (A leading) and B's agents up; everything stopped at the end, whatever failed."""
    pair = Pair(tmp, dsn, **kwargs)
    try:
        await pair.start()
        yield pair
    finally:
        await pair.close()


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
    async with running_pair(tmp_path, pg_dsn) as pair:
        job_id = await pair.submit(n)
        await pair.wait_succeeded(job_id, n // 4, timeout=180, interval=0.2, message="a quarter of the tasks done")
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
async def test_postgresql_restarted_mid_job(tmp_path: Path, pg_server: PostgresServer, pg_dsn: str) -> None:
    n = 20_000
    async with running_pair(tmp_path, pg_dsn) as pair:
        job_id = await pair.submit(n)
        await pair.wait_succeeded(job_id, n // 4, timeout=120, interval=0.2, message="a quarter of the tasks done")
        pair_agents = pair.local_pids(pair.a)
        pg_server.restart()

        await _done(pair.b, job_id, timeout=200)
        await _check_once(pair.b, pg_dsn, job_id, n)
        assert pair.a.proc is not None and pair.a.proc.poll() is None
        assert pair.b.proc is not None and pair.b.proc.poll() is None
        assert _instances(pg_dsn) == sorted((i, "running") for i in pair_agents), "an agent was lost or relaunched"
        assert all(a.poll() is None for a in pair.agents), "a hand-started agent gave up"


SLOW_WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n",
               "w.py": "import time\n\ndef run(task_id, data):\n    time.sleep(0.05)\n    return data\n"}
STEP_DOWN_BOUND_S = PING_INTERVAL_S + PING_TIMEOUT_S + 1.5  # + a second for the log line and the poll


class ThreadedProxy:
    """The proxy on an event loop of its own thread: the test's loop blocks at times (DaemonProcess.stop
    waits on the process), and a proxy stalled with it would cut the replica off from its database."""

    def __init__(self, host: str, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netproxy", daemon=True)
        self.proxy = Proxy(host, port)

    def start(self) -> int:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)
        return self.proxy.port

    def blackhole(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.blackhole)

    def resume(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.resume)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _since(daemon: DaemonProcess, event: str, t0_wall: float) -> float | None:
    """Seconds from t0_wall to the first `event` logged at or after it, or None."""
    for entry in log_events(daemon.log_path, event):
        ts = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if ts >= t0_wall:
            return ts - t0_wall
    return None


@pytest.mark.timeout(150)
async def test_the_leader_cut_off_from_the_database_steps_down_and_its_agents_move(
        tmp_path: Path, pg_server: PostgresServer, pg_dsn: str) -> None:
    n = 2_000
    proxy = ThreadedProxy(pg_server.host, pg_server.port)
    proxy_port = proxy.start()
    parts = urlsplit(pg_dsn)
    a_dsn = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{pg_server.port}", f":{proxy_port}")))
    began = time.monotonic()
    try:
        async with running_pair(tmp_path, pg_dsn, a_dsn=a_dsn, worker=SLOW_WORKER) as pair:
            job_id = await pair.submit(n)
            print(f"replicas and agents up in {time.monotonic() - began:.1f} s")
            await pair.wait_succeeded(job_id, n // 5, timeout=60, interval=0.1, message="a fifth of the tasks done")
            launched = _instances(pg_dsn)
            a_agents = pair.local_pids(pair.a)
            assert set(a_agents) == {i for i, _ in launched} and len(launched) == LOCAL_AGENTS

            proxy.blackhole()
            cut_wall = time.time()
            print(f"cut {time.monotonic() - began:.1f} s after the start")

            async def stepped_down() -> float | None:
                return _since(pair.a, "leader_work_stopped", cut_wall)
            down_s = await wait_for(stepped_down, timeout=15, interval=0.05, message="A's reconciler stopped")
            assert down_s < STEP_DOWN_BOUND_S, f"A stepped down {down_s:.2f} s after the cut"
            # A's agents' grants are what A commits: look at the tasks its agents hold, through B's path.

            async def b_leads() -> float | None:
                return _since(pair.b, "leader_work_started", cut_wall)
            led_s = await wait_for(b_leads, timeout=30, interval=0.05, message="B's reconciler running")
            assert led_s > down_s, "B led before A had stepped down: two leaders"
            # The server gives the lock away only when it ends A's session (idle_session_timeout counts
            # from A's last ping, at most ping_interval_s before the cut).
            assert led_s >= SESSION_TIMEOUT_S - PING_INTERVAL_S - 0.5, f"B led {led_s:.2f} s after the cut"

            on_b: dict[str, float] = {}  # A's agent: when it connected to B, in seconds after the cut

            async def agents_moved() -> float | None:
                for e in log_events(pair.b.log_path, "agent_connected"):
                    ts = datetime.fromisoformat(e["timestamp"]).timestamp()
                    if ts >= cut_wall and e.get("instance") in a_agents:
                        on_b.setdefault(e["instance"], ts - cut_wall)
                return max(on_b.values()) if set(on_b) == set(a_agents) else None
            moved_s = await wait_for(agents_moved, timeout=30, interval=0.1, message="A's agents on B")
            print(f"cut off: A stepped down {down_s:.2f} s, B led {led_s:.2f} s, A's agents on B {moved_s:.2f} s"
                  " after the black hole")

            await _done(pair.b, job_id, timeout=60)
            await _check_once(pair.b, pg_dsn, job_id, n)
            with psycopg.connect(pg_dsn) as conn:
                # Each grant raised the task's attempt (its fencing token) by one: a task leased twice
                # would have more grants than its attempt says.
                doubled = conn.execute(
                    "SELECT t.id, t.attempt, count(e.id) FROM tasks t LEFT JOIN events e ON e.task_id = t.id"
                    " AND e.kind = 'lease_granted' WHERE t.job_id = %s GROUP BY t.id, t.attempt"
                    " HAVING count(e.id) <> t.attempt", (job_id,)).fetchall()
                assert doubled == [], f"grants and fencing tokens disagree: {doubled[:5]}"
                # Nothing A's agents were granted after A was cut off came from A: A commits nothing.
                # (after they moved, B grants them work; before, no grant for them at all)
                for inst, on_b_s in on_b.items():  # (B attaches an agent just before it logs agent_connected)
                    late = conn.execute(
                        "SELECT count(*) FROM events WHERE kind = 'lease_granted' AND instance_id = %s"
                        " AND ts > %s AND ts < %s", (inst, cut_wall + 0.5, cut_wall + on_b_s - 0.2)).fetchone()
                    assert late is not None and late[0] == 0, f"{late[0]} grants to {inst} while it was on A"
            assert _instances(pg_dsn) == launched, "an instance was launched again or ended"
            assert pair.local_pids(pair.b) == {}, "B launched an instance of its own"

            proxy.resume()
            print(f"job done {time.time() - cut_wall:.1f} s after the cut")

            async def a_answers() -> bool:
                try:
                    await pair.a.get(f"/v1/jobs/{job_id}")
                except aiohttp.ClientResponseError:
                    return False
                return True
            await wait_for(a_answers, timeout=40, interval=0.5, message="A back on the database")
            back = time.monotonic()
            async def a_probe_back() -> bool:
                return _since(pair.a, "pg_reachable_again", cut_wall) is not None
            await wait_for(a_probe_back, timeout=15, message="A's database probe answering again")
            while time.monotonic() - back < 3 * RETRY_S:  # A tries for the lock (retry_s) and must not get it
                assert len(log_events(pair.a.log_path, "leader_work_started")) == 1, "A leads again while B leads"
                await asyncio.sleep(0.2)
            assert len(log_events(pair.b.log_path, "leader_work_stopped")) == 0
            print(f"A back and following {time.time() - cut_wall:.1f} s after the cut")
    finally:
        proxy.stop()
        print(f"stopped {time.monotonic() - began:.1f} s after the start")


@pytest.mark.parametrize("upload_on", ["a", "b"])
async def test_a_worker_uploaded_to_one_replica_runs_on_both(tmp_path: Path, pg_dsn: str, upload_on: str) -> None:
    """The worker goes to one replica only; the job is created on B and B's hand-registered agents
    read the worker from B's state directory; A (the leader) launches its local agents from its own.
    Uploaded to A: B materializes it (job, agent registration). Uploaded to B: A's leader does, to launch."""
    n = 3_000
    async with running_pair(tmp_path, pg_dsn, upload_on=upload_on) as pair:
        job_id = await pair.submit(n, on="b")
        await _done(pair.b, job_id, timeout=180)
        await _check_once(pair.a, pg_dsn, job_id, n)
        with psycopg.connect(pg_dsn) as conn:
            ran = dict(conn.execute("SELECT i.provider, count(*) FROM tasks t JOIN instances i ON i.id = t.instance_id"
                                    " WHERE t.job_id = %s GROUP BY i.provider", (job_id,)).fetchall())
        assert set(ran) == {"local", "external"}, f"both replicas' agents ran tasks: {ran}"
        # The leader's local agents read the worker from the leader's own state directory.
        for pid in pair.local_pids(pair.a).values():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            worker_dir = Path(argv[argv.index("--worker-dir") + 1])
            assert worker_dir == pair.a.state_dir / "workers" / pair.digest, argv
        for d in (pair.a, pair.b):
            workers = d.state_dir / "workers"
            assert (workers / pair.digest / "cloudtask.yaml").is_file()
            assert hashlib.sha256((workers / f"{pair.digest}.tar.gz").read_bytes()).hexdigest() == pair.digest
        other = pair.b if upload_on == "a" else pair.a
        assert log_events(other.log_path, "worker_materialized"), "the other replica took it from the database"
