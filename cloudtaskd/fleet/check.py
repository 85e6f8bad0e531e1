"""`cloudtaskctl check`: before anything is spent, whether each enabled provider can work.

Runs without a daemon, from the config: for each enabled provider its own checks (its descriptor's
`check`, cloudtaskd/fleet/providers/descriptors/; a cloud's live inside its driver module, behind
`async def check(...) -> list[CheckResult]`), then how agents will reach the daemon. Each line is
ok, warn or FAIL with what to fix. `cheap` keeps to what costs no more than a round trip (the
config, the agents' address, the credentials): what `cloudtaskctl run` checks before it launches
anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from cloudtaskd.config import Config
from cloudtaskd.fleet.providers import registry
from cloudtaskd.fleet.providers.checks import CheckResult as CheckResult  # re-exported: cloudtaskctl check
from cloudtaskd.fleet.providers.checks import quota_result as quota_result  # re-exported, as above
from cloudtaskd.fleet.providers.descriptors import ProviderDescriptor


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _enabled(config: Config) -> list[ProviderDescriptor[Any]]:
    """The providers that can start an instance, in the registry's order."""
    return [d for d in registry.PROVIDERS if d.launches(d.section(config.providers))]


def agents_check(config: Config) -> CheckResult:
    """How agents reach the daemon: through the SSH tunnels (no public_url), or dialling public_url,
    which remote instances cannot do at a loopback address (the config loader refuses that)."""
    a = config.agents
    remote = [d.name for d in _enabled(config) if d.remote]
    if not a.public_url:
        how = (f"{', '.join(remote)} instances' agents come through the daemon's SSH connections (tunnels: no "
               "inbound port needed here)") if remote else "local agents dial this host's loopback"
        return CheckResult("agents", "address", "ok", how)
    if remote and _loopback((urlsplit(a.public_url).hostname or "").strip("[]")):
        return CheckResult("agents", "address", "FAIL",
                           f"agents dial {a.public_url}, which {', '.join(remote)} instances cannot reach (it is this "
                           "host's loopback): set agents.public_url to an address they can reach, or remove it")
    return CheckResult("agents", "address", "ok",
                       f"agents dial {a.public_url}: its port must be open to them (agents.listen_port fixed)")


async def run_checks(config: Config, *, cheap: bool = False) -> list[CheckResult]:
    enabled = _enabled(config)
    out = [CheckResult("config", config.source, "ok" if enabled else "FAIL",
                       f"providers: {', '.join(d.name for d in enabled)}" if enabled else
                       "no provider can start an instance: enable one (providers.local.enabled, providers.ssh.hosts,"
                       " providers.aws.enabled ...) with max_instances above 0")]
    groups = [d.check(d.section(config.providers), cheap) for d in enabled]  # each imports its SDK only now
    for group in await asyncio.gather(*groups):
        out.extend(group)
    out.append(agents_check(config))
    return out
