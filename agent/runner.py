"""Runs the user's worker, one task at a time per slot, in the three modes of `WorkerSpec.mode`.

- command: one `/bin/sh -c <command>` process per task. stdin gets `{"id", "data"}` then EOF; all of stdout
  is the JSON result (empty = null). Exit 0 = success, exit `PERMANENT_FAILURE_EXIT_CODE` = permanent
  failure, and so are the shell's 126 and 127 (cannot execute, not found); any other exit or a signal =
  retryable failure.
- stream: one long-lived `/bin/sh -c <command>` process per slot, started lazily and restarted when it dies
  or breaks the protocol. One JSON line in per task (`{"id", "data"}`), one JSON line out:
  `{"id", "result"}` or `{"id", "error", "retryable"}` (retryable defaults to true).
- python: `module:function` imported from the worker directory and called as `fn(task_id, data)`;
  async functions run on the agent's event loop, plain functions in a thread. Raising `PermanentFailure`
  (`from agent.runner import PermanentFailure`, or any exception class of that name, so a worker need not
  import the agent) fails the task for good; any other exception is retryable.

Each child process leads its own process group (its own session), so a timeout, an abort or a cancelled
run kills everything the worker started, grandchildren included. After a command worker exits, whatever
it left running in its group is killed too: a task owns nothing once it has finished.

Before exec, each child (Linux) gets a parent-death signal, so a worker dies with a SIGKILLed agent
instead of running on unsupervised; an OOM score that makes it the kernel's first victim when the
machine runs out of memory, before the agent; and, when cloudtask.yaml sets `memory_per_task`, that
many MiB as its RLIMIT_DATA. RLIMIT_DATA (Linux >= 4.7) caps a process's private writable memory -
heap, anonymous mmaps, thread stacks - but not address space merely reserved (PROT_NONE, as the JVM,
Go, CUDA and glibc's per-thread arenas do), which RLIMIT_AS would count and refuse. It holds in
any container without privileges, unlike a cgroup v2 memory.max (which needs a delegated, writable
cgroup v2 tree: many hosts have v1 or a read-only /sys/fs/cgroup). It is per process: each process a
worker starts gets its own limit, the total is not capped. An allocation beyond it fails (MemoryError,
ENOMEM, bad_alloc...); a worker that dies of it is reported as "exceeded memory_per_task=N MiB", not
retried. Python mode cannot be limited: the worker is the agent's own process; memory_per_task only
sizes its slots there.

`run()` never raises for a worker's faults: they come back as an `Outcome`. Cancelling the task awaiting
`run()` is supported and kills the slot's processes at once (SIGKILL); `abort()` stops them with SIGTERM
first and makes the pending `run()` return an "aborted" failure.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import importlib
import inspect
import os
import re
import resource
import shlex
import signal
import sys
import traceback
from asyncio.subprocess import PIPE, SubprocessStreamProtocol
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from agent import compat, jsonx
from agent.compat import SLOTS
from agent.logline import log
from agent.protocol import MAX_ERROR_CHARS, PERMANENT_FAILURE_EXIT_CODE
from agent.workerspec import WorkerSpec

SHELL = "/bin/sh"
MAX_STDOUT_BYTES = 16 * 1024 * 1024  # command mode: a larger result fails the task
STREAM_LINE_LIMIT_BYTES = 64 * 1024 * 1024  # stream mode: the longest answer line accepted
STDERR_TAIL_CHARS = 2000  # how much of a worker's stderr an error message carries
KILL_GRACE_S = 2.0  # between SIGTERM (or closing stdin) and SIGKILL
ABORTED_ERROR = "aborted"

_STDERR_TAIL_BYTES = 4 * STDERR_TAIL_CHARS  # UTF-8: up to 4 bytes per character
_READ_CHUNK_BYTES = 64 * 1024
_COMMAND_READER_LIMIT_BYTES = 64 * 1024
_PIPE_DRAIN_S = 2.0  # once the group is dead, how long pipes held by escaped (setsid) processes may stay open
_GROUP_POLL_S = 0.05
# Written to each worker process's /proc/self/oom_score_adj: when the machine runs out of memory, the
# kernel's OOM killer takes a worker (one task fails, retryably) before the agent (every slot's lease).
WORKER_OOM_SCORE_ADJ = 1000
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What an allocation failure prints, in the usual runtimes: Python, C (strerror(ENOMEM)), C++, Go,
# Node, Rust, the JVM. Seen in a dead worker's stderr while memory_per_task is in force, it means the
# worker hit that limit.
_OUT_OF_MEMORY = re.compile(
    r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory|memory allocation of \d+ bytes failed"
    r"|OutOfMemoryError", re.IGNORECASE)
# A command sh may replace itself with (`exec`): one simple command, no lists, pipes, groups,
# substitutions or redirections that the conservative check below would have to understand.
_SHELL_SPECIAL = frozenset(";&|<>(){}`\n")
_SHELL_RESERVED = frozenset({"!", "{", "}", "case", "do", "done", "elif", "else", "esac", "exec", "fi", "for",
                             "function", "if", "in", "select", "then", "time", "until", "while", "[["})
_TRACEBACK_TAIL_CHARS = 1500
_OUTPUT_PREVIEW_CHARS = 200
# Results of these types always encode; anything else is checked before it reaches a batched report.
_TRIVIAL_RESULT_TYPES = frozenset({str, bool, float, type(None)})


class PermanentFailure(Exception):
    """Raised by a python-mode worker to fail a task without retry.

    User code can `from agent.runner import PermanentFailure`; any exception class named
    `PermanentFailure` (for example one defined in the worker itself) is treated the same way.
    """


@dataclass(frozen=True, **SLOTS)
class Outcome:
    ok: bool
    result: Any = None  # when ok
    error: str | None = None  # when not ok
    retryable: bool = True
    duration_s: float = 0.0


def _failure(error: str, started: float, *, retryable: bool = True) -> Outcome:
    if len(error) > MAX_ERROR_CHARS:
        # Keep the head (what happened) and the tail (the last lines of stderr or the traceback).
        keep = MAX_ERROR_CHARS // 2 - 10
        error = f"{error[:keep]}\n[...]\n{error[-keep:]}"
    return Outcome(False, None, error, retryable, perf_counter() - started)


# ---- processes ------------------------------------------------------------------------------------


class _ChildProtocol(SubprocessStreamProtocol):
    """Also reports the leader's exit by itself: `Process.wait()` additionally waits for every pipe to
    close, which never happens while a background grandchild still holds stdout."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit, loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _Tail:
    """The last bytes of a stream, so a chatty worker cannot exhaust the agent's memory."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def add(self, chunk: bytes) -> None:
        self.buf += chunk
        if len(self.buf) > 2 * _STDERR_TAIL_BYTES:
            del self.buf[:-_STDERR_TAIL_BYTES]

    def text(self) -> str:
        return self.buf[-_STDERR_TAIL_BYTES:].decode(errors="replace")[-STDERR_TAIL_CHARS:].strip()


async def _collect_tail(reader: asyncio.StreamReader, tail: _Tail) -> None:
    try:
        while chunk := await reader.read(_READ_CHUNK_BYTES):
            tail.add(chunk)
    except OSError:
        pass


@dataclass(eq=False, **SLOTS)
class _Child:
    transport: asyncio.SubprocessTransport
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    exited: asyncio.Future[None]
    pgid: int
    stderr: _Tail
    stderr_task: asyncio.Task[None]
    killed_by_agent: bool = False  # a timeout, an abort, a flood: the agent sent the signal itself

    def describe(self) -> str:
        """How the process ended, and the end of its stderr."""
        code = self.transport.get_returncode()
        if code is None:
            what = "is still running"
        elif code < 0:
            what = f"was killed by signal {_signal_name(-code)}{self._kill_hint(-code)}"
        elif code > 128 and _signal_name(code - 128) != str(code - 128):
            what = (f"exited with code {code} (the shell reports death by {_signal_name(code - 128)})"
                    f"{self._kill_hint(code - 128)}")
        else:
            what = f"exited with code {code}"
        return f"{what}{self.stderr_tail()}"

    def stderr_tail(self) -> str:
        tail = self.stderr.text()
        return f"; stderr tail:\n{tail}" if tail else " (stderr empty)"

    def _kill_hint(self, number: int) -> str:
        if number == signal.SIGKILL and not self.killed_by_agent:
            return " (not sent by the agent: often the kernel's out-of-memory killer)"
        return ""

    def out_of_memory(self) -> bool:
        """Its stderr reports a failed allocation."""
        return _OUT_OF_MEMORY.search(self.stderr.text()) is not None


# The shell's own exit codes (POSIX): 127 the command was not found, 126 it could not be executed.
_SHELL_CANNOT_RUN = {127: "worker command not found", 126: "worker command cannot be executed"}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already (PermissionError: macOS reports a group of zombies so)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.rpartition(b")")[2].decode().split()


def _group_members(pgid: int) -> list[int] | None:
    """Pids in the process group (one scan of /proc), or None where there is no /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for name in names:
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and len(stat) > 2 and stat[2] == str(pgid):
                members.append(int(name))
    return members


