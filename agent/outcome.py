"""What running one task came to: an `Outcome`, never an exception for the worker's faults."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Any

from agent.compat import SLOTS
from cloudtask_wire.messages import MAX_ERROR_CHARS

ABORTED_ERROR = "aborted"


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


def success(result: Any, started: float) -> Outcome:
    return Outcome(True, result, None, True, perf_counter() - started)


def failure(error: str, started: float, *, retryable: bool = True) -> Outcome:
    if len(error) > MAX_ERROR_CHARS:
        # Keep the head (what happened) and the tail (the last lines of stderr or the traceback).
        keep = MAX_ERROR_CHARS // 2 - 10
        error = f"{error[:keep]}\n[...]\n{error[-keep:]}"
    return Outcome(False, None, error, retryable, perf_counter() - started)
