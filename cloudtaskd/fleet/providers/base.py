"""The provider contract: the few operations every compute source (local, ssh, clouds) offers.

Operations are idempotent by instance id (a repeated launch of the same id creates nothing new)
and eventually consistent: `list_instances` is the truth the reconciler syncs from each tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.bundle import Limits

# An instance type's CPU architecture, as the catalog records it (each cloud's API names it its own
# way; the catalog modules map them to these). "" in an Offer: unknown (no catalog entry).
X86_64 = "x86_64"
ARM64 = "arm64"
ARCHES = (X86_64, ARM64)


@dataclass(frozen=True, slots=True)
class Offer:
    """One kind of instance a provider can sell: what it is, where, and (when known) its price."""

    provider: str
    machine_type: str
    zone: str  # the provider's own placement term: AWS zone/region, GCP zone, Azure location, a host
    spot: bool
    cpus: int
    memory_gb: float | None = None
    price_per_hour: float | None = None  # None: unknown (the catalog fills it in); 0.0: free (local, ssh)
    region: str = ""
    gpus: int = 0
    available: int | None = None  # how many more of exactly this can start (an ssh host: 1); None: no limit
    arch: str = ""  # X86_64 or ARM64, from the catalog; "": unknown (a cloud launch then assumes X86_64)

    @property
    def key(self) -> str:
        """One name for this offer, for back-off, interruption counts and the instance record."""
        return f"{self.provider}/{self.zone}/{self.machine_type}/{'spot' if self.spot else 'on-demand'}"


def frame_args(max_message_bytes: int) -> tuple[str, ...]:
    """The agent's option to read frames as large as the daemon may send it (none for 0: its default)."""
    return ("--max-message-bytes", str(max_message_bytes)) if max_message_bytes else ()


def watch_args(source: str, metadata_url: str = "") -> tuple[str, ...]:
    """The agent's options to watch a cloud's spot notices (none for an empty source)."""
    if not source:
        return ()
    return ("--interruption-source", source, *(("--metadata-url", metadata_url) if metadata_url else ()))


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    instance_id: str
    pool_id: int
    worker_dir: Path  # the extracted worker bundle on the control host
    agent_url: str  # where the agent dials the daemon
    token: str  # this instance's own agent token (never logged)
    slots: int
    env: dict[str, str] = field(default_factory=dict)
    worker_bundle: Path | None = None  # the gzip'd tar, for providers that copy it to a machine
    worker_spec: dict[str, Any] = field(default_factory=dict)  # validated cloudtask.yaml
    offer: Offer | None = None  # what to launch; None: the provider's first offer
    ca_cert: bytes = b""  # the daemon's CA (PEM) that the agent pins; empty: agent_url is plain ws://
    bundle_limits: Limits = field(default_factory=Limits)  # the caps the instance unpacks the worker under
    # The largest frame the agent is to read (agents.max_message_bytes, sized for the largest task);
    # 0: the agent's own default.
    max_message_bytes: int = 0
    # Every replica's agent URL, agent_url first (AgentsConfig.dial_urls); empty: agent_url alone.
    # Agents behind an SSH tunnel are given their tunnel's URL instead.
    agent_urls: tuple[str, ...] = ()

    @property
    def dial_urls(self) -> tuple[str, ...]:
        return self.agent_urls or (self.agent_url,)

    def __repr__(self) -> str:
        return f"LaunchSpec(instance_id={self.instance_id!r}, pool_id={self.pool_id}, slots={self.slots})"


@dataclass(frozen=True, slots=True)
class CloudInstance:
    instance_id: str
    cloud_id: str
    running: bool = True
    address: str | None = None
    # Carries the daemon's tag but no instance id (instance_id is then the cloud id): a launch in
    # flight between making the VM and tagging it, or one a crash cut there. Never a record's.
    anonymous: bool = False


class Provider(Protocol):
    name: str

    def offers(self) -> list[Offer]:
        """What this provider can launch (its configured offers; the orchestrator ranks them)."""
        ...

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        """Start one instance and its agent; idempotent by spec.instance_id."""
        ...

    async def terminate(self, instance_id: str) -> None:
        """Stop an instance (its agent first gets SIGTERM and a grace period); idempotent."""
        ...

    async def list_instances(self) -> list[CloudInstance]:
        """Every instance this provider runs for this daemon, including ones it does not know."""
        ...

    async def close(self) -> None: ...