def _group_running(pgid: int, members: list[int] | None) -> bool:
    """Whether the group still has a live member. Zombies do not count: `sh -c` forks the worker, so it
    is orphaned when the group dies, and an init that never reaps (a container without one) would keep
    the group "existing" for the whole grace."""
    if not _group_exists(pgid):
        return False
    if members is None:
        return True
    for pid in members:
        stat = _proc_stat(pid)
        if stat is not None and stat[0] != "Z":
            return True
    return False


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up here: the child between fork and exec should do as little as possible


def shell_command(command: str) -> str:
    """`command` for `sh -c`, prefixed with `exec` when it is one simple command: the worker then *is*
    the process the agent started (sh does not stay in between), so the parent-death signal and the
    memory limit set before exec apply to the worker itself, and its exit status is its own."""
    if any(ch in _SHELL_SPECIAL for ch in command):
        return command
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    if not words or words[0] in _SHELL_RESERVED or "=" in words[0]:  # FOO=1 cmd: an assignment first
        return command
    return f"exec {command}"


def _child_setup(agent_pid: int, data_limit_bytes: int | None) -> Callable[[], None]:
    """What runs in the child between fork and exec (Linux; elsewhere only the memory limit):

    - PR_SET_PDEATHSIG: SIGKILL when the agent dies. Killed with -9 (or by the OOM killer) the agent
      cannot stop its workers, whose leases are retried elsewhere after the visibility timeout; a
      worker running on would duplicate that work unsupervised, or hang forever. Only the process we
      start gets it (the kernel clears it on fork): a worker's own children, and the commands of a
      compound shell command, are not covered.
    - oom_score_adj: see WORKER_OOM_SCORE_ADJ. Raising it needs no privilege.
    - RLIMIT_DATA = memory_per_task (see Runner): a failed allocation, not an OOM kill of the machine.
    """
    limit: tuple[int, int] | None = None
    if data_limit_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = data_limit_bytes if hard == resource.RLIM_INFINITY else min(data_limit_bytes, hard)
        limit = (soft, hard)
    prctl = _PRCTL

    def setup() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != agent_pid:  # the agent died before that took effect
                os.kill(os.getpid(), signal.SIGKILL)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(WORKER_OOM_SCORE_ADJ))
        except OSError:
            pass  # no /proc, or a kernel that refuses: the worker runs without it
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, limit)

    return setup


