"""Each provider's config section: the frozen dataclass that config.py's generic loader reads for
`providers.<name>` (unknown keys, types, ranges, `${VAR}`, secrets), one module per provider.

The lowest floor of a provider: its descriptor (descriptors/) reads it to check and start the
provider, and a driver that takes its section whole (local.py, ssh.py) imports it from here, so no
driver needs its descriptor. Plain data only: no SDK, no driver, nothing that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudtaskd.configtypes import bounds


@dataclass(frozen=True)
class CloudProviderConfig:
    """What every cloud shares: the offer to launch, and how the daemon reaches a new VM over SSH."""

    enabled: bool = False
    max_instances: int = field(default=4, metadata=bounds(0, 100_000))
    machine_type: str = ""
    cpus: int = field(default=2, metadata=bounds(1, 4096))  # of machine_type: slots = cpus / cpus_per_task
    spot: bool = True
    # With spot: fall back to on-demand while no spot offer has capacity (back to spot when it returns).
    on_demand_fallback: bool = True
    # More instance types and zones to choose among, cheapest task-slot-hour first; their sizes and
    # prices come from the catalog (`cloudtaskctl catalog refresh`). machine_type and the provider's
    # own zone are always included.
    machine_types: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    image: str = ""  # empty: Ubuntu 24.04 LTS of each type's architecture; set: used for every type
    ssh_user: str = "ubuntu"
    # Private key the daemon logs in with (its .pub is installed on each VM).
    # Empty: <state_dir>/ssh/id_ed25519, created on first start.
    ssh_key_file: str = ""
    # Emulators and tests only: reach every VM's SSH at host:port instead of its public address.
    ssh_address_override: str = ""
    # Tests only: where agents on spot VMs read interruption notices, instead of the cloud's own
    # metadata service (169.254.169.254 / metadata.google.internal).
    metadata_url: str = ""

    @property
    def placement(self) -> str:
        """Where VMs go, in the cloud's own terms (an AWS zone or region, a GCP zone, an Azure location)."""
        return ""
