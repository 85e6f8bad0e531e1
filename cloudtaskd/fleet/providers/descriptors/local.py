"""The control host itself as a provider: the `providers.local` section, and its agents started as
processes here (providers/local.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudtaskd.configtypes import ConfigWarning, bounds
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers.descriptors import ProviderDescriptor, ProviderEnv, Section

if TYPE_CHECKING:
    from cloudtaskd.fleet.providers.base import Provider
    from cloudtaskd.fleet.providers.checks import CheckResult


@dataclass(frozen=True)
class LocalProviderConfig:
    enabled: bool = True
    max_instances: int = field(default=1, metadata=bounds(0, 1024))
    # CPUs one local instance offers; 0 = all of this host's CPUs
    cpus: int = field(default=0, metadata=bounds(0, 4096))
    # Rehearse spot interruptions locally: local agents watch this cloud's notices at metadata_url
    # (a stand-in that serves them; "{instance}" in it becomes the instance id). Empty: no watcher.
    # One of the registered clouds' interruption sources (checked in _validate).
    interruption_source: str = ""
    metadata_url: str = ""


def _validate(c: LocalProviderConfig, where: Section) -> list[ConfigWarning]:
    from cloudtaskd.fleet.providers.registry import interruption_sources  # the registry imports this module

    choices = ("", *interruption_sources())
    if c.interruption_source not in choices:
        shown = ", ".join(s or '""' for s in choices)
        raise ConfigError(where.source, f"{where.at}.interruption_source",
                          f"expected one of {shown}, got {c.interruption_source!r}")
    return []


def _start(c: LocalProviderConfig, env: ProviderEnv) -> Provider:
    from cloudtaskd.fleet.providers.local import LocalProvider

    return LocalProvider(c, env.state_dir)


async def _check(c: LocalProviderConfig, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.fleet.providers.checks import CheckResult

    return [CheckResult("local", "this host", "ok", f"{c.cpus or os.cpu_count()} cpus")]


DESCRIPTOR = ProviderDescriptor(
    name="local", config=LocalProviderConfig, remote=False, enabled=lambda c: c.enabled,
    max_instances=lambda c: c.max_instances, start=_start, check=_check, validate=_validate)
