"""Failures are shown, not hidden: a launch that fails the same way every time is blocked and its
job paused with the reason (cloudtaskctl run exits 4), while failures that pass do not block; each
failed launch is printed by `run` as it happens. A real daemon; the e2e test a real OpenSSH host
that refuses the daemon's key."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pytest
import yaml

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.ctl.commands import EXIT_BLOCKED, format_failure, job_exit_status
from cloudtaskd.ctl.progress import ProgressDisplay
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import CapacityError, InvalidRequest
from cloudtaskd.fleet.bootstrap import DeployError
from cloudtaskd.fleet.orchestrator.failures import LaunchFailures, cause, key_line
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer
from tests import paths
from tests.conftest import UnixApi, make_config
from tests.fakes import sshd as sshd_mod
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import bundle
from tests.unit.core.test_hub import job_with_tasks

ROOT = paths.ROOT

ENSUREPIP = (  # as bootstrap.DeployError words it, after "instance ID: environment: "
    "exit code 1: The virtual environment was not created successfully because"
    " ensurepip is not available.  On Debian/Ubuntu systems, you need to install the python3-venv\n"
    "package using the following command.\n\n    apt install python3.{minor}-venv\n\n"
    "Failing command: /root/.cloudtask/{inst}/venv/bin/python3\n"
)


def test_the_key_line_and_the_cause_of_a_bootstrap_error() -> None:
    a = str(DeployError("ssh-0123456789ab", "environment", ENSUREPIP.format(inst="ssh-0123456789ab", minor=11)))
    b = str(DeployError("ssh-ba9876543210", "environment", ENSUREPIP.format(inst="ssh-ba9876543210", minor=11)))
    assert key_line(a).startswith("environment: exit code 1: The virtual environment was not created")
    assert "ensurepip is not available" in key_line(a)
    assert cause(a) == cause(b)  # another instance, the same cause
    assert cause("instance aws-0123456789ab: ssh: 10.0.0.7:22 did not answer within 300 s: timed out") == cause(
        "instance aws-ffffffffffff: ssh: 10.0.3.9:22 did not answer within 300 s: timed out")
    assert cause(a) != cause("instance ssh-0123456789ab: ssh: root@127.0.0.1 refused our key: Permission denied")
    assert key_line(None) == "(no reason given)"
    assert len(key_line("x" * 5000)) <= 300


def test_three_in_a_row_with_one_cause_block_and_anything_between_resets() -> None:
    f = LaunchFailures(block_after=3)
    assert f.failed(1, "o", "boom 1") is None and f.failed(1, "o", "boom 2") is None
    blocked = f.failed(1, "o", "boom 3")
    assert blocked is not None and blocked.count == 3 and f.is_blocked(1, "o")
    assert not f.is_blocked(2, "o") and not f.is_blocked(1, "p")  # another worker, another offer
    assert f.failed(1, "o", "boom 4") is None  # counted once
    assert [b.offer for b in f.clear(1)] == ["o"] and not f.is_blocked(1, "o")
    # Another cause between, or a success between: no block.
    for error in ("a", "b", "a", "b", "a", "b"):
        assert f.failed(1, "o", error) is None
    f.failed(1, "o", "c")
    f.failed(1, "o", "c")
    f.reset(1, "o")
    assert f.failed(1, "o", "c") is None and not f.is_blocked(1, "o")


class _Scripted:
    """A provider whose launches fail as the test says, one error per launch."""

    name = "fake"

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.launches = 0

    def offers(self) -> list[Offer]:
        return [Offer(self.name, "box", "zone-a", False, 1, price_per_hour=0.0)]

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        self.launches += 1
        raise self.errors[(self.launches - 1) % len(self.errors)]

    async def terminate(self, instance_id: str) -> None:
        return None

    async def list_instances(self) -> list[CloudInstance]:
        return []

    async def close(self) -> None:
        return None


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi, str]]:
    """A daemon with no instances of its own: the test's reconciler, on a scripted provider, launches."""
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(config.socket_path)
    _, worker = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
    try:
        yield d, api, worker["digest"]
    finally:
        await api.close()
        await d.stop()


async def _launched(api: UnixApi) -> int:
    _, page = await api.request("GET", "/v1/events?tail=10000&kind=instance_requested")
    return len(page["events"])


async def _ticks(reconciler: Reconciler, n: int, start: float) -> float:
    # Far apart: the per-pool and per-offer back-offs (at most 30 min) have passed at each.
    for _ in range(n):
        start += 3600.0
        await reconciler.tick(now=start)
    return start


