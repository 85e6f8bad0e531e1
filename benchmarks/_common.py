"""Helpers shared by the benchmarks: a real cloudtaskd process and its control socket."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class DaemonProcess:
    """cloudtaskd as a real separate process on a temp state dir (its RSS and CPU are its own)."""

    def __init__(self, config: dict[str, Any], state_dir: Path | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="cloudtask-bench-")
        self.state_dir = state_dir or Path(self.tmp.name) / "state"
        self.config_path = Path(self.tmp.name) / "config.yaml"
        self.config_path.write_text(yaml.safe_dump({"state_dir": str(self.state_dir), "log_level": "warning",
                                                    **config}))
        self.socket = self.state_dir / "cloudtaskd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.log = open(Path(self.tmp.name) / "daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "cloudtaskd.daemon", "--config", str(self.config_path)],
                                     stdout=self.log, stderr=self.log, cwd=ROOT)
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.get("/v1/health")
                return
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("cloudtaskd did not start; see " + str(Path(self.tmp.name) / "daemon.log"))
                await asyncio.sleep(0.05)

    async def get(self, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(f"http://cloudtaskd{path}") as resp:
            resp.raise_for_status()
            return await resp.json()

    async def post(self, path: str, **kw: Any) -> Any:
        assert self.session is not None
        async with self.session.post(f"http://cloudtaskd{path}", **kw) as resp:
            body = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"{path}: {resp.status} {body}")
            return body

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()