async def _spawn(command: str, cwd: Path, env: dict[str, str], limit: int, data_limit_bytes: int | None) -> _Child:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _ChildProtocol(limit, loop),
        SHELL, "-c", shell_command(command),
        stdin=PIPE, stdout=PIPE, stderr=PIPE, cwd=cwd, env=env,
        start_new_session=True,  # own process group: killpg reaches grandchildren, and the agent's
        # terminal signals (Ctrl-C on a dev box) do not hit the worker behind the agent's back
        # Forked by the event loop's thread, which lives as long as the agent (the parent-death signal
        # follows the thread); the function takes no lock another thread could hold (no logging, imports).
        preexec_fn=_child_setup(os.getpid(), data_limit_bytes),
    )
    stdin, stdout, stderr = protocol.stdin, protocol.stdout, protocol.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    tail = _Tail()
    pid = transport.get_pid()
    return _Child(transport, stdin, stdout, protocol.exited, pid, tail,
                  loop.create_task(_collect_tail(stderr, tail), name=f"worker-stderr-{pid}"))


async def _stop(child: _Child, first_signal: int | None) -> None:
    """Stop the whole group: `first_signal` (or nothing, when stdin was closed), up to KILL_GRACE_S for
    the leader and its group to exit, then SIGKILL; afterwards the transport is closed.

    Safe to call more than once and concurrently (abort racing a timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_GRACE_S
    # Listed before the signal, while every member is still alive; one that forks later gets the SIGKILL.
    members = _group_members(child.pgid) if _group_exists(child.pgid) else []
    child.killed_by_agent = True
    if first_signal is not None:
        _killpg(child.pgid, first_signal)
    if not child.exited.done():
        await asyncio.wait((child.exited,), timeout=KILL_GRACE_S)
    # Grandchildren get the rest of the grace to clean up.
    while _group_running(child.pgid, members) and loop.time() < deadline:  # noqa: ASYNC110 - no event
        await asyncio.sleep(_GROUP_POLL_S)  # exists for the death of processes that are not our children
    _killpg(child.pgid, signal.SIGKILL)
    if not child.exited.done():
        await asyncio.wait((child.exited,), timeout=KILL_GRACE_S)
    await _release(child)


async def _release(child: _Child) -> None:
    """Close the pipes once the group is dead, after letting stderr drain so the tail is complete."""
    if not child.stderr_task.done():
        await asyncio.wait((child.stderr_task,), timeout=_PIPE_DRAIN_S)
    # Closing also ends the stderr reader (EOF) when an escaped process still holds the pipe.
    child.transport.close()


def _kill_now(child: _Child) -> None:
    """For cancellation: no awaiting allowed, so no grace either."""
    child.killed_by_agent = True
    _killpg(child.pgid, signal.SIGKILL)
    child.transport.close()


async def _feed(stdin: asyncio.StreamWriter, payload: bytes) -> None:
    try:
        stdin.write(payload)
        await stdin.drain()
        stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker exited without reading all its input: its exit code tells the story


async def _read_capped(child: _Child, cap: int) -> bytes | None:
    """All of stdout, or None when it passes `cap` (the group is then killed: the task has failed and
    a worker printing without end would otherwise run until its timeout)."""
    buf = bytearray()
    try:
        while chunk := await child.stdout.read(_READ_CHUNK_BYTES):
            if len(buf) + len(chunk) > cap:
                child.killed_by_agent = True
                _killpg(child.pgid, signal.SIGKILL)
                return None
            buf += chunk
    except OSError:
        pass
    return bytes(buf)


def _preview(raw: bytes) -> str:
    return repr(raw[: _OUTPUT_PREVIEW_CHARS * 2].decode(errors="replace")[:_OUTPUT_PREVIEW_CHARS])


# ---- python mode ----------------------------------------------------------------------------------


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
    frames = "".join(traceback.format_exception(exc)).strip()
    return f"{head}\n{frames[-_TRACEBACK_TAIL_CHARS:]}"


def _exception_outcome(exc: BaseException, started: float) -> Outcome:
    if any(cls.__name__ == "PermanentFailure" for cls in type(exc).__mro__):
        message = str(exc)
        return _failure(message or type(exc).__name__, started, retryable=False)
    return _failure(_exception_text(exc), started)


# ---- the runner -----------------------------------------------------------------------------------


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
        if spec.mode in ("command", "stream"):
            if not spec.command:
                raise ValueError(f"mode {spec.mode} needs a command")
        elif spec.mode == "python":
            if not spec.function:
                raise ValueError("mode python needs a function (module:function)")
        else:
            raise ValueError(f"unknown worker mode {spec.mode!r}")
        self.spec = spec
        self.worker_dir = worker_dir
        self.slots = slots
        self._env = {**os.environ, **(env or {})}
        # Python mode cannot have a limit of its own: the worker shares the agent's process.
        self._data_limit_bytes = (spec.memory_per_task * 1024 * 1024
                                  if spec.memory_per_task and spec.mode != "python" else None)
        if spec.memory_per_task and spec.mode == "python":
            log("memory_per_task_not_enforced", mode="python", memory_per_task_mib=spec.memory_per_task,
                reason="the worker runs in the agent's own process; the value only sizes slots")
        self._busy = [False] * slots
        self._aborted = [False] * slots
        self._closed = False
        # command: the process of the running task; stream: the slot's long-lived process.
        self._children: list[_Child | None] = [None] * slots
        # python mode
        self._fn: Callable[..., Any] | None = None
        self._fn_is_async = False
        self._load_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any] | None] = [None] * slots
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        """Run one task in `slot`; a worker's fault is an Outcome, never an exception."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside range({self.slots})")
        if self._busy[slot]:
            raise RuntimeError(f"slot {slot} is already running a task")
        if self._closed:
            return Outcome(False, None, "the agent's runner is shut down", True, 0.0)
        self._busy[slot] = True
        self._aborted[slot] = False
        try:
            mode = self.spec.mode
            if mode == "python":
                return await self._run_python(slot, key, data, timeout_s)
            if mode == "stream":
                return await self._run_stream(slot, key, data, timeout_s)
            return await self._run_command(slot, key, data, timeout_s)
        finally:
            self._busy[slot] = False
            self._aborted[slot] = False

    async def abort(self, slot: int) -> None:
        """Stop the task running in `slot` (job cancelled); its `run()` returns an "aborted" failure.

        Processes get SIGTERM, then SIGKILL after KILL_GRACE_S. A python coroutine is cancelled; a python
        thread cannot be stopped and finishes in the background. No-op when the slot is idle."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside range({self.slots})")
        if not self._busy[slot]:
            return
        self._aborted[slot] = True
        if self.spec.mode == "python":
            task = self._tasks[slot]
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            return
        child = self._children[slot]
        if child is not None:
            await _stop(child, signal.SIGTERM)

    async def close(self) -> None:
        """Stop every process: stream workers get EOF on stdin and KILL_GRACE_S to exit, running command
        workers SIGTERM; then SIGKILL. Python threads still running are left to finish (see _abandon)."""
        if self._closed:
            return
        self._closed = True
        stops = []
        for slot, child in enumerate(self._children):
            if child is None:
                continue
            if self._busy[slot]:
                self._aborted[slot] = True
            if self.spec.mode == "stream" and not self._busy[slot]:
                child.stdin.close()  # EOF: a well-behaved stream worker exits by itself
                stops.append(_stop(child, None))
            else:
                stops.append(_stop(child, signal.SIGTERM))
        await asyncio.gather(*stops)
        self._children = [None] * self.slots
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # ---- python ----

    async def _run_python(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        task = asyncio.current_task()
        self._tasks[slot] = task
        deadline: Any = None
        try:
            fn = self._fn
            if fn is None:
                loaded = await self._load_function()
                if isinstance(loaded, str):
                    return _failure(loaded, started)
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
            if self._aborted[slot] and compat.uncancel(task) == 0:
                return _failure(ABORTED_ERROR, started)
            raise
        except (Exception, SystemExit) as exc:
            if deadline is not None and compat.expired(deadline) and type(exc) is TimeoutError:
                if self._fn_is_async:
                    return _failure(f"timed out after {timeout_s:g} s", started)
                self._abandon()
                return _failure(f"timed out after {timeout_s:g} s (the worker function keeps running in a "
                                "background thread: threads cannot be stopped)", started)
            return _exception_outcome(exc, started)
        finally:
            self._tasks[slot] = None
        if self._aborted[slot]:
            # The worker swallowed our cancellation; withdraw it so it cannot hit the caller later.
            if compat.cancelling(task):
                compat.uncancel(task)
            return _failure(ABORTED_ERROR, started)
        if type(result) not in _TRIVIAL_RESULT_TYPES:
            try:
                jsonx.dumps(result)
            except (TypeError, ValueError) as exc:
                # Fails the same way on every attempt, and would otherwise break the batched report.
                return _failure(f"result is not JSON-serializable: {type(exc).__name__}: {exc}", started,
                                retryable=False)
        return Outcome(True, result, None, True, perf_counter() - started)

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
        # `slots`, and a task queued behind the others would spend its timeout waiting.
        return ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="cloudtask-worker")

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
        ref = self.spec.function
        assert ref is not None
        async with self._load_lock:
            if self._fn is None:
                try:
                    fn = await asyncio.to_thread(_import_function, ref, self.worker_dir)
                except Exception as exc:  # not cached: every task reports it until the worker is fixed
                    return f"cannot load worker function {ref!r}: {_exception_text(exc)}"
                self._fn_is_async = _is_async(fn)
                self._fn = fn
            return self._fn

    # ---- command ----

    async def _run_command(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        env = dict(self._env)
        env["CLOUDTASK_TASK_ID"] = key
        env["CLOUDTASK_SLOT"] = str(slot)
        assert self.spec.command is not None
        if "\x00" in key:
            # An environment variable cannot hold NUL: the spawn would raise, and the task would sit
            # leased in a slot for ever. The same on every attempt, so it is final.
            return _failure("the task id holds a NUL character, which cannot be passed to a command worker"
                            " in CLOUDTASK_TASK_ID", started, retryable=False)
        try:
            child = await _spawn(self.spec.command, self.worker_dir, env, _COMMAND_READER_LIMIT_BYTES,
                                 self._data_limit_bytes)
        except OSError as exc:
            return _failure(f"cannot start worker command: {exc}", started)
        self._children[slot] = child
        payload = jsonx.dumps({"id": key, "data": data}).encode()
        loop = asyncio.get_running_loop()
        feeder = loop.create_task(_feed(child.stdin, payload), name=f"worker-stdin-{child.pgid}")
        reader = loop.create_task(_read_capped(child, MAX_STDOUT_BYTES), name=f"worker-stdout-{child.pgid}")
        try:
            if self._aborted[slot]:  # abort() came while the process was starting
                await _stop(child, signal.SIGTERM)
            # asyncio.wait, not wait_for: a timeout must not cancel the shared `exited` future.
            await asyncio.wait((child.exited,), timeout=timeout_s)
            timed_out = not child.exited.done()
            if timed_out:
                await _stop(child, signal.SIGTERM)
            else:
                _killpg(child.pgid, signal.SIGKILL)  # leftovers: the task is over once its leader exits
            if not reader.done():
                await asyncio.wait((reader,), timeout=_PIPE_DRAIN_S)
            await _release(child)
            feeder.cancel()  # still blocked only if the worker never read its stdin
            await asyncio.wait((feeder, reader, child.stderr_task))
        except asyncio.CancelledError:
            _kill_now(child)
            feeder.cancel()
            reader.cancel()
            raise
        finally:
            self._children[slot] = None

        if self._aborted[slot]:
            return _failure(ABORTED_ERROR, started)
        if timed_out:
            return _failure(f"timed out after {timeout_s:g} s; the worker's process group was killed; the worker "
                            f"{child.describe()}", started)
        out = reader.result()
        if out is None:
            return _failure(f"worker wrote more than {MAX_STDOUT_BYTES} bytes to stdout (the result must be "
                            f"smaller; write logs to stderr); {child.describe()}", started)
        code = child.transport.get_returncode()
        if code == 0:
            if not out.strip():
                return Outcome(True, None, None, True, perf_counter() - started)
            try:
                return Outcome(True, jsonx.loads(out), None, True, perf_counter() - started)
            except ValueError:
                return _failure(f"worker exited 0 but its stdout is not JSON (write logs to stderr); stdout "
                                f"starts with {_preview(out)}{child.stderr_tail()}", started)
        if code == PERMANENT_FAILURE_EXIT_CODE:
            return _failure(f"permanent failure: worker {child.describe()}", started, retryable=False)
        if code in _SHELL_CANNOT_RUN:
            # The shell could not find or execute the command: the same on every attempt and every
            # instance, so retrying only delays the answer.
            return _failure(f"{_SHELL_CANNOT_RUN[code]}, not retried: fix `command` in cloudtask.yaml (or the"
                            f" worker's files), then retry the job; the worker {child.describe()}", started,
                            retryable=False)
        if self._out_of_memory(child):
            return self._memory_failure(child, started)
        return _failure(f"worker {child.describe()}", started)

    # ---- stream ----

    async def _run_stream(self, slot: int, key: str, data: Any, timeout_s: float | None) -> Outcome:
        started = perf_counter()
        line = (jsonx.dumps({"id": key, "data": data}) + "\n").encode()
        deadline = compat.timeout(timeout_s)
        try:
            async with deadline:
                child = await self._deliver(slot, line)
                if isinstance(child, str):
                    return _failure(child, started)
                if self._aborted[slot]:  # abort() came while the process was starting: it killed nothing
                    await self._discard(slot, signal.SIGTERM)
                    return _failure(ABORTED_ERROR, started)
                raw = await _read_answer(child.stdout)
        except TimeoutError:
            if self._aborted[slot]:
                await self._discard(slot, signal.SIGTERM)
                return _failure(ABORTED_ERROR, started)
            how = await self._discard(slot, signal.SIGTERM)
            return _failure(f"timed out after {timeout_s:g} s; the worker's process group was killed (restarting "
                            f"it); the worker {how}", started)
        except ValueError:  # readline: longer than the reader's limit; the stream lost its framing
            await self._discard(slot, signal.SIGTERM)
            return _failure(f"worker answered with a line longer than {STREAM_LINE_LIMIT_BYTES} bytes; "
                            "restarting it", started)
        except asyncio.CancelledError:
            child_now = self._children[slot]
            if child_now is not None:
                _kill_now(child_now)
                self._children[slot] = None
            raise

        if self._aborted[slot]:
            await self._discard(slot, signal.SIGTERM)
            return _failure(ABORTED_ERROR, started)
        if raw is None:
            child_now = self._children[slot]
            how = await self._discard(slot, None)
            if child_now is not None and self._out_of_memory(child_now):
                return self._memory_failure(child_now, started)
            return _failure(f"worker process closed its stdout mid-task (restarting it); it {how}", started)
        try:
            answer = jsonx.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "id" not in answer:
            await self._discard(slot, signal.SIGTERM)
            return _failure(f"worker wrote a line that is not a JSON answer object (write logs to stderr): "
                            f"{_preview(raw)}; restarting it", started)
        if answer["id"] != key:
            await self._discard(slot, signal.SIGTERM)
            return _failure(f"worker answered for task {str(answer['id'])[:100]!r} while running {key!r}; "
                            "restarting it", started)
        error = answer.get("error")
        if error is not None:
            retryable = answer.get("retryable", True)
            return _failure(error if isinstance(error, str) else jsonx.dumps(error), started,
                            retryable=retryable is not False)
        if "result" not in answer:
            return _failure('worker answer has neither "result" nor "error"', started)
        return Outcome(True, answer["result"], None, True, perf_counter() - started)

    def _out_of_memory(self, child: _Child) -> bool:
        return self._data_limit_bytes is not None and child.out_of_memory()

    def _memory_failure(self, child: _Child, started: float) -> Outcome:
        """Not retried: the limit is the same on every instance (it is per task, not per machine) and a
        task's memory use follows from its data and the worker's code, so another attempt would fail
        the same way after the same work. Raising the limit and retrying the job is the fix."""
        return _failure(f"worker exceeded memory_per_task={self.spec.memory_per_task} MiB (an allocation failed "
                        "under that limit; not retried: raise memory_per_task in cloudtask.yaml, then retry the "
                        f"job); the worker {child.describe()}", started, retryable=False)

    async def _deliver(self, slot: int, line: bytes) -> _Child | str:
        """Write the task to the slot's process (started if needed): the process, or an error message."""
        assert self.spec.command is not None
        last = ""
        for _attempt in range(2):
            child = self._children[slot]
            if child is None or child.exited.done():
                if child is not None:
                    await self._discard(slot, None)
                if self._aborted[slot]:
                    return ABORTED_ERROR
                env = dict(self._env)
                env["CLOUDTASK_SLOT"] = str(slot)
                try:
                    child = await _spawn(self.spec.command, self.worker_dir, env, STREAM_LINE_LIMIT_BYTES,
                                         self._data_limit_bytes)
                except OSError as exc:
                    return f"cannot start worker command: {exc}"
                self._children[slot] = child
            try:
                child.stdin.write(line)
                await child.stdin.drain()
                return child
            except (BrokenPipeError, ConnectionResetError):
                # The line never reached a reader, so a fresh process may safely take the task (once).
                last = await self._discard(slot, None)
        return f"worker process exits before reading its input: it {last}"

    async def _discard(self, slot: int, first_signal: int | None) -> str:
        """Stop the slot's stream process (the next task starts a new one); returns how it ended."""
        child = self._children[slot]
        if child is None:
            return "was already stopped"
        self._children[slot] = None
        await _stop(child, first_signal)
        return child.describe()


async def _read_answer(stdout: asyncio.StreamReader) -> bytes | None:
    """The next non-blank line (a stray print() of an empty line is harmless), or None at EOF."""
    while True:
        raw = await stdout.readline()
        if not raw:
            return None
        if not raw.isspace():
            return raw


__all__ = ["Outcome", "PermanentFailure", "Runner"]
