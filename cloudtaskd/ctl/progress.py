"""Progress display without dependencies: one redrawn line on a terminal, plain lines otherwise.

`format_progress` is pure (a job dict and a width in, a line out) so it is tested on its own;
`ProgressDisplay` only decides when and how to write it.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

from cloudtaskd.core.states import TASK_STATE_LABELS, TERMINAL_TASK_STATES

TTY_INTERVAL_S = 0.2  # at most ~5 redraws a second: faster is flicker, not information
PLAIN_INTERVAL_S = 10.0  # a log file or a CI console wants a line now and then, not a stream
PLAIN_WIDTH = 100
MIN_BAR_WIDTH = 10


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03, 3d04h: compact, and stable in width within each range."""
    s = max(0, math.ceil(seconds))
    if s >= 100 * 3600:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def format_rate(per_s: float) -> str:
    if per_s >= 100:
        return f"{per_s:.0f}/s"
    if per_s >= 1:
        return f"{per_s:.1f}/s"
    return f"{per_s:.2f}/s"


# `leased`, not `running`: an agent holds up to `slots + prefetch` leases (twice its slots by default)
# and the daemon cannot tell a running task from one held ready, so "running 8" on 4 slots was false.
# Long labels when the bar can still get a useful width beside them, short ones on a narrow terminal.
LONG_LABELS = {"sep": "  ", **{seg: long for seg, long, _ in TASK_STATE_LABELS.values()}, "instances": "instances "}
SHORT_LABELS = {"sep": " ", **{seg: short for seg, _, short in TASK_STATE_LABELS.values()}, "instances": "inst "}
COMFORTABLE_BAR_WIDTH = 20


# What goes first when even the short line does not fit: the least useful at a glance.
DROP_ORDER = ("instances", "rate", "retrying", "cancelled", "queued", "leased", "dead")


def _segment(counts: dict[str, int], segment: str) -> int:
    """The tasks shown in one segment of the line: every state labelled with it (states.TASK_STATE_LABELS)."""
    return sum(int(counts.get(s.value, 0)) for s, (seg, _, _) in TASK_STATE_LABELS.items() if seg == segment)


def _segments(job: dict[str, Any], labels: dict[str, str]) -> tuple[list[tuple[str, str]], float]:
    counts: dict[str, int] = job.get("counts") or {}
    total = int(counts.get("total", 0))
    dead, cancelled = _segment(counts, "dead"), _segment(counts, "cancelled")
    finished = sum(int(counts.get(s, 0)) for s in TERMINAL_TASK_STATES)
    remaining = max(0, total - finished)
    rate = float(job.get("rate_per_s") or 0.0)
    fraction = finished / total if total else 0.0
    percent = math.floor(fraction * 1000) / 10  # floor, so 999 of 1000 never reads as 100.0%

    parts = [("percent", f"{percent:5.1f}%"), ("finished", f"{finished}/{total}"),
             ("dead", f"{labels['dead']}{dead}")]
    if cancelled:
        parts.append(("cancelled", f"{labels['cancelled']}{cancelled}"))
    parts.append(("leased", f"{labels['leased']}{_segment(counts, 'leased')}"))
    parts.append(("queued", f"{labels['queued']}{_segment(counts, 'queued')}"))
    retrying = _segment(counts, "retrying")
    if retrying:
        # `failed` tasks are waiting out a backoff before their retry: neither queued nor over.
        parts.append(("retrying", f"{labels['retrying']}{retrying}"))
    idle_open = bool(job.get("open")) and not remaining  # a standing queue with nothing to do now
    waiting = job.get("waiting") if not job.get("done") and not (total > 0 and rate > 0) and not idle_open else None
    if not waiting:
        parts.append(("rate", format_rate(rate)))  # while nothing runs it is 0: the reason says more
    if job.get("done"):
        # The outcome, not a bare `done`: a cancelled or failed job is over too.
        parts.append(("eta", str(job.get("outcome") or "done")))
    elif job.get("state") == "cancelled":
        parts.append(("eta", "cancelling"))
    elif job.get("state") == "paused":
        parts.append(("eta", "paused"))
    elif idle_open:
        parts.append(("eta", "open: waiting for tasks"))  # a standing queue, idle: more may come any time
    elif total > 0 and rate > 0 and not job.get("open"):
        # An open job's end is not known (more tasks may come), so no ETA: its rate says how it goes.
        parts.append(("eta", f"ETA {format_duration(remaining / rate)}"))
    elif waiting:
        # Queued work and nothing leased: the daemon's reason (an instance limit, a launch, no offer).
        parts.append(("eta", str(waiting)))
    else:
        parts.append(("eta", "ETA --"))  # nothing uploaded yet, or nothing finished lately: no honest estimate
    parts.append(("instances", f"{labels['instances']}{int(job.get('instances') or 0)}"))
    return parts, fraction


