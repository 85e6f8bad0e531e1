"""Worker processes: each leads its own process group, is stopped as a group, and has its output capped.

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
retried.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import resource
import shlex
import signal
import sys
from asyncio.subprocess import PIPE, SubprocessStreamProtocol
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.compat import SLOTS

SHELL = "/bin/sh"
STDERR_TAIL_CHARS = 2000  # how much of a worker's stderr an error message carries
KILL_GRACE_S = 2.0  # between SIGTERM (or closing stdin) and SIGKILL
PIPE_DRAIN_S = 2.0  # once the group is dead, how long pipes held by escaped (setsid) processes may stay open

_STDERR_TAIL_BYTES = 4 * STDERR_TAIL_CHARS  # UTF-8: up to 4 bytes per character
_READ_CHUNK_BYTES = 64 * 1024
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
_OUTPUT_PREVIEW_CHARS = 200


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
class Child:
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
SHELL_CANNOT_RUN = {127: "worker command not found", 126: "worker command cannot be executed"}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def killpg(pgid: int, sig: int) -> None:
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


async def spawn(command: str, cwd: Path, env: dict[str, str], limit: int, data_limit_bytes: int | None) -> Child:
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
    return Child(transport, stdin, stdout, protocol.exited, pid, tail,
                  loop.create_task(_collect_tail(stderr, tail), name=f"worker-stderr-{pid}"))


async def stop(child: Child, first_signal: int | None) -> None:
    """Stop the whole group: `first_signal` (or nothing, when stdin was closed), up to KILL_GRACE_S for
    the leader and its group to exit, then SIGKILL; afterwards the transport is closed.

    Safe to call more than once and concurrently (abort racing a timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_GRACE_S
    # Listed before the signal, while every member is still alive; one that forks later gets the SIGKILL.
    members = _group_members(child.pgid) if _group_exists(child.pgid) else []
    child.killed_by_agent = True
    if first_signal is not None:
        killpg(child.pgid, first_signal)
    if not child.exited.done():
        await asyncio.wait((child.exited,), timeout=KILL_GRACE_S)
    # Grandchildren get the rest of the grace to clean up.
    while _group_running(child.pgid, members) and loop.time() < deadline:  # noqa: ASYNC110 - no event
        await asyncio.sleep(_GROUP_POLL_S)  # exists for the death of processes that are not our children
    killpg(child.pgid, signal.SIGKILL)
    if not child.exited.done():
        await asyncio.wait((child.exited,), timeout=KILL_GRACE_S)
    await release(child)


async def release(child: Child) -> None:
    """Close the pipes once the group is dead, after letting stderr drain so the tail is complete."""
    if not child.stderr_task.done():
        await asyncio.wait((child.stderr_task,), timeout=PIPE_DRAIN_S)
    # Closing also ends the stderr reader (EOF) when an escaped process still holds the pipe.
    child.transport.close()


async def kill_on_cancel(child: Child) -> None:
    """For cancellation: SIGKILL the group at once, no grace, then wait for the leader's exit before
    closing the transport. Closed first, the killed process was reaped only if the event loop still
    ran when it died: otherwise a zombie until the agent exits (and Popen's ResourceWarning)."""
    child.killed_by_agent = True
    killpg(child.pgid, signal.SIGKILL)
    try:
        if not child.exited.done():
            await asyncio.wait((child.exited,), timeout=KILL_GRACE_S)
    finally:
        child.transport.close()


async def feed(stdin: asyncio.StreamWriter, payload: bytes) -> None:
    try:
        stdin.write(payload)
        await stdin.drain()
        stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker exited without reading all its input: its exit code tells the story


async def read_capped(child: Child, cap: int) -> bytes | None:
    """All of stdout, or None when it passes `cap` (the group is then killed: the task has failed and
    a worker printing without end would otherwise run until its timeout)."""
    buf = bytearray()
    try:
        while chunk := await child.stdout.read(_READ_CHUNK_BYTES):
            if len(buf) + len(chunk) > cap:
                child.killed_by_agent = True
                killpg(child.pgid, signal.SIGKILL)
                return None
            buf += chunk
    except OSError:
        pass
    return bytes(buf)


def preview(raw: bytes) -> str:
    return repr(raw[: _OUTPUT_PREVIEW_CHARS * 2].decode(errors="replace")[:_OUTPUT_PREVIEW_CHARS])
