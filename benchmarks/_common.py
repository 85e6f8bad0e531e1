"""Helpers shared by the benchmarks: a real cloudtaskd process and its control socket."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import DaemonProcess as _DaemonProcess  # noqa: E402
from tests.procs import bundle  # noqa: E402, F401 - re-exported for the benchmarks


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DaemonProcess(_DaemonProcess):
    """tests.procs.DaemonProcess on a temp dir that it removes at stop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="cloudtask-bench-")
        super().__init__(Path(self.tmp.name), config)

    async def stop(self) -> int:
        code = await super().stop()
        self.tmp.cleanup()
        return code
