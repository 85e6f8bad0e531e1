"""`cloudtaskctl check`: before anything is spent, whether each enabled provider can work.

Runs without a daemon, from the config: for each enabled provider its own checks (a cloud's live
inside its driver module, behind `async def check(...) -> list[CheckResult]`), then how agents
will reach the daemon. Each line is ok, warn or FAIL with what to fix. `cheap` keeps to what costs
no more than a round trip (the config, the agents' address, the credentials): what `cloudtaskctl
run` checks before it launches anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from cloudtaskd.config import Config

Status = Literal["ok", "warn", "FAIL"]
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    provider: str  # "config", "agents", or a provider's name
    what: str  # "credentials", "instance type t3.small", "host 10.0.0.5:22"
    status: Status
    detail: str = ""  # what was found, and for warn/FAIL what to fix

    def line(self) -> str:
        return f"{self.status:<4}  {self.provider}: {self.what}" + (f": {self.detail}" if self.detail else "")


def quota_result(provider: str, what: str, limit: float, used: float, needed: int, *, where: str,
                 fix: str) -> CheckResult:
    """A vCPU quota against what max_instances x cpus may use; `fix` says where to ask for more."""
    free = limit - used
    if free < needed:
        return CheckResult(provider, what, "FAIL", f"{free:g} of {limit:g} free{where} ({used:g} in use), below the "
                           f"{needed} vCPUs max_instances x cpus may use: {fix}")
    return CheckResult(provider, what, "ok", f"{free:g} of {limit:g} free, {needed} needed at most")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _enabled(config: Config) -> list[str]:
    p = config.providers
    names = ["local"] if p.local.enabled and p.local.max_instances > 0 else []
    if p.ssh.hosts:
        names.append("ssh")
    names += [n for n in ("aws", "gcp", "azure") if getattr(p, n).enabled and getattr(p, n).max_instances > 0]
    return names


def agents_check(config: Config) -> CheckResult:
    """How agents reach the daemon: through the SSH tunnels (no public_url), or dialling public_url,
    which remote instances cannot do at a loopback address (the config loader refuses that)."""
    a = config.agents
    remote = [n for n in _enabled(config) if n != "local"]
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


async def _ssh_host(address: str, port: int, key_file: str, cheap: bool) -> list[CheckResult]:
    where = f"host {address}:{port}"
    out: list[CheckResult] = []
    if not key_file or not os.access(key_file, os.R_OK):
        out.append(CheckResult("ssh", where, "FAIL", f"key_file {key_file or '(none)'} is not readable: set"
                                                     " providers.ssh.hosts[].key_file to the private key"))
        return out
    if cheap:
        return [CheckResult("ssh", where, "ok", f"key {key_file}")]
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT_S)
        writer.close()
        out.append(CheckResult("ssh", where, "ok", "answers on its SSH port"))
    except (OSError, TimeoutError) as exc:
        out.append(CheckResult("ssh", where, "FAIL", f"no answer on port {port} ({exc or 'timed out'}): start sshd"
                                                     " there, or fix the address or port, or a firewall in between"))
    return out


async def _aws(config: Config, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.providers.aws import AwsDriver

    c = config.providers.aws
    driver = AwsDriver(c.region, "check", access_key=c.access_key or None, secret_key=c.secret_key or None,
                       endpoint_url=c.endpoint_url or None, image=c.image or None, max_attempts=2)
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), zones=c.zones or (
            (c.zone,) if c.zone else ()), max_instances=c.max_instances, cpus=c.cpus, cheap=cheap)
    finally:
        await driver.close()


async def _gcp(config: Config, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.errors import ProviderError
    from cloudtaskd.providers.gcp import GcpDriver

    c = config.providers.gcp
    try:
        driver = GcpDriver(c.project_id, c.zone, "check", credentials_file=c.credentials_file or None,
                           api_endpoint=c.api_endpoint or None, image=c.image or None, network=c.network,
                           subnetwork=c.subnetwork or None, disk_type=c.disk_type or None)
    except ProviderError as err:
        return [CheckResult("gcp", "config", "FAIL", str(err))]
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), zones=c.zones,
                                  max_instances=c.max_instances, cpus=c.cpus, spot=c.spot, cheap=cheap)
    finally:
        await driver.close()


async def _azure(config: Config, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.errors import ProviderError
    from cloudtaskd.providers.azure import AzureDriver

    c = config.providers.azure
    try:
        driver = AzureDriver(c.subscription_id, c.resource_group, c.location, "check", tenant_id=c.tenant_id or None,
                             client_id=c.client_id or None, client_secret=c.client_secret or None,
                             base_url=c.base_url or None)
    except ProviderError as err:
        return [CheckResult("azure", "config", "FAIL", str(err))]
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), max_instances=c.max_instances,
                                  cpus=c.cpus, spot=c.spot, image=c.image or None, cheap=cheap)
    finally:
        await driver.close()


_CLOUDS = {"aws": _aws, "gcp": _gcp, "azure": _azure}


async def run_checks(config: Config, *, cheap: bool = False) -> list[CheckResult]:
    enabled = _enabled(config)
    out = [CheckResult("config", config.source, "ok" if enabled else "FAIL",
                       f"providers: {', '.join(enabled)}" if enabled else
                       "no provider can start an instance: enable one (providers.local.enabled, providers.ssh.hosts,"
                       " providers.aws.enabled ...) with max_instances above 0")]
    groups = []
    if "local" in enabled:
        groups.append(asyncio.sleep(0, [CheckResult("local", "this host", "ok",
                                                    f"{config.providers.local.cpus or os.cpu_count()} cpus")]))
    for h in config.providers.ssh.hosts if "ssh" in enabled else ():
        groups.append(_ssh_host(h.address, h.port, h.key_file, cheap))
    for name, check in _CLOUDS.items():
        if name in enabled:
            groups.append(check(config, cheap))
    for group in await asyncio.gather(*groups):
        out.extend(group)
    out.append(agents_check(config))
    return out
