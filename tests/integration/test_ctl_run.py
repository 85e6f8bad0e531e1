"""`cloudtaskctl run` end to end, as a user runs it: a real process, an embedded daemon, the
local provider, real agents, a results file and an exit status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.fleet.providers.local import _start_time
from tests import paths
from tests.fakes.moto_ec2 import MotoEc2

ROOT = paths.ROOT


def ctl(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(f"state_dir: {tmp_path / 'state'}\nscaling:\n  tick_s: 0.2\n")
    return subprocess.run(
        [sys.executable, "-m", "cloudtaskd.ctl", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def read_results(path: Path) -> dict[str, dict[str, object]]:
    return {r["id"]: r for r in (json.loads(line) for line in path.read_text().splitlines())}


def test_run_the_example_job(tmp_path: Path) -> None:
    tasks = json.loads((ROOT / "examples" / "tasks.json").read_text())
    proc = ctl(tmp_path, "run", "--tasks", str(ROOT / "examples" / "tasks.json"),
               "--worker", str(ROOT / "examples" / "worker"), "--results", "out.jsonl")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "out.jsonl")
    assert set(results) == {t["id"] for t in tasks}
    for t in tasks:
        r = results[t["id"]]
        assert set(r) == {"id", "status", "result", "attempts", "instance", "duration_s"}
        assert r["status"] == "succeeded" and r["result"] == {"n": t["data"]["n"], "square": t["data"]["n"] ** 2}
    # The embedded daemon is gone and left no agent behind.
    assert not (tmp_path / "state" / "cloudtaskd.sock").exists()
    assert not list((tmp_path / "state" / "local").glob("*.json"))


def test_run_reports_failures_with_exit_1(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "good", "data": {"n": 2}}\n{"id": "bad", "data": {"n": "two"}}\n')
    proc = ctl(tmp_path, "run", "--tasks", str(tasks), "--worker", str(ROOT / "examples" / "worker"))
    assert proc.returncode == 1, proc.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert results["good"]["status"] == "succeeded"
    assert results["bad"]["status"] == "dead" and "must be an integer" in str(results["bad"]["error"])


def test_bad_task_file_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    tasks = tmp_path / "broken.jsonl"
    tasks.write_text('{"id": "a"}\n{"id": "b"}\n{"data": 1}\n')
    proc = ctl(tmp_path, "run", "--tasks", str(tasks), "--worker", str(ROOT / "examples" / "worker"))
    assert proc.returncode == 2
    assert 'broken.jsonl:3: missing "id"' in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_bad_worker_is_reported_before_anything_starts(tmp_path: Path) -> None:
    worker = tmp_path / "w"
    worker.mkdir()
    (worker / "cloudtask.yaml").write_text("mode: stream\n")
    proc = ctl(tmp_path, "run", "--tasks", str(ROOT / "examples" / "tasks.json"), "--worker", str(worker))
    assert proc.returncode == 2
    assert "cloudtask.yaml" in proc.stderr and "command" in proc.stderr
    assert not (tmp_path / "state").exists(), "nothing may start for a bad worker"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed (install.sh installs it)")
def test_run_with_worker_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "stream-worker", repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "worker"], check=True)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"id": i, "data": {"n": i}}) + "\n" for i in range(50)))
    proc = ctl(tmp_path, "run", "--tasks", str(tasks), "--worker-repo", f"file://{repo}")
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert len(results) == 50 and results["7"]["result"] == {"square": 49}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed (install.sh installs it)")
def test_run_with_a_seed_form_config_launches_on_aws(tmp_path: Path, moto: MotoEc2, creds: None) -> None:
    """Issue 15: `run --config config.yaml --tasks tasks.json --worker-repo URL --max-instances 10` with
    the original spec's top-level `aws:` section starts the job on AWS (moto's EC2 standing in)."""
    import boto3

    moto.reset()
    image = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url).describe_images(
        Owners=["amazon"])["Images"][0]["ImageId"]
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "stream-worker", repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "worker"], check=True)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"id": i, "data": {"n": i}} for i in range(5)]))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nscaling:\n  tick_s: 0.2\nproviders:\n  local:\n    enabled: false\n"
        "aws:\n  access_key: testing\n  secret_key: ${CT_SEED_SECRET}\n  region: us-east-1\n"
        # moto instead of AWS; its VMs never answer SSH, so the run is stopped once a launch is seen.
        f"  endpoint_url: {moto.url}\n  image: {image}\n  ssh_address_override: 127.0.0.1:1\n")
    config.chmod(0o600)
    secret = "seed-secret-0123456789"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudtaskd.ctl", "run", "--config", str(config), "--tasks", str(tasks),
         "--worker-repo", f"file://{repo}", "--max-instances", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CT_SEED_SECRET": secret})
    try:
        deadline = time.monotonic() + 60
        while moto.calls["RunInstances"] == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert moto.calls["RunInstances"] > 0, "no launch on aws was attempted"
        assert proc.poll() is None, "the run ended before following the job"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "job 1: 5 tasks queued" in err and "cancelling job 1" in err
    log = (tmp_path / "state" / "cloudtaskd.log").read_text()
    assert secret not in err and secret not in log


# ---- reruns and runs side by side (issue 15) ----------------------------------------------------

# Each execution appends "<id>" to the file its task names, then takes `sleep` seconds: the test
# counts executions per task, across runs and daemons.
SLOW_WORKER = {
    "cloudtask.yaml": "mode: command\ncommand: python3 worker.py\ncpus_per_task: 1\ntimeout: 60\n",
    "worker.py": (
        "import json, os, sys, time\n"
        "task = json.loads(sys.stdin.read())\n"
        "d = task['data']\n"
        "fd = os.open(d['log'], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
        "os.write(fd, (str(task['id']) + '\\n').encode())\n"
        "os.close(fd)\n"
        "time.sleep(d['sleep'])\n"
        "print(json.dumps({'n': d['n']}))\n"
    ),
}
SLOTS = 2


def slow_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A worker directory and a config: one local instance of SLOTS slots, short run/agent bounds."""
    worker = tmp_path / "worker"
    worker.mkdir()
    for name, text in SLOW_WORKER.items():
        (worker / name).write_text(text)
    (tmp_path / "config.yaml").write_text(
        f"state_dir: {tmp_path / 'state'}\nscaling:\n  tick_s: 0.2\n  idle_timeout_s: 30\n"
        "api:\n  run_attach_ttl_s: 2\nagents:\n  reconnect_grace_s: 5\n  lease_ttl_s: 10\n"
        f"providers:\n  local:\n    max_instances: 1\n    cpus: {SLOTS}\n")
    return worker, tmp_path / "config.yaml"


