"""`cloudtaskctl run` end to end, as a user runs it: a real process, an embedded daemon, the
local provider, real agents, a results file and an exit status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.moto_ec2 import MotoEc2

ROOT = Path(__file__).resolve().parent.parent


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
