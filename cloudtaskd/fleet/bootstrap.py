"""Installs the agent and the worker on an instance over SSH, and starts the agent.

Idempotent: a second bootstrap of the same instance re-uploads nothing that is unchanged in
meaning (the files are the same bytes), reuses the virtualenv, and does not start a second agent
while the first is alive. The remote layout, under `~/.cloudtask/<instance>/`:

    agentpkg/agent/...   this project's agent package (stdlib + aiohttp)
    agentpkg/cloudtask_wire/...  the wire codec the agent speaks (stdlib), the same the daemon imports
    worker/              the worker bundle, unpacked by agent/bundle.py's rules
    venv/                `python3 -m venv --without-pip` (no ensurepip needed): the agent's and the
                         worker's environment; a .pth puts the runtime on its path, bin/pip runs its pip
    token                the agent's token (mode 600; never on a command line)
    agent.url            where the agent dials the daemon (every replica's URL, one a line); read
                         again before each reconnection (a tunnel's port, tunnels.py)
    agent.pid, agent.log

and, shared by the instances of one host, `~/.cloudtask/runtime/<digest>/lib`: the agent's
third-party packages for this host's Python and CPU (runtime.py), built on the control host and
uploaded once. Nothing is downloaded on the instance, so it needs no internet, pip or compiler:
only a system `python3` of 3.9 or newer.
"""

from __future__ import annotations

import asyncio
import io
import json
import shlex
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from agent.bundle import Limits
from cloudtask_wire.workerspec import RESOLVED_SPEC_FILE
from cloudtaskd.errors import CloudtaskError
from cloudtaskd.fleet.providers.base import LaunchSpec
from cloudtaskd.fleet.runtime import RuntimeBuilder, RuntimeUnavailable, Target
from cloudtaskd.fleet.tunnels import Tunnels

log = structlog.get_logger("cloudtaskd.fleet.bootstrap")

SSH_WAIT_S = 300.0
SSH_RETRY_MIN_S = 1.0
SSH_RETRY_MAX_S = 15.0
COMMAND_TIMEOUT_S = 900.0
# What an instance imports of this project (put on its PYTHONPATH as agentpkg/).
AGENT_PACKAGES = ("agent", "cloudtask_wire")
AGENT_LOG_TAIL_LINES = 20  # kept from an agent's log when it is stopped: why it exited


class DeployError(CloudtaskError):
    """Installing or starting the agent on an instance failed."""

    def __init__(self, instance: str, step: str, message: str) -> None:
        self.instance = instance
        self.step = step
        super().__init__(f"instance {instance}: {step}: {message}")


class HostKeyMismatch(DeployError):
    """The instance's SSH host key is not the one pinned for it: refused (possible interception)."""


@dataclass(frozen=True, slots=True)
class SshTarget:
    host: str
    port: int
    user: str
    key_file: Path
    # The pinned host key(s): OpenSSH public key lines, one per line (a cloud may publish one per
    # algorithm); None = trust on first use, then pin.
    host_key: str | None = None

    def __repr__(self) -> str:
        return f"SshTarget({self.user}@{self.host}:{self.port})"


@dataclass(frozen=True, slots=True)
class BootstrapSpec:
    instance_id: str
    agent_url: str
    token: str
    slots: int
    worker_bundle: Path  # the gzip'd tar the user uploaded
    worker_spec: dict[str, Any]  # the validated cloudtask.yaml, as the agent reads it (worker.json)
    agent_args: tuple[str, ...] = ()  # more agent options (its frame limit, its spot-notice watcher)
    ca_cert: bytes = b""  # the daemon's CA (PEM), pinned by the agent; empty: no TLS
    bundle_limits: Limits = field(default_factory=Limits)  # the worker is unpacked under these caps
    # Every replica's agent URL, agent_url first; empty: agent_url alone (a tunnel's, or one daemon).
    agent_urls: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"BootstrapSpec(instance_id={self.instance_id!r}, slots={self.slots})"


