"""cloudtaskd as a real separate process (crash tests, benchmarks): start, SIGKILL, restart."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent


def bundle(files: dict[str, str]) -> bytes:
    """A gzip'd tar of in-memory files: a worker bundle as POST /v1/workers takes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump({"state_dir": str(self.state_dir), "log_level": "warning",
                                                    **config}))
        self.socket = self.state_dir / "cloudtaskd.sock"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, timeout_s: float = 30, *, env: dict[str, str] | None = None,
                    wrapper: tuple[str, ...] = ()) -> None:
        """env: the daemon's whole environment (default: ours); wrapper: argv that execs the daemon's."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "cloudtaskd.daemon", "--config", str(self.config_path)],
                stdout=log, stderr=log, cwd=ROOT, env=env,
            )
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.get("/v1/health")
                return
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"cloudtaskd did not start:\n{self.log_path.read_text()[-3000:]}") from None
                await asyncio.sleep(0.05)

    async def get(self, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(f"http://cloudtaskd{path}") as resp:
            resp.raise_for_status()
            if resp.content_type == "application/json":
                return await resp.json()
            return await resp.text()

    async def post(self, path: str, **kw: Any) -> Any:
        assert self.session is not None
        async with self.session.post(f"http://cloudtaskd{path}", **kw) as resp:
            body = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"{path}: {resp.status} {body}")
            return body

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or power loss would leave it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    async def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.session is not None:
            await self.session.close()
            self.session = None
        return self.proc.returncode if self.proc is not None else 0


def share_ca(first: DaemonProcess, other: DaemonProcess) -> None:
    """Copy a started replica's TLS CA into another's state dir before its first start: agents pin
    one CA, so any replica can take them (docs/replicas.md)."""
    (other.state_dir / "tls").mkdir(parents=True, mode=0o700, exist_ok=True)
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(first.state_dir / "tls" / name, other.state_dir / "tls" / name)