def task_file(tmp_path: Path, name: str, n: int, sleep_s: float) -> Path:
    path = tmp_path / f"{name}.jsonl"
    log = tmp_path / f"{name}.log"
    path.write_text("".join(json.dumps({"id": f"{name}-{i}", "data": {"n": i, "sleep": sleep_s, "log": str(log)}})
                            + "\n" for i in range(n)))
    return path


def executions(tmp_path: Path, name: str) -> list[str]:
    log = tmp_path / f"{name}.log"
    return log.read_text().split() if log.exists() else []


def start_run(tmp_path: Path, tasks: Path, worker: Path, results: str, *extra: str) -> subprocess.Popen[str]:
    with (tmp_path / f"{results}.stderr").open("w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "cloudtaskd.ctl", "run", "--tasks", str(tasks), "--worker", str(worker),
             "--results", results, "--config", str(tmp_path / "config.yaml"), *extra],
            stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})


def stderr_of(tmp_path: Path, results: str) -> str:
    return (tmp_path / f"{results}.stderr").read_text()


def wait_until(predicate: Any, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {message}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout_s: float = 120) -> int:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def succeeded_in_db(state: Path) -> set[str]:
    """The tasks the (dead) daemon recorded as succeeded, read from its database as it was left."""
    db = sqlite3.connect(state / "cloudtask.db")
    try:
        return {r[0] for r in db.execute("SELECT key FROM tasks WHERE state = 'succeeded'")}
    finally:
        db.close()