def _fit_waiting(parts: list[tuple[str, str]], sep: str, room: int) -> list[tuple[str, str]]:
    """A waiting reason is cut (with an ellipsis) to leave the line within `room`; never below a word."""
    over = len(sep.join(t for _, t in parts)) - room
    out = []
    for key, text in parts:
        if key == "eta" and over > 0 and text.startswith("waiting"):
            keep = max(len("waiting"), len(text) - over - 1)
            text = text if keep >= len(text) else text[:keep].rstrip(" ,;:") + "…"
        out.append((key, text))
    return out


def format_progress(job: dict[str, Any], width: int) -> str:
    """One line for a job, at most `width` characters; the bar takes whatever room is left (a waiting
    reason is shortened before the bar is)."""
    for labels, min_bar in ((LONG_LABELS, COMFORTABLE_BAR_WIDTH), (SHORT_LABELS, MIN_BAR_WIDTH)):
        parts, fraction = _segments(job, labels)
        parts = _fit_waiting(parts, labels["sep"], width - 3 - min_bar)
        text = labels["sep"].join(t for _, t in parts)
        bar_width = width - len(text) - 3  # "[", "]" and a space
        if bar_width >= min_bar:
            filled = int(fraction * bar_width)
            return f"[{'#' * filled}{'.' * (bar_width - filled)}] {text}"
    # No room for a bar: keep the numbers that matter most, whole, rather than cut one in half.
    for key in DROP_ORDER:
        if len(text) <= width:
            break
        parts = [p for p in parts if p[0] != key]
        text = SHORT_LABELS["sep"].join(t for _, t in parts).strip()
    return text.strip()[:max(0, width)]


def _kind(reason: str) -> str:
    return re.sub(r"[0-9.]+", "#", reason)


class ProgressDisplay:
    """Writes progress lines to a stream; call `update` as often as you like, it rate-limits itself."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S
        self.clock = clock
        self._last_draw = -math.inf
        self._drawn = 0  # characters on the current terminal line, to blank out when shorter
        self._said = ""  # the last waiting reason written in full above the line (its kind)

    def update(self, job: dict[str, Any], *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.interval_s:
            return
        self._last_draw = now
        waiting = str(job.get("waiting") or "")
        if self.tty and waiting and _kind(waiting) != self._said:
            # The line may have to cut the reason: it is written whole above it once, and again
            # only when it changes in kind (not for each second of a countdown in it).
            self._said = _kind(waiting)
            self.message(f"job {job.get('id')} {waiting}")
            self._last_draw = now
        if self.tty:
            # One column short of the terminal: writing the last column makes some terminals wrap.
            width = shutil.get_terminal_size((80, 24)).columns - 1
            line = format_progress(job, width)
            self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
            self._drawn = len(line)
        else:
            # A log keeps the whole waiting reason: the line grows rather than cut it.
            width = PLAIN_WIDTH + len(str(job.get("waiting") or ""))
            self.stream.write(f"job {job.get('id')}: {format_progress(job, width)}\n")
        self.stream.flush()

    def message(self, line: str) -> None:
        """A line of its own above the progress line (a failed launch): the bar is redrawn under it
        at the next update."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
            self._last_draw = -math.inf
        self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, job: dict[str, Any] | None = None) -> None:
        """Draw the final state (if given) and end the line, so what follows starts on its own."""
        if job is not None:
            self.update(job, force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0