def agent_package() -> bytes:
    """The agent's packages as a gzip'd tar: the agent and the wire codec it shares with the daemon
    (built from this installation, so the two ends always speak the same version)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for package in AGENT_PACKAGES:
            _add_sources(tar, resources.files(package), package)
    return buf.getvalue()


def _add_sources(tar: tarfile.TarFile, folder: Traversable, name: str) -> None:
    """Every .py file under `folder`, subpackages included, sorted so the archive is reproducible."""
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and entry.name != "__pycache__":
            _add_sources(tar, entry, f"{name}/{entry.name}")
        elif entry.name.endswith(".py"):
            data = entry.read_bytes()
            info = tarfile.TarInfo(f"{name}/{entry.name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


class BootstrapLog:
    """Every step's command and output, kept on the control host (shown by `instances --logs`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        with self.path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def tail(self, max_chars: int = 2000) -> str | None:
        """The end of the log, to say why an instance failed (its last_error)."""
        try:
            return self.path.read_text()[-max_chars:].strip() or None
        except OSError:
            return None


async def connect(target: SshTarget, *, instance: str, wait_s: float = SSH_WAIT_S,
                  bootlog: BootstrapLog | None = None) -> tuple[asyncssh.SSHClientConnection, str]:
    """Connect with backoff until SSH answers. Returns the connection and the server's host key
    (OpenSSH format). A pinned key that does not match is refused at once, never retried."""
    known_hosts: tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]] | None = None
    if target.host_key is not None:
        keys = [asyncssh.import_public_key(line) for line in target.host_key.splitlines() if line.strip()]
        known_hosts = (keys, [], [])
    deadline = time.monotonic() + wait_s
    delay = SSH_RETRY_MIN_S
    if bootlog is not None:
        pin = "pinned host key" if target.host_key else "host key trusted on first use"
        bootlog.write(f"# ssh {target.user}@{target.host}:{target.port} ({pin})")
    while True:
        try:
            conn = await asyncssh.connect(
                target.host, target.port, username=target.user, client_keys=[str(target.key_file)],
                known_hosts=known_hosts, connect_timeout=15, keepalive_interval=15, keepalive_count_max=4,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyMismatch(instance, "ssh", f"host key of {target.host}:{target.port} does not match "
                                  "the pinned key; refusing to connect") from exc
        except asyncssh.PermissionDenied as exc:
            if bootlog is not None:
                bootlog.write(f"! permission denied: {exc}")
            raise DeployError(instance, "ssh", f"{target.user}@{target.host} refused our key: {exc}") from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise DeployError(instance, "ssh", f"{target.host}:{target.port} did not answer within "
                                  f"{wait_s:.0f} s: {exc}") from exc
            if bootlog is not None:
                bootlog.write(f"# ssh not ready ({exc or type(exc).__name__}); retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(SSH_RETRY_MAX_S, delay * 2)
            continue
        key = conn.get_server_host_key()
        host_key = key.export_public_key("openssh").decode().strip() if key is not None else ""
        return conn, host_key


async def _run(conn: asyncssh.SSHClientConnection, bootlog: BootstrapLog, instance: str, step: str,
               command: str, *, input: str | None = None) -> str:
    bootlog.write(f"$ {command}")
    try:
        result = await asyncio.wait_for(conn.run(command, input=input, check=False), COMMAND_TIMEOUT_S)
    except (asyncssh.Error, OSError, TimeoutError) as exc:
        bootlog.write(f"! {exc}")
        raise DeployError(instance, step, str(exc) or type(exc).__name__) from exc
    out = str(result.stdout or "") + str(result.stderr or "")
    if out:
        bootlog.write(out)
    if result.exit_status != 0:
        tail = out.strip()[-1500:] or "(no output)"
        raise DeployError(instance, step, f"exit code {result.exit_status}: {tail}")
    return str(result.stdout or "")


async def bootstrap(conn: asyncssh.SSHClientConnection, spec: BootstrapSpec, bootlog: BootstrapLog,
                    runtime: RuntimeBuilder) -> int:
    """Install and start the agent; returns its remote pid."""
    inst = spec.instance_id
    base = f".cloudtask/{inst}"
    q = shlex.quote
    urls = spec.agent_urls or (spec.agent_url,)
    probe = await _run(conn, bootlog, inst, "probe", f"mkdir -p {q(base)}/agentpkg && chmod 700 .cloudtask && "
                       "uname -m && (python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' || echo none)")
    words = probe.split()
    try:
        target = Target.parse(words[0] if words else "", words[1] if len(words) > 1 else "")
        rt = await runtime.get(target)
    except RuntimeUnavailable as exc:
        bootlog.write(f"! {exc}")
        raise DeployError(inst, "runtime", str(exc)) from exc
    rt_dir = f".cloudtask/runtime/{rt.digest[:16]}"
    have_runtime = (await conn.run(f"test -d {rt_dir}/lib", check=False)).exit_status == 0
    async with conn.start_sftp_client() as sftp:
        async with sftp.open(f"{base}/agent.tar.gz", "wb") as f:
            await f.write(agent_package())
        await sftp.put(str(spec.worker_bundle), f"{base}/worker.tar.gz")
        async with sftp.open(f"{base}/worker.json", "w") as f:
            await f.write(json.dumps(spec.worker_spec))
        async with sftp.open(f"{base}/agent.url", "w") as f:  # rewritten when its tunnel moves
            await f.write("\n".join(urls) + "\n")
        async with sftp.open(f"{base}/token", "w") as f:
            await f.write(spec.token)
        await sftp.chmod(f"{base}/token", 0o600)
        if spec.ca_cert:
            async with sftp.open(f"{base}/ca.pem", "wb") as f:
                await f.write(spec.ca_cert)
        if not have_runtime:
            await sftp.put(str(rt.path), f"{base}/runtime.tar.gz")
    bootlog.write(f"# uploaded agent package, worker bundle and token; runtime {target.key} "
                  f"{'already there' if have_runtime else 'uploaded'}")
    if not have_runtime:
        # Unpacked beside its final name and renamed: instances bootstrapping on one host at once
        # never see half a runtime.
        await _run(conn, bootlog, inst, "runtime",
                   f"d={rt_dir}; rm -rf $d.$$ && mkdir -p $d.$$/lib && tar xzf {q(base)}/runtime.tar.gz -C $d.$$/lib"
                   f" && (mv -T $d.$$ $d 2>/dev/null || rm -rf $d.$$) && rm -f {q(base)}/runtime.tar.gz")
    # The worker is unpacked by the agent's own rules (agent/bundle.py: regular files and
    # directories only, caps on size, count and depth), not by the image's tar, into a fresh
    # directory that replaces the old one whole.
    lim = spec.bundle_limits
    await _run(conn, bootlog, inst, "unpack",
               f"cd {q(base)} && tar xzf agent.tar.gz -C agentpkg && rm -rf worker.new"
               f" && PYTHONPATH=agentpkg python3 -m agent.bundle worker.tar.gz worker.new --max-bytes {lim.max_bytes}"
               f" --max-files {lim.max_files} --max-depth {lim.max_depth}"
               f" && rm -rf worker && mv worker.new worker && cp worker.json worker/{RESOLVED_SPEC_FILE}")
    await _run(conn, bootlog, inst, "environment",
               f"cd {q(base)} && PYTHONPATH=agentpkg python3 -m agent.environment venv \"$HOME/{rt_dir}/lib\"")
    # Idempotent start: a live agent from an earlier bootstrap is left alone.
    extra = "".join(f" {q(a)}" for a in (*spec.agent_args, *(("--ca-file", "ca.pem") if spec.ca_cert else ())))
    start = (
        f"cd {q(base)} && if test -f agent.pid && kill -0 $(cat agent.pid) 2>/dev/null; then cat agent.pid; else "
        # The worker's environment too: its setup and processes find the venv's python and pip first.
        f"PATH=\"$PWD/venv/bin:$PATH\" VIRTUAL_ENV=\"$PWD/venv\""
        f" CLOUDTASK_AGENT_TOKEN=$(cat token)"
        f" PYTHONPATH=agentpkg setsid nohup venv/bin/python -m agent.main"
        f"{''.join(f' --url {q(url)}' for url in urls)} --url-file agent.url --instance {q(inst)} --worker-dir worker"
        f" --slots {spec.slots}{extra}"
        f" >>agent.log 2>&1 </dev/null & echo $! > agent.pid; cat agent.pid; fi"
    )
    out = await _run(conn, bootlog, inst, "start agent", start)
    try:
        pid = int(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeployError(inst, "start agent", f"could not read the agent's pid from {out!r:.200}") from None
    log.info("agent_bootstrapped", instance=inst, pid=pid)
    return pid


async def install(conn: asyncssh.SSHClientConnection, launch: LaunchSpec, make_spec: Callable[[str], BootstrapSpec],
                  bootlog: BootstrapLog, runtime: RuntimeBuilder, tunnels: Tunnels | None,
                  reconnect: Callable[[], Awaitable[asyncssh.SSHClientConnection]]) -> int:
    """Bootstrap over `conn` and, when agents come through tunnels, open the instance's tunnel on it
    first and hand the connection to `tunnels` to keep; otherwise close it. `launch` is the
    LaunchSpec (its agent URLs, every replica's, are used when there is no tunnel; a tunnelled
    agent is given its tunnel only: the tunnel is carried by this daemon's SSH connection)."""
    adopted = False
    try:
        if tunnels is None:
            url = launch.agent_url
            spec = replace(make_spec(url), agent_urls=launch.dial_urls)
        else:
            url = await tunnels.open(launch.instance_id, conn)
            spec = make_spec(url)
        pid = await bootstrap(conn, spec, bootlog, runtime)
        if tunnels is not None:
            bootlog.write(f"# agent tunnel: {url} on the instance, carried over this SSH connection")
            tunnels.keep(launch.instance_id, reconnect, conn, url)
            adopted = True
        return pid
    finally:
        if not adopted:
            conn.close()


async def stop_agent(conn: asyncssh.SSHClientConnection, instance: str, grace_s: float = 30.0) -> str:
    """SIGTERM the agent's process group (it drains), SIGKILL after the grace, remove its files.
    Returns the end of the agent's log, its last words (why it exited, when it did by itself)."""
    base = shlex.quote(f".cloudtask/{instance}")
    result = await conn.run(
        f"cd {base} 2>/dev/null || exit 0; if test -f agent.pid; then p=$(cat agent.pid); kill -TERM -$p 2>/dev/null;"
        f" for i in $(seq {int(grace_s * 10)}); do kill -0 $p 2>/dev/null || break; sleep 0.1; done;"
        f" kill -KILL -$p 2>/dev/null; fi; tail -n {AGENT_LOG_TAIL_LINES} agent.log 2>/dev/null; cd && rm -rf {base}",
        check=False,
    )
    return str(result.stdout or "")


async def running_agents(conn: asyncssh.SSHClientConnection) -> list[str]:
    """Instance ids with a live agent on this host."""
    result = await conn.run(
        "cd .cloudtask 2>/dev/null || exit 0; for d in */; do d=${d%/}; "
        "test -f $d/agent.pid && kill -0 $(cat $d/agent.pid) 2>/dev/null && echo $d; done",
        check=False,
    )
    return [line.strip() for line in str(result.stdout or "").splitlines() if line.strip()]
