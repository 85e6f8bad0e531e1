"""Agents killed mid-task and workers that hang, crash, print garbage or run out of memory, end to end:
a real daemon process, the local provider's real agent processes, real worker processes, real SQLite.

Whatever a worker does, the daemon stays healthy, the other tasks complete, every task ends with
exactly one recorded outcome, and the job counters match the task rows. `--soak` (or CLOUDTASK_SOAK=1)
runs more tasks and more faults.

The worker is tests/workers/faults/faulty.py, in all three modes; each task's `op` picks its fault.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest

from agent.runner import shell_command
from cloudtaskd.core.tables import tasks as queue
from tests import paths
from tests.conftest import wait_for
from tests.procs import DaemonProcess, bundle, free_port

FAULTY = paths.WORKERS / "faults" / "faulty.py"
PYTHON = shlex.quote(sys.executable)
SPECS = {
    "command": f"mode: command\ncommand: {PYTHON} faulty.py command\n",
    "stream": f"mode: stream\ncommand: {PYTHON} -u faulty.py stream\n",
    "python": "mode: python\nfunction: faulty:run\n",
}
LEASE_TTL_S = 2.0  # short, so a dead agent's leases expire quickly
# Where no agent dies: long enough that a loaded machine never lets a lease expire by accident (the
# tests count attempts exactly).
CALM_LEASE_TTL_S = 15.0
SLOTS = 2  # per agent: the local provider's `cpus` with cpus_per_task 1
MEMORY_LIMIT_MIB = 256
MIB = 1024 * 1024
# Below the agent's own default (4 MiB): the agent must learn the daemon's limit, not assume its own.
FRAME_LIMIT_BYTES = 2 * MIB
# Task outcomes that end a task: each task must have exactly one of these events.
TERMINAL_EVENTS = ("task_succeeded", "task_dead", "lease_expired_dead", "task_cancelled")


def worker(mode: str, extra: str = "") -> dict[str, str]:
    return {"cloudtask.yaml": SPECS[mode] + extra, "faulty.py": FAULTY.read_text()}


def jsonl(tasks: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(t) + "\n" for t in tasks).encode()


def alive(pid: int) -> bool:
    """A zombie counts as dead (a container's init may never reap an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def recorded_pids(piddir: Path) -> list[int]:
    return [int(p.name.rsplit("-", 1)[1]) for p in piddir.iterdir() if not p.name.endswith(".tmp")]


class Cluster:
    """A daemon on the local provider, and what a test asks of it."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.db_path = daemon.state_dir / "cloudtask.db"

    async def register(self, files: dict[str, str]) -> str:
        """The worker's digest. Register once and reuse it: every bundle differs (gzip stamps the time),
        and another digest is another pool, with instances of its own."""
        return str((await self.daemon.post("/v1/workers", data=bundle(files)))["digest"])

    async def submit(self, files: dict[str, str] | str, tasks: list[dict[str, Any]], **job: Any) -> int:
        digest = files if isinstance(files, str) else await self.register(files)
        created = await self.daemon.post("/v1/jobs", json={"name": "faults", "worker": digest, **job})
        await self.daemon.post(f"/v1/jobs/{created['id']}/tasks", data=jsonl(tasks))
        return int(created["id"])

    async def job(self, job_id: int) -> dict[str, Any]:
        return dict(await self.daemon.get(f"/v1/jobs/{job_id}"))

    async def wait_done(self, job_id: int, timeout_s: float = 60) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["done"] else None
        return dict(await wait_for(done, timeout=timeout_s, message=f"job {job_id} done"))

    async def results(self, job_id: int) -> dict[str, dict[str, Any]]:
        text = await self.daemon.get(f"/v1/jobs/{job_id}/results")
        return {r["id"]: r for r in map(json.loads, text.splitlines())}

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute(sql, args).fetchall()

    def agents(self) -> dict[str, int]:
        """Live local agents: instance id -> pid (the provider's own records)."""
        out = {}
        for rec in (self.daemon.state_dir / "local").glob("*.json"):
            try:
                pid = int(json.loads(rec.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue  # being written or removed
            if alive(pid):
                out[rec.stem] = pid
        return out

    def running_instances(self) -> set[str]:
        return {r[0] for r in self.query("SELECT id FROM instances WHERE state = 'running'")}

    def leases_by_instance(self) -> Counter[str]:
        return Counter(dict(self.query(
            "SELECT instance_id, count(*) FROM tasks WHERE state = 'leased' GROUP BY instance_id")))

    def history(self, job_id: int, key: str) -> list[tuple[Any, ...]]:
        """A task's events, to explain a failed assertion."""
        return self.query("SELECT e.kind, e.instance_id, e.detail FROM events e JOIN tasks t ON t.id = e.task_id"
                          " WHERE t.job_id = ? AND t.key = ? ORDER BY e.id", job_id, key)

    def event_counts(self, job_id: int) -> Counter[str]:
        return Counter(dict(self.query(
            "SELECT kind, count(*) FROM events WHERE job_id = ? AND task_id IS NOT NULL GROUP BY kind", job_id)))

    async def check_consistent(self, job_id: int, n_tasks: int) -> None:
        """Each task of the job has exactly one terminal event, the counters match the rows, and the
        daemon still answers."""
        marks = ", ".join("?" * len(TERMINAL_EVENTS))
        per_task = self.query(
            f"SELECT t.id, (SELECT count(*) FROM events e WHERE e.task_id = t.id AND e.kind IN ({marks}))"
            " FROM tasks t WHERE t.job_id = ?", *TERMINAL_EVENTS, job_id)
        assert len(per_task) == n_tasks
        wrong = [(task, n) for task, n in per_task if n != 1]
        assert not wrong, f"tasks without exactly one recorded outcome (task, count): {wrong[:10]}"
        with closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)) as db:
            assert queue.check_counters(db) == []
        assert (await self.daemon.get("/v1/health"))
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, "the daemon died"


@asynccontextmanager
async def cluster(tmp_path: Path, *, max_instances: int, max_message_bytes: int = 4 * MIB,
                  lease_ttl_s: float = LEASE_TTL_S) -> Any:
    config = {
        "agents": {"listen_port": free_port(), "lease_ttl_s": lease_ttl_s, "max_message_bytes": max_message_bytes},
        "providers": {"local": {"max_instances": max_instances, "cpus": SLOTS}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 60},
        "queue": {"retry_backoff_s": 0.1, "retry_backoff_max_s": 0.5},
    }
    daemon = DaemonProcess(tmp_path, config)
    await daemon.start()
    try:
        yield Cluster(daemon)
    finally:
        await daemon.stop()
    # A clean stop ends every agent it started.
    assert not list((daemon.state_dir / "local").glob("*.json")), "an agent process was left running"


@pytest.fixture
def piddir(tmp_path: Path) -> Iterator[Path]:
    """Where worker processes note their pids; any still alive at the end is killed (and fails the test)."""
    path = tmp_path / "pids"
    path.mkdir()
    yield path
    left = [pid for pid in recorded_pids(path) if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # a worker our test started (its pid noted by itself)
    assert not left, f"worker processes outlived the test: {left}"


async def wait_gone(pids: list[int], timeout_s: float, what: str) -> None:
    async def gone() -> bool:
        return not any(alive(p) for p in pids)
    await wait_for(gone, timeout=timeout_s, message=what)


# ---- how a worker command is started ------------------------------------------------------------------


@pytest.mark.parametrize(("command", "execs"), [
    ("python3 worker.py", True),
    ("python3 -u worker.py --flag 'two words'", True),
    ("./run $HOME/x", True),
    ("cd sub && python3 w.py", False),
    ("python3 a.py; python3 b.py", False),
    ("python3 w.py | tee log", False),
    ("python3 w.py 2>&1", False),
    ("FOO=1 python3 w.py", False),
    ("exec python3 w.py", False),
    ("if true; then x; fi", False),
    ("python3 -c 'unclosed", False),
])
def test_one_simple_command_is_execed(command: str, execs: bool) -> None:
    """sh replaces itself with a simple command, so the worker is the process the agent started (and
    gets its parent-death signal and memory limit); anything compound runs as written."""
    assert shell_command(command) == (f"exec {command}" if execs else command)


# ---- agents killed mid-task ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["command", "stream", "python"])
async def test_agents_sigkilled_mid_task_lose_nothing(tmp_path: Path, piddir: Path, soak: bool, mode: str) -> None:
    """kill -9 agents that hold running tasks, again and again: their leases expire after the visibility
    timeout and are retried on the others, each killed instance is marked lost and replaced, and every
    task succeeds exactly once."""
    rng = random.Random(6)
    n_tasks, kills = (1200, 30) if soak else (60, 3)
    tasks = [{"id": f"t{i}", "data": {"op": "ok", "n": i, "sleep": 0.3, "piddir": str(piddir)},
              "max_attempts": 10} for i in range(n_tasks)]
    async with cluster(tmp_path, max_instances=2) as c:
        job_id = await c.submit(worker(mode), tasks)
        killed: dict[str, list[int]] = {}  # instance -> pids of its worker processes at the kill
        killed_at: dict[str, float] = {}
        for k in range(kills):
            async def victim() -> tuple[str, int] | None:
                agents, leases = c.agents(), c.leases_by_instance()
                busy = sorted(i for i in agents if leases[i] > 0 and i in c.running_instances() and i not in killed)
                return (busy[0], agents[busy[0]]) if busy else None
            # Spread the kills over the run: wait for progress first.
            goal = (k + 1) * n_tasks // (kills + 2)
            async def progressed(goal: int = goal) -> bool:
                return int((await c.job(job_id))["counts"]["succeeded"]) >= goal
            await wait_for(progressed, timeout=90, message=f"{goal} tasks done before kill {k + 1}")
            inst, pid = await wait_for(victim, timeout=30, message="an agent holding leases")
            workers = [p for p in recorded_pids(piddir) if parent_of(p) == pid]
            killed_at[inst] = time.time()  # the daemon's event clock: the same machine's
            os.kill(pid, signal.SIGKILL)  # an agent our daemon started; its pid from the provider's record
            killed[inst] = workers

            async def replaced(inst: str = inst) -> bool:
                state = c.query("SELECT state FROM instances WHERE id = ?", inst)[0][0]
                fresh = c.running_instances() - set(killed)
                return state == "stopped" and bool(fresh)
            await wait_for(replaced, timeout=30, message=f"{inst} marked lost and replaced")
            if rng.random() < 0.5:
                await wait_gone(workers, 10, f"the worker processes of killed agent {inst}")

        await c.wait_done(job_id, timeout_s=600 if soak else 90)
        res = await c.results(job_id)
        assert len(res) == n_tasks
        assert all(r["status"] == "succeeded" and r["result"]["n"] == int(r["id"][1:]) for r in res.values())
        events = c.event_counts(job_id)
        assert events["task_succeeded"] == n_tasks, events
        # Every killed agent held at least one lease, which had to expire to be retried.
        assert events["lease_expired"] >= kills, events
        await c.check_consistent(job_id, n_tasks)
        by_key = {r["task"]: r for r in res.values()}
        for inst in killed:
            state, error = c.query("SELECT state, last_error FROM instances WHERE id = ?", inst)[0]
            assert state == "stopped" and error == "instance is gone", (inst, state, error)
            assert c.query("SELECT count(*) FROM events WHERE instance_id = ? AND kind = 'instance_lost'",
                           inst)[0][0] == 1
            # What it held when it died expired there and succeeded elsewhere, on a later attempt.
            orphaned = [r[0] for r in c.query(
                "SELECT task_id FROM events WHERE instance_id = ? AND kind = 'lease_expired' AND ts >= ?",
                inst, killed_at[inst])]
            assert orphaned, f"killed agent {inst} held no lease"
            for task in orphaned:
                assert by_key[task]["instance"] != inst and by_key[task]["attempts"] >= 2, by_key[task]
        # No worker process outlives its agent (an orphan would keep running, or hang, unsupervised).
        await wait_gone([p for pids in killed.values() for p in pids], 10, "the killed agents' workers")


@pytest.mark.parametrize("mode", ["command", "stream"])
async def test_worker_processes_die_with_their_agent(tmp_path: Path, piddir: Path, mode: str) -> None:
    """A hanging worker whose agent is SIGKILLed does not run on as an orphan: it is killed with the agent
    (the kernel's parent-death signal), and its task ends once its lease expires."""
    tasks = [{"id": f"h{i}", "data": {"op": "hang", "piddir": str(piddir)}, "max_attempts": 1}
             for i in range(SLOTS)]
    async with cluster(tmp_path, max_instances=1) as c:
        job_id = await c.submit(worker(mode), tasks)
        async def both_started() -> list[int] | None:
            pids = recorded_pids(piddir)
            return pids if len(pids) == SLOTS else None
        pids = await wait_for(both_started, timeout=30, message="the workers started")
        (_, pid), = c.agents().items()
        assert {parent_of(p) for p in pids} == {pid}
        os.kill(pid, signal.SIGKILL)  # an agent our daemon started
        await wait_gone(pids, 10, "the workers of the killed agent")
        await c.wait_done(job_id, timeout_s=30)
        res = await c.results(job_id)
        assert {r["status"] for r in res.values()} == {"dead"}
        assert all("lease expired" in r["error"] for r in res.values())
        await c.check_consistent(job_id, len(tasks))


# ---- python-mode workers that take the agent down ----------------------------------------------------


@pytest.mark.parametrize("op", ["os_exit", "SIGSEGV"])
async def test_python_worker_that_kills_its_agent(tmp_path: Path, soak: bool, op: str) -> None:
    """In python mode the worker runs inside the agent: os._exit() or a fatal signal ends the agent
    itself. Its leases expire and are retried; the provider starts another agent; the poison task dies
    after max_attempts, and every other task succeeds exactly once."""
    n_ok = 60 if soak else 20
    poison_attempts = 3 if soak else 2
    data: dict[str, Any] = {"op": "os_exit"} if op == "os_exit" else {"op": "signal", "sig": op}
    tasks = [{"id": "poison", "data": data, "max_attempts": poison_attempts, "priority": 10}]
    # The other tasks may sit in a dying agent's prefetch: they lose an attempt each time.
    tasks += [{"id": f"t{i}", "data": {"op": "ok", "n": i, "sleep": 0.05}, "max_attempts": 2 * poison_attempts + 2}
              for i in range(n_ok)]
    async with cluster(tmp_path, max_instances=1) as c:
        job_id = await c.submit(worker("python"), tasks)
        await c.wait_done(job_id, timeout_s=120)
        res = await c.results(job_id)
        poison = res.pop("poison")
        assert poison["status"] == "dead" and poison["attempts"] == poison_attempts, poison
        assert "lease expired" in poison["error"]
        assert all(r["status"] == "succeeded" for r in res.values()), [r for r in res.values()
                                                                       if r["status"] != "succeeded"]
        await c.check_consistent(job_id, len(tasks))
        lost = c.query("SELECT id, last_error FROM instances WHERE id IN"
                       " (SELECT instance_id FROM events WHERE kind = 'instance_lost')")
        assert len(lost) >= poison_attempts, lost  # each attempt took an agent down
        assert all(error == "instance is gone" for _, error in lost), lost
        burned = sum(r["attempts"] - 1 for r in res.values())
        print(f"{op}: {len(lost)} agents lost; innocent tasks lost {burned} attempts in their prefetch")


# ---- workers that hang, crash, print garbage or run out of memory -----------------------------------


def misbehaving_tasks(mode: str, piddir: Path, markers: Path) -> dict[str, tuple[dict[str, Any], str, int, str]]:
    """id -> (data, expected status, expected attempts, expected text in the error) for `mode`."""
    pd = str(piddir)
    t: dict[str, tuple[dict[str, Any], str, int, str]] = {
        # In python mode a grandchild would be the agent's own: only processes have groups to kill.
        "hang": ({"op": "hang", "grandchild": mode != "python", "piddir": pd}, "dead", 2, "timed out after 1 s"),
        "raise": ({"op": "raise"}, "dead", 2, "worker blew up on purpose"),
        "flaky": ({"op": "flaky", "marker": str(markers / "flaky")}, "succeeded", 2, ""),
        # Over the daemon's frame limit: it could never be reported, so the agent fails it for good.
        "big_result": ({"op": "big_result", "chars": 3 * MIB}, "dead", 1, "over the daemon's message limit"),
        # Fewer characters than the limit, more UTF-8 bytes: the limit counts bytes.
        "big_text": ({"op": "big_result", "chars": 3 * MIB // 4, "char": "\u00e9\u00e9"}, "dead", 1,
                     "over the daemon's message limit"),
        "near_limit": ({"op": "big_result", "chars": FRAME_LIMIT_BYTES // 2}, "succeeded", 1, ""),
        "alloc_small": ({"op": "alloc", "mib": 32}, "succeeded", 1, ""),
    }
    if mode == "python":
        t["permanent"] = ({"op": "permanent"}, "dead", 1, "this input can never work")
        t["exit"] = ({"op": "exit", "code": 1}, "dead", 2, "SystemExit")
        # Not enforced in python mode: the worker shares the agent's process (see docs).
        t["alloc_big"] = ({"op": "alloc", "mib": 2 * MEMORY_LIMIT_MIB}, "succeeded", 1, "")
        return t
    t.update({
        "exit1": ({"op": "exit", "code": 1, "piddir": pd}, "dead", 2, "exits with code 1 on purpose"),
        "sigsegv": ({"op": "signal", "sig": "SIGSEGV"}, "dead", 2, "killed by signal SIGSEGV"),
        "sigkill": ({"op": "signal", "sig": "SIGKILL"}, "dead", 2, "killed by signal SIGKILL"),
        "permanent": ({"op": "permanent"}, "dead", 1, "this input can never work"),
        "garbage": ({"op": "garbage"}, "dead", 2, "not JSON"),
        "binary": ({"op": "binary"}, "dead", 2, "not JSON" if mode == "command" else "not a JSON answer"),
        "alloc_big": ({"op": "alloc", "mib": 4 * MEMORY_LIMIT_MIB}, "dead", 1,
                      f"exceeded memory_per_task={MEMORY_LIMIT_MIB} MiB"),
    })
    if mode == "command":
        t["flood"] = ({"op": "huge_line", "mib": 17}, "dead", 2, "more than 16777216 bytes")
    else:
        t.update({
            "partial_exit": ({"op": "partial_exit"}, "dead", 2, "not a JSON answer"),
            "partial_hang": ({"op": "partial_hang"}, "dead", 2, "timed out after 1 s"),
            "huge_line": ({"op": "huge_line", "mib": 65}, "dead", 2, "line longer than"),
            "wrong_id": ({"op": "wrong_id"}, "dead", 2, "answered for task 'someone-else'"),
        })
    return t


@pytest.mark.parametrize("mode", ["command", "stream", "python"])
async def test_misbehaving_workers(tmp_path: Path, piddir: Path, soak: bool, mode: str) -> None:
    """Every kind of worker fault in one job, between good tasks: each fault ends its task as the
    worker's contract says (retried, then dead; or dead at once when permanent), with an error that
    says what happened; hung workers are killed with their whole process group; the good tasks all
    succeed; afterwards every slot is free again."""
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = misbehaving_tasks(mode, piddir, markers)
    rounds = 3 if soak else 1
    tasks: list[dict[str, Any]] = []
    n_ok = 0
    for r in range(rounds):
        for name, (data, _, _, _) in faults.items():
            if name == "flaky":
                data = {**data, "marker": f"{data['marker']}{r}"}
            tasks.append({"id": f"{name}.{r}", "data": data, "max_attempts": 2, "timeout": 1 if "hang" in name else 30})
            for _ in range(2):
                tasks.append({"id": f"ok{n_ok}", "data": {"op": "ok", "n": n_ok}, "timeout": 30})
                n_ok += 1
    extra = f"memory_per_task: {MEMORY_LIMIT_MIB}\n"
    async with cluster(tmp_path, max_instances=1, max_message_bytes=FRAME_LIMIT_BYTES,
                       lease_ttl_s=CALM_LEASE_TTL_S) as c:
        digest = await c.register(worker(mode, extra))
        job_id = await c.submit(digest, tasks)
        await c.wait_done(job_id, timeout_s=300 if soak else 90)
        res = await c.results(job_id)
        wrong = []
        for r in range(rounds):
            for name, (_, status, attempts, text) in faults.items():
                got = res[f"{name}.{r}"]
                if (got["status"], got["attempts"]) != (status, attempts) or text not in (got.get("error") or ""):
                    wrong.append((name, status, attempts, text, got, c.history(job_id, got["id"])))
        assert not wrong, "\n".join(map(repr, wrong))
        oks = [res[f"ok{i}"] for i in range(n_ok)]
        assert all(o["status"] == "succeeded" and o["result"]["n"] == int(o["id"][2:]) for o in oks), oks
        if mode != "python":
            # Workers are the OOM killer's first choice, before the agent that holds every slot's lease.
            assert {o["result"]["oom_score_adj"] for o in oks} == {1000}
        await c.check_consistent(job_id, len(tasks))
        # One agent survived it all.
        assert len(c.query("SELECT id FROM instances")) == 1

        # Every slot is free: SLOTS tasks that only finish when all of them run at once.
        meet = tmp_path / "meet"
        meet.mkdir()
        second = await c.submit(digest, [
            {"id": f"m{i}", "data": {"op": "meet", "dir": str(meet), "peers": SLOTS}, "max_attempts": 1}
            for i in range(SLOTS)])
        await c.wait_done(second, timeout_s=60)
        assert {r["status"] for r in (await c.results(second)).values()} == {"succeeded"}
    # Hung workers and their grandchildren were killed with their process group; nothing is left.
    if mode != "python":
        await wait_gone(recorded_pids(piddir), 10, "every worker process")
