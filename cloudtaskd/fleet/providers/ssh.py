"""The `ssh` provider: a fixed list of machines a user already has, used as instances.

An instance is one agent on one host (a host runs at most one of ours at a time). Launch
bootstraps over SSH (cloudtaskd.fleet.bootstrap); terminate stops the agent and removes its files;
list asks every host which of our agents are alive there. Host keys are pinned: from the
config when given, else on first use, in the state database.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path

import asyncssh
import structlog

from cloudtaskd.errors import ProviderError
from cloudtaskd.fleet.bootstrap import (
    BootstrapLog,
    BootstrapSpec,
    SshTarget,
    connect,
    install,
    running_agents,
    stop_agent,
)
from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer, frame_args
from cloudtaskd.fleet.providers.sections.ssh import SshHostConfig, SshProviderConfig
from cloudtaskd.fleet.runtime import RuntimeBuilder
from cloudtaskd.fleet.tunnels import Tunnels

log = structlog.get_logger("cloudtaskd.fleet.providers.ssh")

LIST_CONNECT_WAIT_S = 10.0

PinGet = Callable[[str, int], Awaitable[str | None]]
PinSet = Callable[[str, int, str], Awaitable[None]]


class SshProvider:
    name = "ssh"

    def __init__(self, config: SshProviderConfig, state_dir: Path, get_pin: PinGet, set_pin: PinSet,
                 runtime: RuntimeBuilder, tunnels: Tunnels | None = None) -> None:
        self.hosts = list(config.hosts)
        self.runtime = runtime
        self.tunnels = tunnels  # None: agents dial agents.public_url directly
        self.dir = state_dir / "ssh"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs = state_dir / "instances"
        self._get_pin = get_pin
        self._set_pin = set_pin
        self._lock = asyncio.Lock()

    @property
    def max_instances(self) -> int:
        return len(self.hosts)

    def offers(self) -> list[Offer]:
        """Each free host, once: a host runs one instance at a time."""
        return [Offer(self.name, "host", _hid(h), False, h.cpus, price_per_hour=0.0, available=1)
                for h in self._free_hosts()]

    def _records(self) -> dict[str, str]:
        """instance id -> host key string (address:port) of our assignments."""
        out = {}
        for rec in self.dir.glob("*.json"):
            with suppress(OSError, ValueError):
                out[rec.stem] = json.loads(rec.read_text())["host"]
        return out

    def _free_hosts(self) -> list[SshHostConfig]:
        used = set(self._records().values())
        return [h for h in self.hosts if _hid(h) not in used]

    async def _target(self, host: SshHostConfig) -> SshTarget:
        pinned = host.host_key or await self._get_pin(host.address, host.port)
        return SshTarget(host.address, host.port, host.user, Path(host.key_file), pinned or None)

    async def _connect(self, host: SshHostConfig, instance: str, *, wait_s: float,
                       bootlog: BootstrapLog | None = None) -> asyncssh.SSHClientConnection:
        target = await self._target(host)
        conn, key = await connect(target, instance=instance, wait_s=wait_s, bootlog=bootlog)
        if target.host_key is None and key:
            await self._set_pin(host.address, host.port, key)  # trust on first use, then pinned
            log.info("host_key_pinned", host=host.address, port=host.port)
        return conn

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        async with self._lock:  # two launches must not pick the same host
            records = self._records()
            if spec.instance_id in records:
                host = next(h for h in self.hosts if _hid(h) == records[spec.instance_id])
            else:
                free = self._free_hosts()
                if not free:
                    raise ProviderError(self.name, "launch", "every configured host is in use", retryable=True)
                wanted = spec.offer.zone if spec.offer is not None else None
                host = next((h for h in free if _hid(h) == wanted), free[0])
                (self.dir / f"{spec.instance_id}.json").write_text(json.dumps({"host": _hid(host)}))
        if spec.worker_bundle is None:
            raise ProviderError(self.name, "launch", "no worker bundle to install")
        bundle = spec.worker_bundle
        bootlog = BootstrapLog(self.logs / spec.instance_id / "bootstrap.log")
        try:
            conn = await self._connect(host, spec.instance_id, wait_s=60, bootlog=bootlog)
            await install(conn, spec, lambda url: BootstrapSpec(
                spec.instance_id, url, spec.token, spec.slots, bundle, spec.worker_spec,
                frame_args(spec.max_message_bytes), ca_cert=spec.ca_cert, bundle_limits=spec.bundle_limits),
                bootlog, self.runtime, self.tunnels, partial(self.ssh, spec.instance_id))
        except Exception:
            # Failed bootstrap: free the host (its log stays for `cloudtaskctl instances --logs`).
            with suppress(Exception):
                await self.terminate(spec.instance_id)
            # Even when that could not connect (a refused key, a host key that does not match): the
            # host would otherwise stay "in use" for ever and offer nothing. An agent the bootstrap
            # may have left there is ours by its tag: the next sync lists it and stops it as leaked.
            with suppress(FileNotFoundError):
                (self.dir / f"{spec.instance_id}.json").unlink()
            raise
        return CloudInstance(spec.instance_id, f"{host.user}@{host.address}:{host.port}", address=host.address)

    async def ssh(self, instance_id: str) -> asyncssh.SSHClientConnection:
        """A new connection to the instance's host (its tunnel's), host key pinned."""
        host = await self._host_of(instance_id)
        if host is None:
            raise ProviderError(self.name, "ssh", f"{instance_id} has no host assigned and runs on no configured host")
        return await self._connect(host, instance_id, wait_s=30)

    async def _host_of(self, instance_id: str) -> SshHostConfig | None:
        """The host of the instance: our record of it, or (launched by another replica, whose records
        are in its own state directory) the configured host its agent runs on, recorded here from now
        on, so this replica can also stop it (docs/replicas.md)."""
        host_id = self._records().get(instance_id)
        if host_id is not None:
            return next((h for h in self.hosts if _hid(h) == host_id), None)
        for host in self.hosts:
            try:
                conn = await self._connect(host, instance_id, wait_s=LIST_CONNECT_WAIT_S)
                async with conn:
                    ids = await running_agents(conn)
            except Exception as exc:  # that host away: the caller's next try asks again
                log.warning("ssh_host_unreachable", host=_hid(host), instance=instance_id, error=str(exc))
                continue
            if instance_id in ids:
                (self.dir / f"{instance_id}.json").write_text(json.dumps({"host": _hid(host)}))
                log.info("ssh_instance_adopted", instance=instance_id, host=_hid(host))
                return host
        return None

    async def terminate(self, instance_id: str) -> None:
        host_id = self._records().get(instance_id)
        if host_id is None:
            if self.tunnels is not None:
                await self.tunnels.close(instance_id)
            return
        host = next((h for h in self.hosts if _hid(h) == host_id), None)
        if host is not None:
            conn = await self._connect(host, instance_id, wait_s=30)
            async with conn:
                last_words = await stop_agent(conn, instance_id)
            if self.tunnels is not None:  # after the agent stopped: it drained through the tunnel
                await self.tunnels.close(instance_id)
            if last_words.strip():
                BootstrapLog(self.logs / instance_id / "bootstrap.log").write(f"# agent.log, last lines:\n{last_words}")
        with suppress(FileNotFoundError):
            (self.dir / f"{instance_id}.json").unlink()

    async def list_instances(self) -> list[CloudInstance]:
        async def one(host: SshHostConfig) -> list[CloudInstance]:
            try:
                conn = await self._connect(host, "(list)", wait_s=LIST_CONNECT_WAIT_S)
                async with conn:
                    ids = await running_agents(conn)
            except Exception as exc:
                raise ProviderError(self.name, "list", f"{host.address}:{host.port}: {exc}", retryable=True) from exc
            return [CloudInstance(i, f"{host.user}@{host.address}:{host.port}", address=host.address) for i in ids]

        found = await asyncio.gather(*(one(h) for h in self.hosts))
        return [c for group in found for c in group]

    def output_tail(self, instance_id: str) -> str | None:
        return BootstrapLog(self.logs / instance_id / "bootstrap.log").tail()

    async def close(self) -> None:
        return None


def _hid(host: SshHostConfig) -> str:
    return f"{host.address}:{host.port}"
