"""Stream mode: one long-lived `/bin/sh -c <command>` process per slot, started lazily and restarted
when it dies or breaks the protocol.

One JSON line in per task (`{"id", "data"}`), one JSON line out: `{"id", "result"}` or
`{"id", "error", "retryable"}` (retryable defaults to true).
"""

from __future__ import annotations

import asyncio
import signal
from time import perf_counter
from typing import Any

from agent import compat, process
from agent.modes.base import ProcessMode
from agent.outcome import ABORTED_ERROR, Outcome, failure, success
from cloudtask_wire import jsonx

STREAM_LINE_LIMIT_BYTES = 64 * 1024 * 1024  # the longest answer line accepted


class StreamMode(ProcessMode):
    def close_gently(self, slot: int) -> bool:
        return True

    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        aborted = self.flags.aborted
        line = (jsonx.dumps({"id": key, "data": data}) + "\n").encode()
        deadline = compat.timeout(timeout_s)
        try:
            async with deadline:
                child = await self._deliver(slot, line)
                if isinstance(child, str):
                    return failure(child, started)
                if aborted[slot]:  # abort() came while the process was starting: it killed nothing
                    await self._discard(slot, signal.SIGTERM)
                    return failure(ABORTED_ERROR, started)
                raw = await _read_answer(child.stdout)
        except TimeoutError:
            if aborted[slot]:
                await self._discard(slot, signal.SIGTERM)
                return failure(ABORTED_ERROR, started)
            how = await self._discard(slot, signal.SIGTERM)
            return failure(f"timed out after {timeout_s:g} s; the worker's process group was killed (restarting "
                           f"it); the worker {how}", started)
        except ValueError:  # readline: longer than the reader's limit; the stream lost its framing
            await self._discard(slot, signal.SIGTERM)
            return failure(f"worker answered with a line longer than {STREAM_LINE_LIMIT_BYTES} bytes; "
                           "restarting it", started)
        except asyncio.CancelledError:
            child_now = self.children[slot]
            if child_now is not None:
                self.children[slot] = None
                await process.kill_on_cancel(child_now)
            raise

        if aborted[slot]:
            await self._discard(slot, signal.SIGTERM)
            return failure(ABORTED_ERROR, started)
        if raw is None:
            child_now = self.children[slot]
            how = await self._discard(slot, None)
            if child_now is not None and self.out_of_memory(child_now):
                return self.memory_failure(child_now, started)
            return failure(f"worker process closed its stdout mid-task (restarting it); it {how}", started)
        return await self._judge(slot, key, raw, started)

    async def _judge(self, slot: int, key: str, raw: bytes, started: float) -> Outcome:
        """The outcome of one answer line; a line that breaks the protocol restarts the process."""
        try:
            answer = jsonx.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "id" not in answer:
            await self._discard(slot, signal.SIGTERM)
            return failure(f"worker wrote a line that is not a JSON answer object (write logs to stderr): "
                           f"{process.preview(raw)}; restarting it", started)
        if answer["id"] != key:
            await self._discard(slot, signal.SIGTERM)
            return failure(f"worker answered for task {str(answer['id'])[:100]!r} while running {key!r}; "
                           "restarting it", started)
        error = answer.get("error")
        if error is not None:
            retryable = answer.get("retryable", True)
            return failure(error if isinstance(error, str) else jsonx.dumps(error), started,
                           retryable=retryable is not False)
        if "result" not in answer:
            return failure('worker answer has neither "result" nor "error"', started)
        return success(answer["result"], started)

    async def _deliver(self, slot: int, line: bytes) -> process.Child | str:
        """Write the task to the slot's process (started if needed): the process, or an error message."""
        last = ""
        for _attempt in range(2):
            child = self.children[slot]
            if child is None or child.exited.done():
                if child is not None:
                    await self._discard(slot, None)
                if self.flags.aborted[slot]:
                    return ABORTED_ERROR
                env = dict(self.env)
                env["CLOUDTASK_SLOT"] = str(slot)
                try:
                    child = await process.spawn(self.command, self.worker_dir, env, STREAM_LINE_LIMIT_BYTES,
                                                self.data_limit_bytes)
                except OSError as exc:
                    return f"cannot start worker command: {exc}"
                self.children[slot] = child
            try:
                child.stdin.write(line)
                await child.stdin.drain()
                return child
            except (BrokenPipeError, ConnectionResetError):
                # The line never reached a reader, so a fresh process may safely take the task (once).
                last = await self._discard(slot, None)
        return f"worker process exits before reading its input: it {last}"

    async def _discard(self, slot: int, first_signal: int | None) -> str:
        """Stop the slot's process (the next task starts a new one); returns how it ended."""
        child = self.children[slot]
        if child is None:
            return "was already stopped"
        self.children[slot] = None
        await process.stop(child, first_signal)
        return child.describe()


async def _read_answer(stdout: asyncio.StreamReader) -> bytes | None:
    """The next non-blank line (a stray print() of an empty line is harmless), or None at EOF."""
    while True:
        raw = await stdout.readline()
        if not raw:
            return None
        if not raw.isspace():
            return raw
