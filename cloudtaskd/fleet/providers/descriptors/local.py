"""The control host itself as a provider: its section (sections/local.py) checked, and its agents
started as processes here (providers/local.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cloudtaskd.configtypes import ConfigWarning
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers.descriptors import ProviderDescriptor, ProviderEnv, Section
from cloudtaskd.fleet.providers.sections.local import LocalProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.fleet.providers.base import Provider
    from cloudtaskd.fleet.providers.checks import CheckResult


def _validate(c: LocalProviderConfig, where: Section) -> list[ConfigWarning]:
    choices = ("", *where.interruption_sources)
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
