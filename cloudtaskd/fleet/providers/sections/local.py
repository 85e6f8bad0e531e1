"""The `providers.local` section: the control host itself as a provider (agents started as
processes here by providers/local.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudtaskd.configtypes import bounds


@dataclass(frozen=True)
class LocalProviderConfig:
    enabled: bool = True
    max_instances: int = field(default=1, metadata=bounds(0, 1024))
    # CPUs one local instance offers; 0 = all of this host's CPUs
    cpus: int = field(default=0, metadata=bounds(0, 4096))
    # Rehearse spot interruptions locally: local agents watch this cloud's notices at metadata_url
    # (a stand-in that serves them; "{instance}" in it becomes the instance id). Empty: no watcher.
    # One of the registered clouds' interruption sources (checked by descriptors/local.py).
    interruption_source: str = ""
    metadata_url: str = ""
