"""agent.runner with real worker processes (tests/workers/): the three modes, their failures, timeouts
that must kill whole process groups, stream restarts, abort and cancellation."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agent import runner as runner_mod
from agent.modes import command as command_mode
from agent.runner import ABORTED_ERROR, Outcome, PermanentFailure, Runner
from cloudtask_wire.messages import MAX_ERROR_CHARS
from cloudtask_wire.workerspec import SPEC_FILE, WorkerSpec
from cloudtaskd.fleet.runtime import Target
from tests import paths
from tests.conftest import ROOT, interpreters, python_version, test_runtime

WORKERS = paths.WORKERS
CMD_DIR = WORKERS / "echo_cmd"
STREAM_DIR = WORKERS / "echo_stream"
PY_DIR = WORKERS / "py_worker"
PYTHON = shlex.quote(sys.executable)


# ---- helpers ----------------------------------------------------------------------------------------


async def poll_until(predicate: Callable[[], Any], timeout_s: float = 10.0, message: str = "condition") -> Any:
    """Poll a plain predicate until truthy; fail with a message at the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """A zombie counts as dead: in a container whose init never reaps, killed orphans stay zombies."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def read_pids(marker: Path) -> tuple[int, int]:
    """(worker pid, grandchild pid) once the worker has written them."""
    await poll_until(marker.exists, message=f"{marker.name} written by the worker")
    worker, grandchild = marker.read_text().split()
    return int(worker), int(grandchild)


async def assert_gone(*pids: int) -> None:
    for pid in pids:
        await poll_until(lambda pid=pid: not alive(pid), timeout_s=5, message=f"process {pid} to die")  # type: ignore[misc]


def command_runner(slots: int = 1, env: dict[str, str] | None = None) -> Runner:
    return Runner(WorkerSpec(mode="command", command=f"{PYTHON} worker.py"), CMD_DIR, slots, env)


@pytest.fixture
async def cmd() -> AsyncIterator[Runner]:
    r = command_runner(env={"RUNNER_TEST_EXTRA": "extra-value"})
    yield r
    await r.close()


@pytest.fixture
async def stream() -> AsyncIterator[Runner]:
    r = Runner(WorkerSpec(mode="stream", command=f"{PYTHON} -u worker.py"), STREAM_DIR, 2)
    yield r
    await r.close()


def python_runner(function: str, slots: int = 2) -> Runner:
    return Runner(WorkerSpec(mode="python", function=function), PY_DIR, slots)


@pytest.fixture
def pyworker() -> ModuleType:
    """The worker module as the runner imports it (same sys.modules entry), reset for this test."""
    if str(PY_DIR) not in sys.path:
        sys.path.insert(0, str(PY_DIR))
    import runner_pyworker  # type: ignore[import-not-found]  # reason: lives in tests/workers, not a package

    runner_pyworker.release.clear()
    runner_pyworker.started.clear()
    return runner_pyworker  # type: ignore[no-any-return]


def failed(outcome: Outcome, *, retryable: bool) -> str:
    assert not outcome.ok, outcome
    assert outcome.retryable is retryable, outcome
    assert outcome.error is not None
    assert len(outcome.error) <= MAX_ERROR_CHARS
    return outcome.error


# ---- the example specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_dir", [CMD_DIR, STREAM_DIR, PY_DIR])
def test_example_specs_validate(worker_dir: Path) -> None:
    spec = WorkerSpec.from_dict(yaml.safe_load((worker_dir / SPEC_FILE).read_text()))
    assert spec.mode in ("command", "stream", "python")


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="slots"):
        Runner(WorkerSpec(mode="python", function="m:f"), PY_DIR, 0)
    with pytest.raises(ValueError, match="command"):
        Runner(WorkerSpec(mode="stream"), STREAM_DIR, 1)


# ---- command mode ----------------------------------------------------------------------------------


async def test_command_success(cmd: Runner) -> None:
    outcome = await cmd.run(0, "task-1", {"value": [1, "two"]}, None)
    assert outcome.ok, outcome
    assert outcome.result == {
        "id": "task-1",
        "value": [1, "two"],
        "env_task_id": "task-1",
        "env_slot": "0",
        "env_extra": "extra-value",
        "cwd": str(CMD_DIR),
    }
    assert outcome.duration_s > 0


async def test_command_empty_stdout_is_null(cmd: Runner) -> None:
    outcome = await cmd.run(0, "t", {"op": "empty"}, 10)
    assert outcome == Outcome(True, None, None, True, outcome.duration_s)


async def test_command_exit_1_is_retryable_with_stderr(cmd: Runner) -> None:
    error = failed(await cmd.run(0, "t", {"op": "fail"}, 10), retryable=True)
    assert "exited with code 1" in error
    assert "disk on fire" in error


async def test_command_exit_3_is_permanent(cmd: Runner) -> None:
    error = failed(await cmd.run(0, "t", {"op": "permanent"}, 10), retryable=False)
    assert "exited with code 3" in error
    assert "value must be positive" in error


async def test_command_non_json_stdout(cmd: Runner) -> None:
    error = failed(await cmd.run(0, "t", {"op": "garbage"}, 10), retryable=True)
    assert "not JSON" in error
    assert "hello, this is not JSON" in error
    assert "exited with code 0" not in error  # "worker exited 0" says it once


async def test_command_killed_by_signal(cmd: Runner) -> None:
    error = failed(await cmd.run(0, "t", {"op": "signal"}, 10), retryable=True)
    assert "SIGKILL" in error


async def test_command_stderr_keeps_only_the_tail(cmd: Runner) -> None:
    error = failed(await cmd.run(0, "t", {"op": "big_stderr"}, 10), retryable=True)
    assert "THE END" in error
    assert error.count("noise") <= runner_mod.STDERR_TAIL_CHARS // len("noise\n") + 1


async def test_command_stdout_flood_is_capped(cmd: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command_mode, "MAX_STDOUT_BYTES", 1024 * 1024)
    error = failed(await cmd.run(0, "t", {"op": "flood"}, 30), retryable=True)
    assert "more than 1048576 bytes" in error


async def test_command_worker_may_ignore_large_stdin() -> None:
    r = command_runner(env={"RUNNER_TEST_SKIP_STDIN": "1"})
    try:
        outcome = await r.run(0, "t", {"blob": "x" * (4 * 1024 * 1024)}, 10)
    finally:
        await r.close()
    assert outcome.ok and outcome.result == {"skipped_stdin": True}, outcome


async def test_command_timeout_kills_the_process_group(cmd: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    run = asyncio.create_task(cmd.run(0, "t", {"op": "hang", "marker": str(marker)}, 2.0))
    worker, grandchild = await read_pids(marker)
    assert alive(worker) and alive(grandchild)
    error = failed(await run, retryable=True)
    assert "timed out after 2 s" in error
    # The grandchild ignores SIGTERM: only the SIGKILL to the group after the grace can stop it.
    await assert_gone(worker, grandchild)


async def test_command_leftover_background_process_is_killed(cmd: Runner, tmp_path: Path) -> None:
    """A grandchild holding stdout open neither blocks the result nor outlives the task."""
    marker = tmp_path / "pids"
    outcome = await cmd.run(0, "t", {"op": "background", "marker": str(marker)}, None)
    assert outcome.ok and outcome.result == {"done": True}, outcome
    _, grandchild = await read_pids(marker)
    await assert_gone(grandchild)


async def test_command_abort(cmd: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    run = asyncio.create_task(cmd.run(0, "t", {"op": "hang", "marker": str(marker)}, None))
    worker, grandchild = await read_pids(marker)
    await cmd.abort(0)
    assert failed(await run, retryable=True) == ABORTED_ERROR
    await assert_gone(worker, grandchild)
    await cmd.abort(0)  # idle slot: nothing to do
    assert (await cmd.run(0, "after", {}, 10)).ok


async def test_command_cancelled_run_kills_the_group(cmd: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    run = asyncio.create_task(cmd.run(0, "t", {"op": "hang", "marker": str(marker)}, None))
    worker, grandchild = await read_pids(marker)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await assert_gone(worker, grandchild)
    assert (await cmd.run(0, "after", {}, 10)).ok


async def test_command_missing_program_fails_for_good() -> None:
    # The shell's 127: no attempt on any instance will find it.
    r = Runner(WorkerSpec(mode="command", command="./no-such-program"), CMD_DIR, 1)
    error = failed(await r.run(0, "t", {}, 10), retryable=False)
    assert error.startswith("worker command not found, not retried")
    assert "exited with code 127" in error
    assert "no-such-program" in error


async def test_command_not_executable_fails_for_good(tmp_path: Path) -> None:
    (tmp_path / "prog").write_text("#!/bin/sh\necho hi\n")  # no execute bit: the shell's 126
    r = Runner(WorkerSpec(mode="command", command="./prog"), tmp_path, 1)
    error = failed(await r.run(0, "t", {}, 10), retryable=False)
    assert error.startswith("worker command cannot be executed, not retried")
    assert "exited with code 126" in error


async def test_command_task_id_with_nul_fails_for_good(cmd: Runner) -> None:
    # It cannot go into CLOUDTASK_TASK_ID: an Outcome, not an exception that strands the lease.
    error = failed(await cmd.run(0, "nul\x00id", {}, 10), retryable=False)
    assert "NUL" in error
    assert (await cmd.run(0, "fine", {}, 10)).ok  # the slot is free again


async def test_slot_misuse_raises(cmd: Runner) -> None:
    with pytest.raises(ValueError, match="outside"):
        await cmd.run(1, "t", {}, None)
    with pytest.raises(ValueError, match="outside"):
        await cmd.abort(-1)


# ---- stream mode -----------------------------------------------------------------------------------


async def test_stream_success_reuses_the_process(stream: Runner) -> None:
    first = await stream.run(0, "a", {"value": 1}, 10)
    second = await stream.run(0, "b", {"value": {"nested": True}}, 10)
    assert first.ok and second.ok, (first, second)
    assert first.result["value"] == 1 and second.result["value"] == {"nested": True}
    assert first.result["pid"] == second.result["pid"]
    assert first.result["slot"] == "0"


async def test_stream_slots_have_their_own_processes(stream: Runner) -> None:
    a, b = await asyncio.gather(stream.run(0, "a", {}, 10), stream.run(1, "b", {}, 10))
    assert a.ok and b.ok
    assert a.result["pid"] != b.result["pid"]
    assert (a.result["slot"], b.result["slot"]) == ("0", "1")


async def test_stream_errors(stream: Runner) -> None:
    pid = (await stream.run(0, "a", {}, 10)).result["pid"]
    assert failed(await stream.run(0, "b", {"op": "fail"}, 10), retryable=True) == "upstream returned 503"
    assert failed(await stream.run(0, "c", {"op": "permanent"}, 10), retryable=False) == "invalid input"
    assert "neither" in failed(await stream.run(0, "d", {"op": "no_result"}, 10), retryable=True)
    # Reported errors keep the protocol in step: no restart.
    assert (await stream.run(0, "e", {}, 10)).result["pid"] == pid


async def test_stream_blank_lines_are_skipped(stream: Runner) -> None:
    outcome = await stream.run(0, "a", {"op": "blank_first"}, 10)
    assert outcome.ok and outcome.result == "after blank", outcome


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("crash", "exited with code 7"),
        ("garbage", "debug: this is not JSON"),
        ("wrong_id", "someone-else"),
    ],
)
async def test_stream_restarts_after_protocol_break(stream: Runner, op: str, expected: str) -> None:
    pid = (await stream.run(0, "a", {}, 10)).result["pid"]
    error = failed(await stream.run(0, "b", {"op": op}, 10), retryable=True)
    assert expected in error
    if op == "crash":
        assert "segfault imminent" in error  # the stderr tail
    await assert_gone(pid)
    after = await stream.run(0, "c", {"value": 3}, 10)
    assert after.ok and after.result["value"] == 3, after
    assert after.result["pid"] != pid


async def test_stream_timeout_kills_the_group_and_restarts(stream: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    run = asyncio.create_task(stream.run(0, "t", {"op": "hang", "marker": str(marker)}, 2.0))
    worker, grandchild = await read_pids(marker)
    error = failed(await run, retryable=True)
    assert "timed out after 2 s" in error
    await assert_gone(worker, grandchild)
    after = await stream.run(0, "next", {}, 10)
    assert after.ok and after.result["pid"] != worker


async def test_stream_abort(stream: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    run = asyncio.create_task(stream.run(1, "t", {"op": "hang", "marker": str(marker)}, None))
    worker, grandchild = await read_pids(marker)
    await stream.abort(1)
    assert failed(await run, retryable=True) == ABORTED_ERROR
    await assert_gone(worker, grandchild)
    assert (await stream.run(1, "next", {}, 10)).ok


async def test_stream_close_stops_the_processes(stream: Runner) -> None:
    pids = [(await stream.run(slot, "a", {}, 10)).result["pid"] for slot in (0, 1)]
    await stream.close()
    await assert_gone(*pids)
    closed = await stream.run(0, "late", {}, 10)
    assert not closed.ok and closed.retryable


async def test_stream_worker_that_cannot_start() -> None:
    r = Runner(WorkerSpec(mode="stream", command=f"{PYTHON} -c 'import sys; sys.exit(\"no model file\")'"),
               STREAM_DIR, 1)
    try:
        error = failed(await r.run(0, "t", {}, 10), retryable=True)
    finally:
        await r.close()
    assert "no model file" in error


# ---- python mode -----------------------------------------------------------------------------------


async def test_python_sync_runs_in_a_worker_thread(pyworker: ModuleType) -> None:
    r = python_runner("runner_pyworker:handle")
    outcome = await r.run(0, "t1", {"value": 5}, None)
    assert outcome.ok, outcome
    assert outcome.result["id"] == "t1" and outcome.result["value"] == 5
    assert outcome.result["thread"].startswith("cloudtask-worker")
    await r.close()


async def test_python_async_runs_on_the_loop(pyworker: ModuleType) -> None:
    r = python_runner("runner_pyworker:ahandle")
    outcome = await r.run(0, "t1", {"value": 5}, 10)
    assert outcome.ok, outcome
    assert outcome.result["thread"] == threading.current_thread().name
    await r.close()


@pytest.mark.parametrize("function", ["runner_pyworker:handle", "runner_pyworker:ahandle"])
async def test_python_failures(pyworker: ModuleType, function: str) -> None:
    r = python_runner(function)
    error = failed(await r.run(0, "t", {"op": "fail", "value": 7}, 10), retryable=True)
    assert error.startswith("ValueError: bad value 7")
    assert "runner_pyworker.py" in error  # traceback tail
    own = failed(await r.run(0, "t", {"op": "permanent_own"}, 10), retryable=False)
    assert own == "cannot process this input"
    agents = failed(await r.run(0, "t", {"op": "permanent_agent"}, 10), retryable=False)
    assert agents == "rejected by the agent's class"
    assert "JSON-serializable" in failed(await r.run(0, "t", {"op": "not_json"}, 10), retryable=False)
    await r.close()


def test_permanent_failure_is_exported() -> None:
    assert issubclass(PermanentFailure, Exception)


async def test_python_async_timeout(pyworker: ModuleType) -> None:
    r = python_runner("runner_pyworker:ahandle")
    error = failed(await r.run(0, "t", {"op": "hang"}, 0.2), retryable=True)
    assert error == "timed out after 0.2 s"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert (await r.run(0, "t2", {}, 0.2)).ok


async def test_python_sync_timeout_leaves_the_thread_but_frees_the_slot(pyworker: ModuleType) -> None:
    r = python_runner("runner_pyworker:handle", slots=1)
    try:
        error = failed(await r.run(0, "t", {"op": "hang"}, 0.2), retryable=True)
        assert error.startswith("timed out after 0.2 s")
        # The stuck thread does not take the only slot's thread.
        assert (await r.run(0, "t2", {"value": 1}, 5)).ok
    finally:
        pyworker.release.set()
        await r.close()


@pytest.mark.parametrize("function", ["runner_pyworker:handle", "runner_pyworker:ahandle"])
async def test_python_abort(pyworker: ModuleType, function: str) -> None:
    r = python_runner(function)
    cancelling: list[int] = []

    async def run_and_check() -> Outcome:
        outcome = await r.run(1, "t", {"op": "hang"}, None)
        task = asyncio.current_task()
        assert task is not None
        cancelling.append(task.cancelling())  # the abort's cancel must not leak to the caller
        return outcome

    try:
        run = asyncio.create_task(run_and_check())
        await poll_until(lambda: "t" in pyworker.started, message="the worker to start")
        await r.abort(1)
        assert failed(await run, retryable=True) == ABORTED_ERROR
        assert cancelling == [0]
    finally:
        pyworker.release.set()
        await r.close()


async def test_python_abort_swallowed_cancel(pyworker: ModuleType) -> None:
    """A worker that swallows CancelledError still yields "aborted", and the cancel request is withdrawn."""
    r = python_runner("runner_pyworker:ahandle")

    async def run_then_sleep() -> Outcome:
        outcome = await r.run(0, "t", {"op": "swallow_cancel"}, None)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        async with asyncio.timeout(5):  # would raise at once with a leaked cancel request
            await asyncio.sleep(0)
        return outcome

    run = asyncio.create_task(run_then_sleep())
    await poll_until(lambda: "t" in pyworker.started, message="the worker to start")
    await r.abort(0)
    assert failed(await run, retryable=True) == ABORTED_ERROR


async def test_python_caller_cancellation_propagates(pyworker: ModuleType) -> None:
    r = python_runner("runner_pyworker:ahandle")
    run = asyncio.create_task(r.run(0, "t", {"op": "hang"}, None))
    await poll_until(lambda: "t" in pyworker.started, message="the worker to start")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert (await r.run(0, "t2", {}, None)).ok


async def test_python_import_error() -> None:
    r = python_runner("runner_no_such_module:fn")
    error = failed(await r.run(0, "t", {}, None), retryable=True)
    assert "cannot load worker function 'runner_no_such_module:fn'" in error
    assert "ModuleNotFoundError" in error


async def test_python_async_throughput(pyworker: ModuleType) -> None:
    """Many tasks through the async path, as the agent's slots would push them (no thread hop)."""
    r = python_runner("runner_pyworker:noop", slots=8)
    n = 4000

    async def slot_loop(slot: int) -> int:
        ok = 0
        for i in range(slot, n, 8):
            outcome = await r.run(slot, str(i), i, 30.0)
            ok += outcome.ok and outcome.result == i
        return ok

    assert sum(await asyncio.gather(*(slot_loop(s) for s in range(8)))) == n


