"""Command mode: one `/bin/sh -c <command>` process per task.

stdin gets `{"id", "data"}` then EOF; all of stdout is the JSON result (empty = null). Exit 0 = success,
exit `PERMANENT_FAILURE_EXIT_CODE` = permanent failure, and so are the shell's 126 and 127 (cannot execute,
not found); any other exit or a signal = retryable failure.
"""

from __future__ import annotations

import asyncio
import signal
from time import perf_counter
from typing import Any

from agent import process
from agent.modes.base import ProcessMode
from agent.outcome import ABORTED_ERROR, Outcome, failure, success
from cloudtask_wire import jsonx
from cloudtask_wire.messages import PERMANENT_FAILURE_EXIT_CODE

MAX_STDOUT_BYTES = 16 * 1024 * 1024  # a larger result fails the task
_READER_LIMIT_BYTES = 64 * 1024


class CommandMode(ProcessMode):
    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        env = dict(self.env)
        env["CLOUDTASK_TASK_ID"] = key
        env["CLOUDTASK_SLOT"] = str(slot)
        if "\x00" in key:
            # An environment variable cannot hold NUL: the spawn would raise, and the task would sit
            # leased in a slot for ever. The same on every attempt, so it is final.
            return failure("the task id holds a NUL character, which cannot be passed to a command worker"
                           " in CLOUDTASK_TASK_ID", started, retryable=False)
        try:
            child = await process.spawn(self.command, self.worker_dir, env, _READER_LIMIT_BYTES,
                                        self.data_limit_bytes)
        except OSError as exc:
            return failure(f"cannot start worker command: {exc}", started)
        self.children[slot] = child
        payload = jsonx.dumps({"id": key, "data": data}).encode()
        loop = asyncio.get_running_loop()
        feeder = loop.create_task(process.feed(child.stdin, payload), name=f"worker-stdin-{child.pgid}")
        reader = loop.create_task(process.read_capped(child, MAX_STDOUT_BYTES), name=f"worker-stdout-{child.pgid}")
        try:
            if self.flags.aborted[slot]:  # abort() came while the process was starting
                await process.stop(child, signal.SIGTERM)
            # asyncio.wait, not wait_for: a timeout must not cancel the shared `exited` future.
            await asyncio.wait((child.exited,), timeout=timeout_s)
            timed_out = not child.exited.done()
            if timed_out:
                await process.stop(child, signal.SIGTERM)
            else:
                process.killpg(child.pgid, signal.SIGKILL)  # leftovers: the task is over once its leader exits
            if not reader.done():
                await asyncio.wait((reader,), timeout=process.PIPE_DRAIN_S)
            await process.release(child)
            feeder.cancel()  # still blocked only if the worker never read its stdin
            await asyncio.wait((feeder, reader, child.stderr_task))
        except asyncio.CancelledError:
            feeder.cancel()
            reader.cancel()
            await process.kill_on_cancel(child)
            raise
        finally:
            self.children[slot] = None

        if self.flags.aborted[slot]:
            return failure(ABORTED_ERROR, started)
        if timed_out:
            return failure(f"timed out after {timeout_s:g} s; the worker's process group was killed; the worker "
                           f"{child.describe()}", started)
        out = reader.result()
        if out is None:
            return failure(f"worker wrote more than {MAX_STDOUT_BYTES} bytes to stdout (the result must be "
                           f"smaller; write logs to stderr); {child.describe()}", started)
        return self._judge(child, out, started)

    def _judge(self, child: process.Child, out: bytes, started: float) -> Outcome:
        """The outcome of a worker process that exited by itself."""
        code = child.transport.get_returncode()
        if code == 0:
            if not out.strip():
                return success(None, started)
            try:
                return success(jsonx.loads(out), started)
            except ValueError:
                return failure(f"worker exited 0 but its stdout is not JSON (write logs to stderr); stdout "
                               f"starts with {process.preview(out)}{child.stderr_tail()}", started)
        if code == PERMANENT_FAILURE_EXIT_CODE:
            return failure(f"permanent failure: worker {child.describe()}", started, retryable=False)
        if code in process.SHELL_CANNOT_RUN:
            # The shell could not find or execute the command: the same on every attempt and every
            # instance, so retrying only delays the answer.
            return failure(f"{process.SHELL_CANNOT_RUN[code]}, not retried: fix `command` in cloudtask.yaml (or "
                           f"the worker's files), then retry the job; the worker {child.describe()}", started,
                           retryable=False)
        if self.out_of_memory(child):
            return self.memory_failure(child, started)
        return failure(f"worker {child.describe()}", started)