def leased_in_db(state: Path) -> set[str]:
    db = sqlite3.connect(state / "cloudtask.db")
    try:
        return {r[0] for r in db.execute("SELECT key FROM tasks WHERE state = 'leased'")}
    finally:
        db.close()


def job_rows(state: Path) -> dict[int, tuple[str, str | None]]:
    db = sqlite3.connect(state / "cloudtask.db")
    try:
        return {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, state, pause_cause FROM jobs")}
    finally:
        db.close()


@pytest.fixture
def agents_reaped(tmp_path: Path) -> Iterator[None]:
    """Local agents a killed run left behind are stopped by their pids at the end, whatever happened."""
    yield
    for path in (tmp_path / "state" / "local").glob("*.json"):
        with contextlib.suppress(ValueError, KeyError, OSError):
            rec = json.loads(path.read_text())
            pid = int(rec["pid"])
            if _start_time(pid) == rec["start"]:  # that agent, not a process that got its pid since
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)


def check_results(tmp_path: Path, results: str, name: str, n: int) -> None:
    lines = (tmp_path / results).read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(f"{name}-{i}" for i in range(n)), "every task's result exactly once"
    assert all(json.loads(line)["status"] == "succeeded" for line in lines)


def test_run_killed_then_run_again_resumes_the_same_job(tmp_path: Path, agents_reaped: None) -> None:
    worker, _ = slow_setup(tmp_path)
    n = 30
    tasks = task_file(tmp_path, "a", n, 0.3)
    first = start_run(tmp_path, tasks, worker, "a.out")
    try:
        wait_until(lambda: len(set(executions(tmp_path, "a"))) >= 10, 90, "10 tasks started by the first run")
    finally:
        first.kill()  # SIGKILL: the run and the daemon in it, mid-job
        finish(first)
    done_at_kill = succeeded_in_db(tmp_path / "state")
    assert done_at_kill, "some tasks were recorded before the kill"
    started_at_kill = set(executions(tmp_path, "a"))

    again = start_run(tmp_path, tasks, worker, "a.out")
    assert finish(again) == 0, stderr_of(tmp_path, "a.out")
    err = stderr_of(tmp_path, "a.out")
    assert f"resuming job 1 ({len(done_at_kill)} of {n} done) from an earlier run; --fresh to start over" in err
    assert "tasks queued" not in err, "nothing was uploaded again"
    assert set(job_rows(tmp_path / "state")) == {1}, "no second job"
    check_results(tmp_path, "a.out", "a", n)
    runs = executions(tmp_path, "a")
    again_ran = [t for t in set(runs) if runs.count(t) > 1]
    assert not set(again_ran) & done_at_kill, "a task done before the kill ran again"
    # Only what was in flight at the kill may have run twice: started then, not recorded done.
    assert set(again_ran) <= started_at_kill - done_at_kill and len(again_ran) <= SLOTS, again_ran


def test_run_again_with_fresh_starts_over_and_cancels_the_stale_job(tmp_path: Path, agents_reaped: None) -> None:
    worker, _ = slow_setup(tmp_path)
    tasks = task_file(tmp_path, "f", 20, 0.3)
    first = start_run(tmp_path, tasks, worker, "f.out")
    try:
        wait_until(lambda: len(set(executions(tmp_path, "f"))) >= 4, 90, "4 tasks started by the first run")
    finally:
        first.kill()
        finish(first)
    again = start_run(tmp_path, tasks, worker, "f.out", "--fresh")
    assert finish(again) == 0, stderr_of(tmp_path, "f.out")
    err = stderr_of(tmp_path, "f.out")
    assert "--fresh: cancelled job 1" in err and "job 2: 20 tasks queued" in err
    assert job_rows(tmp_path / "state")[1][0] == "cancelled"
    check_results(tmp_path, "f.out", "f", 20)