# ---- on an instance's own Python ------------------------------------------------------------------

_ON_INTERPRETER = """
import asyncio, json, pathlib, sys
from agent.runner import Runner
from cloudtask_wire.workerspec import WorkerSpec

async def main():
    worker = pathlib.Path(sys.argv[1])
    (worker / "failing.py").write_text(
        "class PermanentFailure(Exception):\\n    pass\\n"
        "def boom(key, data):\\n    raise ValueError('boom ' + key)\\n"
        "def final(key, data):\\n    raise PermanentFailure('no ' + key)\\n")
    out = []
    for fn in ("boom", "final"):
        runner = Runner(WorkerSpec.from_dict({"mode": "python", "function": "failing:" + fn}), worker, 1)
        o = await runner.run(0, "t1", {}, 10)
        await runner.close()
        out.append({"ok": o.ok, "error": o.error, "retryable": o.retryable})
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.parametrize("python", interpreters())
async def test_python_mode_failures_on_every_interpreter(tmp_path: Path, python: str) -> None:
    """A python-mode worker's exception becomes a failure with its traceback on each Python an instance
    may have (3.9 up), with the agent's own runtime for that Python, as on a VM."""
    version = python_version(python)
    if version < (3, 9):
        pytest.skip(f"{python} is older than the 3.9 an instance needs")
    runtime = await test_runtime().get(Target(version, platform.machine()))
    site = tmp_path / "site"
    with tarfile.open(runtime.path) as tar:
        tar.extractall(site, filter="data")
    worker = tmp_path / "worker"
    worker.mkdir()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"}
    run = await asyncio.create_subprocess_exec(python, "-c", _ON_INTERPRETER, str(worker), env=env, cwd=tmp_path,
                                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, err.decode()
    boom, final = json.loads(out)
    assert not boom["ok"] and boom["retryable"], boom
    assert boom["error"].startswith("ValueError: boom t1") and "Traceback" in boom["error"], boom["error"]
    assert not final["ok"] and not final["retryable"] and final["error"] == "no t1", final


async def test_a_worker_killed_on_cancel_is_reaped_before_its_transport_closes(tmp_path: Path) -> None:
    """Cancelling a task kills its worker's group and waits for the exit: closed first, the transport
    left a process the loop might never reap (a zombie, and Popen's ResourceWarning at exit)."""
    from agent import process

    child = await process.spawn("sleep 30", tmp_path, dict(os.environ), 1 << 16, None)
    await process.kill_on_cancel(child)
    assert child.exited.done()
    assert child.transport.get_returncode() == -9
    stat = Path(f"/proc/{child.pgid}/stat")
    assert not stat.exists(), stat.read_text()  # reaped: not even a zombie
