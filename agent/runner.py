"""Runs the user's worker, one task at a time per slot, in one of the modes of `WorkerSpec.mode`:

- command (`agent/modes/command.py`): one process per task, stdin in, stdout out;
- stream (`agent/modes/stream.py`): one long-lived process per slot, a JSON line in and out per task;
- python (`agent/modes/function.py`): `module:function` called in the agent's own process.

Worker processes lead their own process groups and are stopped as groups (`agent/process.py`).

`run()` never raises for a worker's faults: they come back as an `Outcome`. Cancelling the task awaiting
`run()` is supported and kills the slot's processes at once (SIGKILL); `abort()` stops them with SIGTERM
first and makes the pending `run()` return an "aborted" failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.modes.base import Mode, SlotFlags
from agent.modes.command import MAX_STDOUT_BYTES, CommandMode
from agent.modes.function import FunctionMode
from agent.modes.stream import STREAM_LINE_LIMIT_BYTES, StreamMode
from agent.outcome import ABORTED_ERROR, Outcome, PermanentFailure
from agent.process import KILL_GRACE_S, STDERR_TAIL_CHARS, shell_command
from cloudtask_wire.workerspec import WorkerSpec

MODES: dict[str, type[Mode]] = {"command": CommandMode, "stream": StreamMode, "python": FunctionMode}


class Runner:
    """Runs tasks for `slots` concurrent slots; the caller runs at most one task per slot at a time.

    `timeout_s` given to `run()` is the effective timeout (the caller resolves its precedence over
    `spec.timeout`); None means none. `env` is merged over os.environ for child processes, which also get
    CLOUDTASK_SLOT, and CLOUDTASK_TASK_ID in command mode. Python-mode workers share the agent's process
    and environment.
    """

    def __init__(self, spec: WorkerSpec, worker_dir: Path, slots: int, env: dict[str, str] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        mode = MODES.get(spec.mode)
        if mode is None:
            raise ValueError(f"unknown worker mode {spec.mode!r}")
        self.spec = spec
        self.worker_dir = worker_dir
        self.slots = slots
        self._flags = SlotFlags(slots)
        self._closed = False
        self._mode = mode(spec, worker_dir, self._flags, {**os.environ, **(env or {})})

    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        """Run one task in `slot`; a worker's fault is an Outcome, never an exception."""
        self._check(slot)
        flags = self._flags
        if flags.busy[slot]:
            raise RuntimeError(f"slot {slot} is already running a task")
        if self._closed:
            return Outcome(False, None, "the agent's runner is shut down", True, 0.0)
        flags.busy[slot] = True
        flags.aborted[slot] = False
        try:
            return await self._mode.run(slot, key, data, timeout_s)
        finally:
            flags.busy[slot] = False
            flags.aborted[slot] = False

    async def abort(self, slot: int) -> None:
        """Stop the task running in `slot` (job cancelled); its `run()` returns an "aborted" failure.

        Processes get SIGTERM, then SIGKILL after KILL_GRACE_S. A python coroutine is cancelled; a python
        thread cannot be stopped and finishes in the background. No-op when the slot is idle."""
        self._check(slot)
        if not self._flags.busy[slot]:
            return
        self._flags.aborted[slot] = True
        await self._mode.abort(slot)

    async def close(self) -> None:
        """Stop every process: stream workers get EOF on stdin and KILL_GRACE_S to exit, running command
        workers SIGTERM; then SIGKILL. Python threads still running are left to finish."""
        if self._closed:
            return
        self._closed = True
        await self._mode.close()

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside range({self.slots})")


__all__ = ["ABORTED_ERROR", "KILL_GRACE_S", "MAX_STDOUT_BYTES", "STDERR_TAIL_CHARS", "STREAM_LINE_LIMIT_BYTES",
           "Outcome", "PermanentFailure", "Runner", "shell_command"]
