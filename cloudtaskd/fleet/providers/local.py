"""The `local` provider: instances are agent processes on the control host.

Each agent runs in its own session (process group), so it survives a daemon crash and is
adopted again on restart; its pid and start time are kept in `<state_dir>/local/<id>.json` so a
recycled pid is never mistaken for it.

An agent reads the daemon's address (every replica's, one a line, this daemon's first) from
`<state_dir>/local/<id>/agent.url` before each connection, and the daemon writes that file for every
local agent once its listener is bound (publish_urls): a restarted daemon on another port is found
again without anyone's help. An agent that cannot reach
any daemon for LOCAL_GIVE_UP_AFTER_S exits (a daemon that died for good must not leave it dialling).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path

import structlog

from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer, frame_args, watch_args
from cloudtaskd.fleet.providers.sections.local import LocalProviderConfig
from cloudtaskd.redact import without_secrets

log = structlog.get_logger("cloudtaskd.fleet.providers.local")

TERMINATE_GRACE_S = 30.0
# A restarted daemon is back within seconds (systemd's Restart=); after five minutes without one, the
# daemon is not coming back soon, and when it does its reconciler replaces what is missing.
LOCAL_GIVE_UP_AFTER_S = 300.0
URL_FILE = "agent.url"


def _start_time(pid: int) -> str | None:
    """The process start time from /proc (field 22): with the pid, a unique identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie has exited
    return fields[19]


def _write_atomic(path: Path, text: str) -> None:
    """Written whole or not at all: an agent reading it meanwhile sees the old URL or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


class LocalProvider:
    name = "local"

    def __init__(self, config: LocalProviderConfig, state_dir: Path) -> None:
        self.config = config
        self.dir = state_dir / "local"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cpus = config.cpus or os.cpu_count() or 1
        self._children: dict[str, asyncio.subprocess.Process] = {}

    def offers(self) -> list[Offer]:
        return [Offer(self.name, "local", "localhost", False, self.cpus, price_per_hour=0.0)]

    def _record(self, instance_id: str) -> Path:
        return self.dir / f"{instance_id}.json"

    def _alive(self, instance_id: str) -> int | None:
        try:
            rec = json.loads(self._record(instance_id).read_text())
        except (OSError, ValueError):
            return None
        pid = int(rec["pid"])
        return pid if _start_time(pid) == rec["start"] else None

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        pid = self._alive(spec.instance_id)
        if pid is not None:
            return CloudInstance(spec.instance_id, str(pid))
        inst_dir = self.dir / spec.instance_id
        inst_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(inst_dir / URL_FILE, "\n".join(spec.dial_urls))
        ca_args: list[str] = []
        if spec.ca_cert:
            (inst_dir / "ca.pem").write_bytes(spec.ca_cert)
            ca_args = ["--ca-file", str(inst_dir / "ca.pem")]
        env = {
            **without_secrets(os.environ),  # the daemon's credentials (${VAR} in its config) stay with it
            **spec.env,
            # The token goes through the environment, not argv, which every local user can read.
            "CLOUDTASK_AGENT_TOKEN": spec.token,
        }
        argv = [
            sys.executable, "-m", "agent.main",
            *(arg for url in spec.dial_urls for arg in ("--url", url)),
            "--url-file", str(inst_dir / URL_FILE),
            "--give-up-after", f"{LOCAL_GIVE_UP_AFTER_S:g}",
            "--instance", spec.instance_id,
            "--worker-dir", str(spec.worker_dir),
            "--slots", str(spec.slots),
            *ca_args,
            *frame_args(spec.max_message_bytes),
            *watch_args(self.config.interruption_source,
                        self.config.metadata_url.replace("{instance}", spec.instance_id)),
        ]
        logfile = open(inst_dir / "agent.log", "ab")  # noqa: ASYNC230 - a local file, handed to the child
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile, env=env,
                cwd=str(inst_dir), start_new_session=True,
            )
        finally:
            logfile.close()
        self._children[spec.instance_id] = proc
        start = _start_time(proc.pid)
        self._record(spec.instance_id).write_text(json.dumps({"pid": proc.pid, "start": start}))
        log.info("local_agent_started", instance=spec.instance_id, pid=proc.pid, slots=spec.slots)
        return CloudInstance(spec.instance_id, str(proc.pid))

    def owns(self, instance_id: str) -> bool:
        """Launched on this host (its directory is here, alive or not). Replicas on other hosts each
        have a local provider of their own: the leader judges their local agents by presence alone."""
        return (self.dir / instance_id).is_dir()

    def publish_urls(self, urls: tuple[str, ...]) -> list[str]:
        """Tell every live local agent where the daemon (and each replica) now listens: they read
        it before each connection. Returns the instances told."""
        told = []
        for rec in self.dir.glob("*.json"):
            if self._alive(rec.stem) is not None and (self.dir / rec.stem).is_dir():
                _write_atomic(self.dir / rec.stem / URL_FILE, "\n".join(urls))
                told.append(rec.stem)
        return told

    async def terminate(self, instance_id: str, grace_s: float = TERMINATE_GRACE_S) -> None:
        pid = self._alive(instance_id)
        if pid is not None:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._alive(instance_id) is not None:
                await self._reap(instance_id)
                await asyncio.sleep(0.05)
            if self._alive(instance_id) is not None:
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        await self._reap(instance_id)
        with suppress(FileNotFoundError):
            self._record(instance_id).unlink()

    async def _reap(self, instance_id: str) -> None:
        proc = self._children.get(instance_id)
        if proc is not None and proc.returncode is None:
            with suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=0.01)
        if proc is not None and proc.returncode is not None:
            self._children.pop(instance_id, None)

    async def list_instances(self) -> list[CloudInstance]:
        out = []
        for rec in self.dir.glob("*.json"):
            instance_id = rec.stem
            await self._reap(instance_id)
            pid = self._alive(instance_id)
            if pid is not None:
                out.append(CloudInstance(instance_id, str(pid)))
            else:
                with suppress(FileNotFoundError):
                    rec.unlink()
        return out

    def output_tail(self, instance_id: str, max_chars: int = 2000) -> str | None:
        """The end of an agent's log, to say why it died (shown as the instance's last_error)."""
        try:
            with open(self.dir / instance_id / "agent.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_chars))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return None

    async def close(self) -> None:
        for instance_id in list(self._children):
            await self._reap(instance_id)
