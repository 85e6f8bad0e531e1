"""What every worker mode offers the runner, and what the two process-based modes share."""

from __future__ import annotations

import asyncio
import signal
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from agent import process
from agent.outcome import Outcome, failure
from cloudtask_wire.workerspec import WorkerSpec


class SlotFlags:
    """Per-slot flags the runner sets and its mode reads: `busy` while a task runs, `aborted` once
    `abort()` (or `close()`) has asked it to stop."""

    __slots__ = ("aborted", "busy")

    def __init__(self, slots: int) -> None:
        self.busy = [False] * slots
        self.aborted = [False] * slots


class Mode(ABC):
    """One worker mode. The runner calls `run` at most once per slot at a time."""

    def __init__(self, spec: WorkerSpec, worker_dir: Path, flags: SlotFlags, env: dict[str, str]) -> None:
        self.spec = spec
        self.worker_dir = worker_dir
        self.flags = flags
        self.env = env

    @abstractmethod
    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome: ...

    @abstractmethod
    async def abort(self, slot: int) -> None:
        """Stop the task running in `slot`; its `run()` returns an "aborted" failure."""

    @abstractmethod
    async def close(self) -> None:
        """Stop everything the mode started."""


class ProcessMode(Mode):
    """Command and stream modes: the worker is a process group per slot, optionally memory-limited."""

    def __init__(self, spec: WorkerSpec, worker_dir: Path, flags: SlotFlags, env: dict[str, str]) -> None:
        if not spec.command:
            raise ValueError(f"mode {spec.mode} needs a command")
        super().__init__(spec, worker_dir, flags, env)
        self.command: str = spec.command
        self.data_limit_bytes = spec.memory_per_task * 1024 * 1024 if spec.memory_per_task else None
        # command: the process of the running task; stream: the slot's long-lived process.
        self.children: list[process.Child | None] = [None] * len(flags.busy)

    async def abort(self, slot: int) -> None:
        child = self.children[slot]
        if child is not None:
            await process.stop(child, signal.SIGTERM)

    def close_gently(self, slot: int) -> bool:
        """Whether an idle slot's process may be ended by EOF on its stdin instead of SIGTERM."""
        return False

    async def close(self) -> None:
        stops = []
        for slot, child in enumerate(self.children):
            if child is None:
                continue
            if self.flags.busy[slot]:
                self.flags.aborted[slot] = True
            if not self.flags.busy[slot] and self.close_gently(slot):
                child.stdin.close()  # EOF: a well-behaved stream worker exits by itself
                stops.append(process.stop(child, None))
            else:
                stops.append(process.stop(child, signal.SIGTERM))
        await asyncio.gather(*stops)
        self.children = [None] * len(self.children)

    def out_of_memory(self, child: process.Child) -> bool:
        return self.data_limit_bytes is not None and child.out_of_memory()

    def memory_failure(self, child: process.Child, started: float) -> Outcome:
        """Not retried: the limit is the same on every instance (it is per task, not per machine) and a
        task's memory use follows from its data and the worker's code, so another attempt would fail
        the same way after the same work. Raising the limit and retrying the job is the fix."""
        return failure(f"worker exceeded memory_per_task={self.spec.memory_per_task} MiB (an allocation failed "
                       "under that limit; not retried: raise memory_per_task in cloudtask.yaml, then retry the "
                       f"job); the worker {child.describe()}", started, retryable=False)
