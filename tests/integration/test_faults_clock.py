"""A clock jump on an agent: its wall clock steps an hour forward, then an hour back (as an NTP
step does, CLOCK_REALTIME only), while it runs tasks that outlive the lease TTL several times
over. Heartbeats keep every lease alive, nothing is refused or lost, each task is done once, and
the durations it reports are the real ones.

The agent runs under libfaketime (Debian `faketime`), its offset read from a file on every call
(FAKETIME_TIMESTAMP_FILE + FAKETIME_NO_CACHE=1), the monotonic clock left alone
(FAKETIME_DONT_FAKE_MONOTONIC=1). Under libfaketime 0.9.10 with that flag, `time.sleep` fails with
EINVAL (CPython sleeps with clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which the library
mistranslates); asyncio's sleeps, timeouts and thread waits work. The agent never calls time.sleep.

Where the agent reads the wall clock (agent/): the `ts` of its log lines (a record of when, as the
machine saw it) and a spot deadline: the clouds give an absolute time (AWS's instance-action
`time`, Azure's `NotBefore`), turned into a grace period once, when the notice arrives
(`deadline - time.time()`, capped at the longest notice a cloud gives: a clock behind the cloud's
must not stretch it), then timed on the monotonic loop clock, so a later step does not move it.
GCP gives no time: its deadline is the agent's own clock + 30 s, converted back at once on the
same clock. Every interval (heartbeats, reconnect backoff, task durations and timeouts, the
AWS token's renewal, drain grace) is on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from agent.connection import Agent
from cloudtask_wire.messages import Notice
from cloudtask_wire.workerspec import WorkerSpec
from tests.fakes.netproxy import Proxy
from tests.integration.test_faults_network import AgentProc, Rig, final_checks
from tests.procs import bundle

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
TASK_S = 1.5  # each task outlives the lease TTL: only heartbeats keep it
HOUR_S = 3600.0
# python mode runs in the agent's process: the worker reads the agent's clocks.
WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": (
        "import asyncio, time\n"
        "async def run(task_id, data):\n"
        "    wall0, mono0 = time.time(), time.monotonic()\n"
        "    await asyncio.sleep(data['sleep'])\n"
        "    return {'n': data['n'], 'wall': [wall0, time.time()], 'mono': [mono0, time.monotonic()]}\n"
    ),
}


async def clock_step(rig: Rig, a: AgentProc, proxy: Proxy, slots: int, k: int, offset: float,
                     offset_file: Path) -> None:
    done_before = rig.count("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
    # Mid-task: every slot busy, each task at least a TTL from its end.
    await rig.until(f"step {k}: tasks running", lambda: rig.count(
        "SELECT count(*) FROM tasks WHERE state = 'leased'") >= slots)
    offset_file.write_text(f"{offset:+.0f}\n")
    # A round of tasks finishes on the new clock (each straddled the step); then the connection is
    # cut and the agent reconnects: TLS checks certificates against the wall clock.
    await rig.until(f"step {k}: tasks done across it", lambda: rig.count(
        "SELECT count(*) FROM tasks WHERE state = 'succeeded'") >= done_before + slots, timeout_s=60)
    connected = len(a.log("agent_connected"))
    proxy.cut()
    await rig.until(f"step {k}: A reconnected", lambda: len(a.log("agent_connected")) > connected)


async def test_agent_clock_steps_an_hour_forward_and_back(tmp_path: Path, soak: bool) -> None:
    if not LIBFAKETIME.exists():
        pytest.skip(f"libfaketime is not installed ({LIBFAKETIME}): apt-get install faketime")
    slots = 4
    steps = [HOUR_S, -HOUR_S, 0.0] * (3 if soak else 1)  # the offset after each step
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    rig = Rig(tmp_path, lease_ttl_s=1.0, worker=WORKER)
    try:
        await rig.start()
        _, a, proxy = await rig.start_agent_behind_proxy("A", slots, env={
            "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset_file),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        n = slots * (len(steps) + 2) * 2
        lines = "".join(json.dumps({"id": f"c{i}", "data": {"n": i, "sleep": TASK_S}}) + "\n" for i in range(n))
        await rig.daemon.post(f"/v1/jobs/{rig.job}/tasks", data=lines.encode())
        rig.submitted = n
        for k, offset in enumerate(steps):
            await clock_step(rig, a, proxy, slots, k, offset, offset_file)
        await rig.until("every task done", lambda: rig.count(
            "SELECT count(*) FROM tasks WHERE state = 'succeeded'") == n, timeout_s=120)
        assert a.stop() == 0, a.tail()
        final_checks(rig)
        rows = rig.query("SELECT result, duration_s, started_at FROM tasks")
        # The steps reached the agent: tasks started on every offset (the agent's wall clock against
        # the daemon's lease time, a task starting as soon as it is granted), and some straddled one.
        seen = [json.loads(r[0])["wall"][0] - r[2] for r in rows]
        for offset in {0.0, *steps}:
            assert any(abs(s - offset) < 60 for s in seen), (offset, sorted(seen))
        walls = [json.loads(r[0])["wall"] for r in rows]
        assert any(abs(w[1] - w[0]) > HOUR_S / 2 for w in walls), "no task straddled a step"
        for result, duration_s, _ in rows:
            mono = json.loads(result)["mono"]
            assert TASK_S <= duration_s < TASK_S + 30, f"duration {duration_s} s (monotonic {mono})"
        # Heartbeats kept every lease across the steps: none expired, no report was refused.
        for kind in ("lease_expired", "stale_report_refused"):
            assert rig.count("SELECT count(*) FROM events WHERE kind = ?", kind) == 0, kind
        assert not a.log("report_refused")
    finally:
        await rig.stop()


async def test_a_spot_deadline_read_on_a_clock_an_hour_behind(tmp_path: Path) -> None:
    """The one place the agent reads the wall clock for timing: a cloud's absolute deadline. On a
    clock an hour behind the cloud's, an AWS notice's two minutes look like an hour and two: the
    agent would work on past the moment the machine is taken, and what finished after it is lost
    instead of handed back. The grace is capped at the longest notice a cloud gives."""
    agent = Agent("wss://127.0.0.1:1/", "i-1", "token", tmp_path, 2, drain_grace_s=60.0,
                  spec=WorkerSpec(mode="command", command="true"), interruption_margin_s=10.0)
    loop = asyncio.get_running_loop()
    agent.on_notice(Notice("interruption", "aws", time.time() + HOUR_S + 120, "terminate"))
    try:
        assert agent.draining
        assert agent._drain_deadline - loop.time() == pytest.approx(110, abs=1.0)
    finally:
        if agent._drain_timer is not None:
            agent._drain_timer.cancel()


# ---- the daemon's own clock (issue 15) ----------------------------------------------------------
# The daemon runs under libfaketime, its wall clock stepped through the same kind of file; agents
# run on the true clock. Before the fix, lease expiry and retry due times were written and compared
# on the wall clock: +2 h expired every live lease at once (max_attempts 1: dead, "no heartbeat
# within the visibility timeout"); -1 h stalled retries written before the step and held a killed
# agent's leases for an hour.

DAEMON_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": (
        "import asyncio, pathlib\n"
        "async def run(task_id, data):\n"
        "    mark = pathlib.Path(data['marks'], str(task_id))\n"
        "    if data.get('fail_once') and not mark.exists():\n"
        "        mark.touch()\n"
        "        raise RuntimeError('the first attempt fails')\n"
        "    await asyncio.sleep(data['sleep'])\n"
        "    return {'n': data['n']}\n"
    ),
}


def faked_daemon_env(offset_file: Path) -> dict[str, str]:
    if not LIBFAKETIME.exists():
        pytest.skip(f"libfaketime is not installed ({LIBFAKETIME}): apt-get install faketime")
    offset_file.write_text("+0\n")
    return {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset_file),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def submit(rig: Rig, job: int, tasks: list[dict[str, object]]) -> None:
    lines = "".join(json.dumps({"id": f"d{rig.submitted + i}", "data": {"n": rig.submitted + i, **t}}) + "\n"
                    for i, t in enumerate(tasks))
    rig.submitted += len(tasks)
    await rig.daemon.post(f"/v1/jobs/{job}/tasks", data=lines.encode())


async def test_daemon_clock_steps_two_hours_forward(tmp_path: Path) -> None:
    """Mid-job, every slot busy, the daemon's clock steps 2 h forward. No lease expires, no
    max_attempts 1 task dies, the job ends. The TTL is long (heartbeats every 10 s) so that, before
    the fix, the expiry pass (every 0.5 s) nearly always came before a heartbeat could renew a lease."""
    offset_file = tmp_path / "faketime"
    env = faked_daemon_env(offset_file)
    rig = Rig(tmp_path, lease_ttl_s=40.0, worker=DAEMON_WORKER)
    try:
        await rig.daemon.start(env=env)
        worker = await rig.daemon.post("/v1/workers", data=bundle(DAEMON_WORKER))
        rig.digest = worker["digest"]
        job = int((await rig.daemon.post("/v1/jobs", json={"name": "fwd", "worker": rig.digest,
                                                            "max_attempts": 1}))["id"])
        slots = 4
        inst = await rig.register(slots)
        a = rig.start_agent("A", inst, inst["url"], slots)
        await rig.until("A connected", lambda: bool(a.log("agent_connected")))
        await submit(rig, job, [{"sleep": 4.0, "marks": str(rig.marks)} for _ in range(2 * slots)])
        await rig.until("every slot busy", lambda: rig.count(
            "SELECT count(*) FROM tasks WHERE state = 'leased'") == slots)
        offset_file.write_text(f"+{2 * HOUR_S:.0f}\n")
        await rig.until("every task done", lambda: rig.count(
            "SELECT count(*) FROM tasks WHERE state IN ('succeeded', 'dead')") == 2 * slots, timeout_s=60)
        assert rig.query("SELECT state, error FROM tasks WHERE state != 'succeeded'") == []
        for kind in ("lease_expired", "lease_expired_dead", "stale_report_refused"):
            assert rig.count("SELECT count(*) FROM events WHERE kind = ?", kind) == 0, kind
        # The step reached the daemon (its wall clock) and what it records stayed on its own clock.
        started = [r[0] for r in rig.query("SELECT started_at FROM tasks")]
        assert max(started) - min(started) < HOUR_S, started
        assert a.stop() == 0, a.tail()
    finally:
        await rig.stop()


async def test_daemon_clock_steps_an_hour_back(tmp_path: Path) -> None:
    """The daemon's clock steps 1 h back while two tasks wait out a retry backoff and a killed
    agent holds two leases: the retries still run within their backoff, the leases expire
    within about a TTL, and the job ends."""
    offset_file = tmp_path / "faketime"
    env = faked_daemon_env(offset_file)
    backoff_s = 3.0
    rig = Rig(tmp_path, lease_ttl_s=2.0, worker=DAEMON_WORKER,
              queue={"retry_backoff_s": backoff_s, "retry_backoff_max_s": backoff_s})
    try:
        await rig.daemon.start(env=env)
        worker = await rig.daemon.post("/v1/workers", data=bundle(DAEMON_WORKER))
        rig.digest = worker["digest"]
        job = int((await rig.daemon.post("/v1/jobs", json={"name": "back", "worker": rig.digest,
                                                            "max_attempts": 5}))["id"])
        inst = await rig.register(4)
        a = rig.start_agent("A", inst, inst["url"], 4)
        await rig.until("A connected", lambda: bool(a.log("agent_connected")))
        marks = str(rig.marks)
        await submit(rig, job, [{"sleep": 0.0, "fail_once": True, "marks": marks}] * 2
                     + [{"sleep": 3.0, "marks": marks}] * 2)
        await rig.until("two tasks waiting out a backoff, two running", lambda: rig.query(
            "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state") == [("failed", 2), ("leased", 2)])
        # A dies holding two leases, and the clock steps back before any heartbeat could land.
        a.proc.kill()
        a.proc.wait()
        rig.agents.remove(a)
        offset_file.write_text(f"-{HOUR_S:.0f}\n")
        b_inst = await rig.register(4)
        b = rig.start_agent("B", b_inst, b_inst["url"], 4)
        # Backoff 3 s (+20 % jitter), lease TTL 2 s: before the fix, an hour each.
        await rig.until("A's leases expired", lambda: rig.count(
            "SELECT count(*) FROM events WHERE kind = 'lease_expired'") == 2, timeout_s=20)
        await rig.until("the retries ran", lambda: rig.count(
            "SELECT count(*) FROM tasks WHERE state = 'succeeded' AND failures = 1") == 4, timeout_s=30)
        assert b.stop() == 0, b.tail()
    finally:
        await rig.stop()
