"""Python mode: `module:function` imported from the worker directory and called as `fn(task_id, data)`.

Async functions run on the agent's event loop, plain functions in a thread. Raising `PermanentFailure`
(`from agent.runner import PermanentFailure`, or any exception class of that name, so a worker need not
import the agent) fails the task for good; any other exception is retryable. The worker shares the
agent's process and environment, so `memory_per_task` cannot be enforced here: it only sizes slots.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter
from typing import Any

from agent import compat
from agent.logline import log
from agent.modes.base import Mode, SlotFlags
from agent.outcome import ABORTED_ERROR, Outcome, failure, success
from cloudtask_wire import jsonx
from cloudtask_wire.workerspec import WorkerSpec

_TRACEBACK_TAIL_CHARS = 1500
# Results of these types always encode; anything else is checked before it reaches a batched report.
_TRIVIAL_RESULT_TYPES = frozenset({str, bool, float, type(None)})


class FunctionMode(Mode):
    def __init__(self, spec: WorkerSpec, worker_dir: Path, flags: SlotFlags, env: dict[str, str]) -> None:
        if not spec.function:
            raise ValueError("mode python needs a function (module:function)")
        super().__init__(spec, worker_dir, flags, env)
        self.ref: str = spec.function
        if spec.memory_per_task:
            log("memory_per_task_not_enforced", mode="python", memory_per_task_mib=spec.memory_per_task,
                reason="the worker runs in the agent's own process; the value only sizes slots")
        self._fn: Callable[..., Any] | None = None
        self._fn_is_async = False
        self._load_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any] | None] = [None] * len(flags.busy)
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        aborted = self.flags.aborted
        task = asyncio.current_task()
        self._tasks[slot] = task
        deadline: Any = None
        try:
            fn = self._fn
            if fn is None:
                loaded = await self._load_function()
                if isinstance(loaded, str):
                    return failure(loaded, started)
                fn = loaded
            if self._fn_is_async:
                # Hot path: the coroutine runs in the caller's task, no extra task or thread per call.
                if timeout_s is None:
                    result = await fn(key, data)
                else:
                    deadline = compat.timeout(timeout_s)
                    async with deadline:
                        result = await fn(key, data)
            else:
                if timeout_s is None:
                    result = await self._call_in_thread(fn, key, data)
                else:
                    deadline = compat.timeout(timeout_s)
                    async with deadline:
                        result = await self._call_in_thread(fn, key, data)
        except asyncio.CancelledError:
            if not self._fn_is_async:
                self._abandon()
            # Our own abort is answered with an Outcome; any other cancellation belongs to the caller.
            if aborted[slot] and compat.uncancel(task) == 0:
                return failure(ABORTED_ERROR, started)
            raise
        except (Exception, SystemExit) as exc:
            if deadline is not None and compat.expired(deadline) and type(exc) is TimeoutError:
                if self._fn_is_async:
                    return failure(f"timed out after {timeout_s:g} s", started)
                self._abandon()
                return failure(f"timed out after {timeout_s:g} s (the worker function keeps running in a "
                               "background thread: threads cannot be stopped)", started)
            return _exception_outcome(exc, started)
        finally:
            self._tasks[slot] = None
        if aborted[slot]:
            # The worker swallowed our cancellation; withdraw it so it cannot hit the caller later.
            if compat.cancelling(task):
                compat.uncancel(task)
            return failure(ABORTED_ERROR, started)
        if type(result) not in _TRIVIAL_RESULT_TYPES:
            try:
                jsonx.dumps(result)
            except (TypeError, ValueError) as exc:
                # Fails the same way on every attempt, and would otherwise break the batched report.
                return failure(f"result is not JSON-serializable: {type(exc).__name__}: {exc}", started,
                               retryable=False)
        return success(result, started)

    async def abort(self, slot: int) -> None:
        """A coroutine is cancelled; a thread cannot be stopped and finishes in the background."""
        task = self._tasks[slot]
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        """Threads still running are left to finish (see _abandon)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def _call_in_thread(self, fn: Callable[..., Any], key: str, data: Any) -> Any:
        if self._executor is None:
            self._executor = self._new_executor()
        loop = asyncio.get_running_loop()
        # A copied context, as asyncio.to_thread does, so contextvars (log context) reach the worker.
        result = await loop.run_in_executor(self._executor, contextvars.copy_context().run, fn, key, data)
        if inspect.isawaitable(result):  # e.g. an object whose __call__ is async, or a wrapped coroutine
            result = await result
        return result

    def _new_executor(self) -> ThreadPoolExecutor:
        # A pool of its own, one thread per slot: the default pool (cpu+4 threads) may be smaller than
        # the slots, and a task queued behind the others would spend its timeout waiting.
        return ThreadPoolExecutor(max_workers=len(self._tasks), thread_name_prefix="cloudtask-worker")

    def _abandon(self) -> None:
        """A timed-out or cancelled sync call keeps its thread: Python cannot kill threads. Hand the slots
        a fresh pool so the stuck thread does not take one of them; the old pool ends when its threads
        return. Hazard: a worker that never returns leaks a thread per timeout, and blocks interpreter
        exit (concurrent.futures joins its threads) - the agent should leave with os._exit after close."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _load_function(self) -> Callable[..., Any] | str:
        """The worker function, or an error message. Imported in a thread: module-level code (loading a
        model) can take minutes, and the event loop must keep the connection's heartbeats going."""
        async with self._load_lock:
            if self._fn is None:
                try:
                    fn = await asyncio.to_thread(_import_function, self.ref, self.worker_dir)
                except Exception as exc:  # not cached: every task reports it until the worker is fixed
                    return f"cannot load worker function {self.ref!r}: {_exception_text(exc)}"
                self._fn_is_async = _is_async(fn)
                self._fn = fn
            return self._fn


def _import_function(ref: str, worker_dir: Path) -> Callable[..., Any]:
    module_name, _, attr_path = ref.partition(":")
    path = str(worker_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]  # reason: checked callable above; its signature is the user's


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _exception_text(exc: BaseException) -> str:
    message = str(exc)
    head = f"{type(exc).__name__}: {message[:500]}" if message else type(exc).__name__
    # The three-argument form: the one-argument one is Python 3.10+, and VMs may have 3.9.
    frames = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()
    return f"{head}\n{frames[-_TRACEBACK_TAIL_CHARS:]}"


def _exception_outcome(exc: BaseException, started: float) -> Outcome:
    if any(cls.__name__ == "PermanentFailure" for cls in type(exc).__mro__):
        message = str(exc)
        return failure(message or type(exc).__name__, started, retryable=False)
    return failure(_exception_text(exc), started)