@pytest.mark.parametrize("apart_s", [0.0, 3.0], ids=["together", "3s-apart"])
def test_two_runs_on_one_state_dir_both_finish(tmp_path: Path, agents_reaped: None, apart_s: float) -> None:
    worker, _ = slow_setup(tmp_path)
    a = task_file(tmp_path, "a", 12, 0.2)
    b = task_file(tmp_path, "b", 8, 0.2)
    run_a = start_run(tmp_path, a, worker, "a.out")
    if apart_s:
        time.sleep(apart_s)  # the scenario itself: the second run comes while the first works
    run_b = start_run(tmp_path, b, worker, "b.out")
    rc_a, rc_b = finish(run_a), finish(run_b)
    assert rc_a == 0, stderr_of(tmp_path, "a.out")
    assert rc_b == 0, stderr_of(tmp_path, "b.out")
    check_results(tmp_path, "a.out", "a", 12)
    check_results(tmp_path, "b.out", "b", 8)
    assert not (tmp_path / "state" / "cloudtaskd.sock").exists(), "the last run stopped the daemon"


def test_second_run_carries_on_when_the_run_holding_the_daemon_is_killed(tmp_path: Path,
                                                                        agents_reaped: None) -> None:
    worker, _ = slow_setup(tmp_path)
    a = task_file(tmp_path, "a", 40, 0.3)
    b = task_file(tmp_path, "b", 10, 0.3)
    owner = start_run(tmp_path, a, worker, "a.out")
    try:
        wait_until(lambda: len(executions(tmp_path, "a")) >= 2, 90, "the first run's job running")
        attached = start_run(tmp_path, b, worker, "b.out")
        wait_until(lambda: "job 2: 10 tasks queued" in stderr_of(tmp_path, "b.out"), 60,
                   "the second run's job queued on the first run's daemon")
    finally:
        owner.kill()
        finish(owner)
    assert finish(attached) == 0, stderr_of(tmp_path, "b.out")
    err = stderr_of(tmp_path, "b.out")
    assert "the daemon went away" in err and "carrying on with job 2" in err
    check_results(tmp_path, "b.out", "b", 10)
    # The killed run's job is held, not run behind the user's back, and the survivor said so.
    assert job_rows(tmp_path / "state")[1] == ("paused", "run_gone")
    assert "job 1 (a, " in err and "`cloudtaskctl resume 1`" in err


def test_a_killed_runs_job_is_held_not_run_ahead_of_the_next_run(tmp_path: Path, agents_reaped: None) -> None:
    """Another task file after a killed run: the new job runs alone; the old one is named, held, untouched."""
    worker, _ = slow_setup(tmp_path)
    a = task_file(tmp_path, "a", 30, 0.3)
    b = task_file(tmp_path, "b", 10, 0.2)
    first = start_run(tmp_path, a, worker, "a.out")
    try:
        wait_until(lambda: len(set(executions(tmp_path, "a"))) >= 4, 90, "4 tasks started by the first run")
    finally:
        first.kill()
        finish(first)
    held_by_agent = set(executions(tmp_path, "a")) | leased_in_db(tmp_path / "state")
    second = start_run(tmp_path, b, worker, "b.out")
    assert finish(second) == 0, stderr_of(tmp_path, "b.out")
    err = stderr_of(tmp_path, "b.out")
    assert "job 1 (a, " in err and "is held, not run: `cloudtaskctl resume 1`" in err
    assert "`cloudtaskctl cancel 1`" in err
    check_results(tmp_path, "b.out", "b", 10)
    # Same worker, so the same instance served both: none of the held job's tasks was leased again;
    # only those its agent already held at the kill (running, or fetched ahead) went on.
    assert set(executions(tmp_path, "a")) <= held_by_agent
    assert job_rows(tmp_path / "state")[1] == ("paused", "run_gone")
