"""What every cloud provider shares: a small driver per cloud (create, get, delete, list — all
tagged with the daemon's id and idempotent by our instance id), wrapped by `CloudProvider`, which
adds the SSH bootstrap that turns a fresh VM into a running agent.

Each cloud's driver lives in its own module (aws.py, gcp.py, azure.py), imports its SDK lazily,
maps the cloud's states through a `STATUS_MAP`, and turns SDK errors into the named types of
cloudtaskd.errors in one `classify` function.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import asyncssh
import structlog

from cloudtaskd.errors import ProviderError
from cloudtaskd.fleet.bootstrap import (
    SSH_WAIT_S,
    BootstrapLog,
    BootstrapSpec,
    SshTarget,
    connect,
    install,
    stop_agent,
)
from cloudtaskd.fleet.providers.base import X86_64, CloudInstance, LaunchSpec, Offer, frame_args, watch_args
from cloudtaskd.fleet.runtime import RuntimeBuilder
from cloudtaskd.fleet.tunnels import Tunnels

log = structlog.get_logger("cloudtaskd.fleet.providers.cloud")

TAG_DAEMON = "cloudtask-daemon"  # every resource we create carries the daemon's id ...
TAG_INSTANCE = "cloudtask-instance"  # ... and our instance id (the idempotency key)
VM_STATES = ("pending", "running", "stopping", "terminated")
RUNNING_WAIT_S = 600.0


@dataclass(frozen=True, slots=True)
class CreateRequest:
    instance_id: str
    daemon_id: str
    machine_type: str
    zone: str  # AWS: availability zone or region; GCP: zone; Azure: location
    spot: bool
    ssh_user: str
    ssh_public_key: str  # OpenSSH line, installed for ssh_user
    image: str | None = None  # None: the driver's default Ubuntu LTS image for `arch`
    arch: str = X86_64  # the machine type's CPU architecture (base.ARCHES): which default image boots it


@dataclass(frozen=True, slots=True)
class CloudVm:
    instance_id: str  # "": the VM carries the daemon's tag but not (yet) an instance id
    cloud_id: str
    state: str  # one of VM_STATES
    public_ip: str | None = None
    zone: str | None = None
    spot: bool = False
    tags: dict[str, str] = field(default_factory=dict)


class CloudDriver(Protocol):
    name: str

    async def create(self, req: CreateRequest) -> CloudVm:
        """Create one VM; idempotent by req.instance_id (a repeat returns the existing VM)."""
        ...

    async def get(self, instance_id: str) -> CloudVm | None:
        """By our instance id; a driver whose VMs can lack it (see `list`) also by the VM's cloud_id."""
        ...

    async def delete(self, instance_id: str) -> None:
        """Delete the VM and what was made for it (NIC, IP, disk); idempotent. Accepts what `get` does."""
        ...

    async def list(self) -> list[CloudVm]:
        """Every non-terminated VM tagged with this daemon's id, including any without an instance
        id (instance_id "": a launch between making the VM and tagging it, or one that crashed
        there). Those are reported, never hidden: nothing else would ever terminate them."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class PublishesHostKeys(Protocol):
    """A driver whose cloud publishes a VM's SSH host keys through its API (AWS in the console
    output, GCP in guest attributes): they are pinned before the first connection."""

    async def host_keys(self, instance_id: str) -> list[str]:
        """OpenSSH public key lines; [] while none are published (yet)."""
        ...


class HostKeyPins(Protocol):
    """Where a VM's host key is pinned: per instance, since cloud addresses are reused."""

    async def get(self, instance_id: str) -> str | None: ...

    async def set(self, instance_id: str, key: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CloudSettings:
    machine_type: str
    zone: str
    spot: bool
    cpus: int  # of machine_type, for slots
    ssh_user: str
    ssh_key_file: Path  # private; the public half is installed on each VM
    # Test/emulator hook: reach every VM's SSH at this host:port instead of its public IP.
    ssh_address_override: str = ""
    image: str = ""  # empty: the driver's default Ubuntu LTS image for each type's architecture
    on_demand_fallback: bool = True
    machine_types: tuple[str, ...] = ()  # more types to choose among (sized and priced by the catalog)
    zones: tuple[str, ...] = ()  # more zones (AWS, GCP) to choose among
    metadata_url: str = ""  # tests: where agents read spot notices instead of the cloud's metadata service
    # The agent's watcher of spot notices on this cloud's VMs (its descriptor's); empty: none.
    interruption_source: str = ""


class CloudProvider:
    """A cloud driver plus SSH bootstrap, behind the common Provider interface."""

    def __init__(self, driver: CloudDriver, settings: CloudSettings, daemon_id: str, state_dir: Path,
                 pins: HostKeyPins, runtime: RuntimeBuilder, tunnels: Tunnels | None = None) -> None:
        self.driver = driver
        self.runtime = runtime
        self.tunnels = tunnels  # None: agents dial agents.public_url directly
        self.pins = pins
        # Read once at start: a missing key is a config error to report before any VM is made.
        self.public_key = Path(f"{settings.ssh_key_file}.pub").read_text().strip()
        self.name = driver.name
        self.settings = settings
        self.daemon_id = daemon_id
        self.logs = state_dir / "instances"
        self.catalog: list[Offer] = []  # this provider's priced offers, set by the daemon from the catalog

    def offers(self) -> list[Offer]:
        """The configured types x zones x markets: priced and sized from the catalog when it has
        them; the configured machine_type is offered with the configured cpus even without one."""
        s = self.settings
        types = dict.fromkeys((s.machine_type, *s.machine_types))
        zones = dict.fromkeys((s.zone, *s.zones))
        markets = [True, False] if s.spot and s.on_demand_fallback else [s.spot]
        known = {(o.machine_type, o.zone, o.spot): o for o in self.catalog}
        offers = []
        for spot in markets:
            for machine_type in types:
                for zone in zones:
                    offer = known.get((machine_type, zone, spot))
                    if offer is not None:
                        offers.append(offer)
                    elif machine_type == s.machine_type:
                        offers.append(Offer(self.name, machine_type, zone, spot, s.cpus))
        return offers

    def _ssh_target(self, vm: CloudVm, host_key: str | None) -> SshTarget:
        host, port = vm.public_ip or "", 22
        if self.settings.ssh_address_override:
            host, _, p = self.settings.ssh_address_override.rpartition(":")
            port = int(p)
        if not host:
            raise ProviderError(self.name, "launch", f"VM {vm.cloud_id} has no public address")
        return SshTarget(host, port, self.settings.ssh_user, self.settings.ssh_key_file, host_key)

    async def _host_key(self, instance_id: str) -> str | None:
        """The pinned key, else the keys the cloud publishes (pinned now), else None: trust on first use."""
        pinned = await self.pins.get(instance_id)
        if pinned is None and isinstance(self.driver, PublishesHostKeys):
            published = await self.driver.host_keys(instance_id)
            if published:
                pinned = "\n".join(published)
                await self.pins.set(instance_id, pinned)
                log.info("host_key_from_cloud", instance=instance_id, keys=len(published))
        return pinned

    async def _connect(self, vm: CloudVm, *, wait_s: float = SSH_WAIT_S,
                       bootlog: BootstrapLog | None = None) -> asyncssh.SSHClientConnection:
        pinned = await self._host_key(vm.instance_id)
        conn, key = await connect(self._ssh_target(vm, pinned), instance=vm.instance_id, wait_s=wait_s, bootlog=bootlog)
        if pinned is None and key:
            await self.pins.set(vm.instance_id, key)  # trust on first use, then pinned
        return conn

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        s = self.settings
        offer = spec.offer or self.offers()[0]
        arch = offer.arch
        if not arch:
            arch = X86_64
            if not s.image:  # a configured image is used whatever the architecture
                log.warning("instance_arch_unknown", provider=self.name, machine_type=offer.machine_type,
                            assumed=arch, hint="no catalog entry for this type: run `cloudtaskctl catalog refresh`")
        vm = await self.driver.create(CreateRequest(
            spec.instance_id, self.daemon_id, offer.machine_type, offer.zone, offer.spot, s.ssh_user, self.public_key,
            s.image or None, arch))
        deadline = time.monotonic() + RUNNING_WAIT_S
        while vm.state != "running" or not (vm.public_ip or s.ssh_address_override):
            if vm.state == "terminated" or time.monotonic() > deadline:
                await self.driver.delete(spec.instance_id)
                raise ProviderError(self.name, "launch", f"VM {vm.cloud_id} did not come up ({vm.state})")
            await asyncio.sleep(2)
            got = await self.driver.get(spec.instance_id)
            if got is None:
                raise ProviderError(self.name, "launch", f"VM {vm.cloud_id} disappeared while starting")
            vm = got
        if spec.worker_bundle is None:
            raise ProviderError(self.name, "launch", "no worker bundle to install")
        bundle = spec.worker_bundle
        bootlog = BootstrapLog(self.logs / spec.instance_id / "bootstrap.log")
        watch = watch_args(s.interruption_source if offer.spot else "", s.metadata_url)
        try:
            conn = await self._connect(vm, bootlog=bootlog)
            await install(conn, spec, lambda url: BootstrapSpec(
                spec.instance_id, url, spec.token, spec.slots, bundle, spec.worker_spec,
                (*frame_args(spec.max_message_bytes), *watch), spec.ca_cert, spec.bundle_limits),
                bootlog, self.runtime, self.tunnels, partial(self.ssh, spec.instance_id))
        except Exception:
            if self.tunnels is not None:
                await self.tunnels.close(spec.instance_id)
            await self.driver.delete(spec.instance_id)  # a failed bootstrap never leaves a VM running
            raise
        return CloudInstance(spec.instance_id, vm.cloud_id, address=vm.public_ip)

    async def ssh(self, instance_id: str) -> asyncssh.SSHClientConnection:
        """A new connection to the instance's VM (its tunnel's), host key pinned."""
        vm = await self.driver.get(instance_id)
        if vm is None or vm.state != "running":
            raise ProviderError(self.name, "ssh", f"{instance_id} is not running ({vm.state if vm else 'gone'})")
        return await self._connect(vm, wait_s=30)

    async def terminate(self, instance_id: str) -> None:
        vm = await self.driver.get(instance_id)
        # A VM that never got its instance id was never bootstrapped: there is no agent to stop.
        if vm is not None and vm.state == "running" and vm.instance_id:
            try:  # let the agent drain and go before the machine does
                conn = await self._connect(vm, wait_s=10)
                async with conn:
                    await stop_agent(conn, instance_id)
            except Exception as exc:
                log.info("agent_stop_skipped", instance=instance_id, reason=str(exc))
        if self.tunnels is not None:  # after the agent stopped: it drained through the tunnel
            await self.tunnels.close(instance_id)
        await self.driver.delete(instance_id)

    async def list_instances(self) -> list[CloudInstance]:
        # A VM with our daemon's tag but no instance id is listed under its cloud id (which the
        # driver's get/delete accept), so the reconciler sees it as unknown and terminates it.
        return [CloudInstance(vm.instance_id or vm.cloud_id, vm.cloud_id, running=vm.state in ("pending", "running"),
                              address=vm.public_ip, anonymous=not vm.instance_id) for vm in await self.driver.list()]

    def output_tail(self, instance_id: str) -> str | None:
        return BootstrapLog(self.logs / instance_id / "bootstrap.log").tail()

    async def close(self) -> None:
        await self.driver.close()
