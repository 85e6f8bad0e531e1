"""Launch failures that will not heal by themselves: told apart from passing ones, and blocked.

A launch or a start that fails is retried (with back-off). Most causes pass: a stock-out, a slow
network. Some never do: a bad image, a missing package on it (`ensurepip is not available`), a key
the host refuses, a worker whose setup always fails. Retrying those pays for a boot every few
seconds for ever. So each failure is reduced to its *cause* (the error's key line with instance ids,
addresses, numbers and times taken out), and when one pool's launches on one offer fail
`BLOCK_AFTER` times in a row with the same cause, that (pool, offer) is blocked until someone fixes
it: `cloudtaskctl resume JOB` or a config reload clears it. A launch whose agent connects, or a
failure with another cause, starts the count again.

The key is (pool, offer), not the offer alone: a worker whose setup fails must not keep another
worker off the same machines. Pure: no clock, no I/O; shared by the reconciler and its tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_AFTER = 3  # consecutive same-cause failures of one (pool, offer) that block it
KEY_LINE_MAX = 300  # characters of the key line kept in messages

# A line that says what went wrong, rather than what ran (the last such line wins).
_TELLING = re.compile(
    r"error|exception|denied|refused|not available|not found|no such|cannot|can't|unable|invalid|missing"
    r"|does not match|permission|not permitted|timed out|did not answer|killed|exit code|quota|unauthori[sz]ed",
    re.IGNORECASE)
_NOT_TELLING = re.compile(r"^(failing command:|traceback |\s*file \"|#|\$ )", re.IGNORECASE)
# Our "instance ID: step: " prefix (bootstrap.DeployError), kept apart so the step stays in front.
_DEPLOY_PREFIX = re.compile(r"^instance \S+: ([^:\n]{1,40}): (.*)$", re.DOTALL)
_VARIABLE = [
    (re.compile(r"\b(?:local|ssh|aws|gcp|azure|external)-[0-9a-f]{8,}\b"), "<instance>"),
    (re.compile(r"\b(?:i|vm|sg|ami|vol|eni|subnet|r)-[0-9a-f]{6,}\b"), "<id>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE), "<uuid>"),
    (re.compile(r"\b\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"), "<time>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\[?[0-9a-f]*:[0-9a-f:]*:[0-9a-f]+\]?(?::\d+)?", re.IGNORECASE), "<address>"),
    (re.compile(r"\b[0-9a-f]{16,}\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
]


def key_line(error: str | None) -> str:
    """The one line of an error that says why: for a failed bootstrap step, the step and the last
    telling line of its output (`environment: ... ensurepip is not available ...`)."""
    text = (error or "").strip()
    if not text:
        return "(no reason given)"
    step = ""
    m = _DEPLOY_PREFIX.match(text)
    if m:
        step, text = m.group(1), m.group(2)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    telling = [line for line in lines if _TELLING.search(line) and not _NOT_TELLING.match(line)]
    # The first line carries "exit code N"; the telling line what the command itself said.
    best = telling[-1] if telling else (lines[-1] if lines else "")
    if step:
        first = lines[0] if lines else ""
        head = first.split(":", 1)[0] if first.startswith("exit code") else ""
        best = f"{step}: {head + ': ' if head and not best.startswith(head) else ''}{best}"
    return best if len(best) <= KEY_LINE_MAX else best[:KEY_LINE_MAX - 3] + "..."


def cause(error: str | None) -> str:
    """What stays the same when the same thing goes wrong again: the key line without instance ids,
    cloud ids, addresses, times and numbers."""
    text = key_line(error)
    for pattern, repl in _VARIABLE:
        text = pattern.sub(repl, text)
    return text.lower()


@dataclass(frozen=True, slots=True)
class Blocked:
    pool_id: int
    offer: str
    count: int
    reason: str  # the key line of the last failure, as shown to the user


class LaunchFailures:
    """Consecutive same-cause failures per (pool, offer), and the pairs blocked by them."""

    def __init__(self, block_after: int = BLOCK_AFTER) -> None:
        self.block_after = block_after
        self._streak: dict[tuple[int, str], tuple[str, int]] = {}  # -> (cause, consecutive)
        self._blocked: dict[tuple[int, str], Blocked] = {}

    def failed(self, pool_id: int, offer: str, error: str | None) -> Blocked | None:
        """Record a failure; returns the block when this one completes the streak (once)."""
        key = (pool_id, offer)
        if key in self._blocked:
            return None  # a launch that was in flight when the block came: already counted
        why = cause(error)
        previous, n = self._streak.get(key, ("", 0))
        n = n + 1 if previous == why else 1
        self._streak[key] = (why, n)
        if n < self.block_after:
            return None
        blocked = Blocked(pool_id, offer, n, key_line(error))
        self._blocked[key] = blocked
        return blocked

    def reset(self, pool_id: int, offer: str) -> None:
        """An agent connected, or a failure that passes by itself came between: the streak ends."""
        self._streak.pop((pool_id, offer), None)

    def is_blocked(self, pool_id: int, offer: str) -> bool:
        return (pool_id, offer) in self._blocked

    def blocked(self, pool_id: int) -> list[Blocked]:
        return [b for (p, _), b in self._blocked.items() if p == pool_id]

    def clear(self, pool_id: int | None = None) -> list[Blocked]:
        """Unblock one pool's offers (None: all, as on a config reload); returns what was blocked."""
        keys = [k for k in self._blocked if pool_id is None or k[0] == pool_id]
        cleared = [self._blocked.pop(k) for k in keys]
        for k in [k for k in self._streak if pool_id is None or k[0] == pool_id]:
            del self._streak[k]
        return cleared
