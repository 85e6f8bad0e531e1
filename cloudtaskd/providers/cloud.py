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
from pathlib import Path
from typing import Protocol

import structlog

from cloudtaskd.bootstrap import BootstrapLog, BootstrapSpec, SshTarget, bootstrap, connect, stop_agent
from cloudtaskd.errors import ProviderError
from cloudtaskd.providers.base import CloudInstance, LaunchSpec

log = structlog.get_logger("cloudtaskd.providers.cloud")

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
    image: str | None = None  # None: the driver's default Ubuntu LTS image


@dataclass(frozen=True, slots=True)
class CloudVm:
    instance_id: str
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

    async def get(self, instance_id: str) -> CloudVm | None: ...

    async def delete(self, instance_id: str) -> None:
        """Delete the VM and what was made for it (NIC, IP, disk); idempotent."""
        ...

    async def list(self) -> list[CloudVm]:
        """Every non-terminated VM tagged with this daemon's id."""
        ...

    async def close(self) -> None: ...


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
    pip_args: tuple[str, ...] = ()


class CloudProvider:
    """A cloud driver plus SSH bootstrap, behind the common Provider interface."""

    def __init__(self, driver: CloudDriver, settings: CloudSettings, daemon_id: str, state_dir: Path) -> None:
        self.driver = driver
        # Read once at start: a missing key is a config error to report before any VM is made.
        self.public_key = Path(f"{settings.ssh_key_file}.pub").read_text().strip()
        self.name = driver.name
        self.settings = settings
        self.daemon_id = daemon_id
        self.logs = state_dir / "instances"

    def slots_for(self, cpus_per_task: float) -> int:
        return max(1, int(self.settings.cpus // cpus_per_task))

    def _ssh_target(self, vm: CloudVm) -> SshTarget:
        host, port = vm.public_ip or "", 22
        if self.settings.ssh_address_override:
            host, _, p = self.settings.ssh_address_override.rpartition(":")
            port = int(p)
        if not host:
            raise ProviderError(self.name, "launch", f"VM {vm.cloud_id} has no public address")
        return SshTarget(host, port, self.settings.ssh_user, self.settings.ssh_key_file)

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        s = self.settings
        vm = await self.driver.create(CreateRequest(
            spec.instance_id, self.daemon_id, s.machine_type, s.zone, s.spot, s.ssh_user, self.public_key))
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
        bootlog = BootstrapLog(self.logs / spec.instance_id / "bootstrap.log")
        try:
            conn, _ = await connect(self._ssh_target(vm), instance=spec.instance_id, bootlog=bootlog)
            async with conn:
                await bootstrap(conn, BootstrapSpec(
                    spec.instance_id, spec.agent_url, spec.token, spec.slots, spec.worker_bundle, spec.worker_spec,
                    s.pip_args), bootlog)
        except Exception:
            await self.driver.delete(spec.instance_id)  # a failed bootstrap never leaves a VM running
            raise
        return CloudInstance(spec.instance_id, vm.cloud_id, address=vm.public_ip)

    async def terminate(self, instance_id: str) -> None:
        vm = await self.driver.get(instance_id)
        if vm is not None and vm.state == "running":
            try:  # let the agent drain and go before the machine does
                conn, _ = await connect(self._ssh_target(vm), instance=instance_id, wait_s=10)
                async with conn:
                    await stop_agent(conn, instance_id)
            except Exception as exc:
                log.info("agent_stop_skipped", instance=instance_id, reason=str(exc))
        await self.driver.delete(instance_id)

    async def list_instances(self) -> list[CloudInstance]:
        return [CloudInstance(vm.instance_id, vm.cloud_id, running=vm.state in ("pending", "running"),
                              address=vm.public_ip) for vm in await self.driver.list()]

    def output_tail(self, instance_id: str) -> str | None:
        return BootstrapLog(self.logs / instance_id / "bootstrap.log").tail()

    async def close(self) -> None:
        await self.driver.close()