async def test_the_same_failure_three_times_blocks_the_offer_and_pauses_the_job(
        daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    provider = _Scripted([DeployError(f"fake-{i:012x}", "environment", ENSUREPIP.format(inst=f"fake-{i:012x}",
                                                                                         minor=9 + i))
                          for i in range(3)])
    reconciler = Reconciler(store=d.store, dispatcher=d.dispatcher, providers=[(provider, 4)],  # type: ignore[list-item]
                            config=d.config, agent_url=d.agent_url, metrics=d.metrics,
                            sessions=d.dispatcher.sessions)
    job_id = await job_with_tasks(api, digest, 1)
    now = await _ticks(reconciler, 6, time.time())
    assert provider.launches == 3 and await _launched(api) == 3  # then no more
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "paused" and job["pause_cause"] == "launch_failures", job
    assert "ensurepip is not available" in job["state_reason"] and f"resume {job_id}" in job["state_reason"]
    assert job_exit_status(job) == EXIT_BLOCKED
    # The job's failures, through the filter `run` and `watch` use; and on the status page.
    _, page = await api.request(
        "GET", f"/v1/events?after=0&job={job_id}&kind=instance_launch_failed,instance_start_failed,offer_blocked")
    kinds = [e["kind"] for e in page["events"]]
    assert kinds == ["instance_launch_failed"] * 3 + ["offer_blocked"], kinds
    lines = [format_failure(e) for e in page["events"]]
    assert lines[0].startswith("launch failed: fake-") and "ensurepip is not available" in lines[0], lines
    assert lines[-1].startswith("launches stopped: offer fake/zone-a/box/on-demand: 3 launches"), lines
    _, status = await api.request("GET", "/v1/status")
    assert any(e["kind"] == "offer_blocked" for e in status["errors"])
    # Fixed, then resumed: a fresh try.
    await api.request("POST", f"/v1/jobs/{job_id}/resume")
    await _ticks(reconciler, 1, now)
    assert provider.launches == 4


async def test_failures_that_pass_or_differ_do_not_block(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    refused = InvalidRequest("fake", "launch", "InvalidAMIID.NotFound: The image id '[ami-0123456789abcdef0]'")
    provider = _Scripted([
        refused, refused, CapacityError("fake", "launch", "InsufficientInstanceCapacity"),  # a stock-out between
        DeployError("fake-000000000001", "ssh", "10.0.0.1:22 did not answer within 300 s"),
        DeployError("fake-000000000002", "environment", "exit code 1: No module named venv"),
    ])
    reconciler = Reconciler(store=d.store, dispatcher=d.dispatcher, providers=[(provider, 4)],  # type: ignore[list-item]
                            config=d.config, agent_url=d.agent_url, metrics=d.metrics,
                            sessions=d.dispatcher.sessions)
    job_id = await job_with_tasks(api, digest, 1)
    await _ticks(reconciler, 10, time.time())
    assert provider.launches == 10
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "active" and job["pause_cause"] is None, job


def test_a_failure_line_is_printed_above_the_progress_bar() -> None:
    stream = StringIO()
    display = ProgressDisplay(stream, tty=True)
    job = {"id": 1, "counts": {"total": 2, "queued": 2}, "instances": 0}
    display.update(job, force=True)
    display.message(format_failure({"kind": "instance_launch_failed", "instance_id": "ssh-0123456789ab",
                                    "detail": "instance ssh-0123456789ab: ssh: refused our key\x1b[2J"}))
    display.update(job)  # redrawn at once under the message, not after the rate limit
    text = stream.getvalue()
    first_bar, rest = text[1:].split("\r", 1)
    blank, after = rest.split("\r", 1)
    message, second_bar = after.split("\n", 1)
    assert "ETA --" in first_bar and blank == " " * len(first_bar)  # the bar is wiped, not written over
    assert message == "launch failed: ssh-0123456789ab (ssh): ssh: refused our key\\x1b[2J", text
    assert second_bar.startswith("\r[") and "ETA --" in second_bar, text  # drawn again, under it


@pytest.fixture
def refusing_sshd(tmp_path: Path) -> Iterator[sshd_mod.Sshd]:
    """A real OpenSSH host that does not know the key the daemon logs in with."""
    why = sshd_mod.available()
    if why:
        pytest.skip(why)
    server = sshd_mod.Sshd(tmp_path / "sshd")
    server.start()
    (server.dir / "authorized_keys").write_text("")
    yield server
    server.stop()


def test_run_shows_each_failed_launch_and_exits_4_when_every_launch_fails_the_same_way(
        tmp_path: Path, refusing_sshd: sshd_mod.Sshd) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "log_level": "warning",
        "scaling": {"tick_s": 0.1},
        "providers": {"local": {"enabled": False}, "ssh": {"hosts": [{
            "address": "127.0.0.1", "port": refusing_sshd.port, "key_file": str(refusing_sshd.client_key),
            "host_key": refusing_sshd.public_host_key()}]}},
    }))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a", "data": {"n": 1}}\n')
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cloudtaskd.ctl", "run", "--tasks", str(tasks), "--worker",
         str(ROOT / "examples" / "worker"), "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == EXIT_BLOCKED, proc.stderr
    assert time.monotonic() - started < 60  # back-offs of 1 s and 2 s, then blocked
    failed = [line for line in proc.stderr.splitlines() if line.startswith("launch failed: ssh-")]
    assert len(failed) == 3 and all("refused our key" in line for line in failed), proc.stderr
    assert any(line.startswith("launches stopped: offer ssh/127.0.0.1:") for line in proc.stderr.splitlines())
    assert "paused: no instance can start for this job" in proc.stdout and "refused our key" in proc.stdout
    db = sqlite3.connect(tmp_path / "state" / "cloudtask.db")
    try:
        launched = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        cause_ = db.execute("SELECT pause_cause FROM jobs").fetchone()[0]
    finally:
        db.close()
    assert launched == 3 and cause_ == "launch_failures"
