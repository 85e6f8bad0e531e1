"""Machines the user already has, reached over SSH: its section (sections/ssh.py) checked, its hosts
checked, and their agents bootstrapped by providers/ssh.py (asyncssh is imported only when it starts
or is checked)."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from cloudtaskd.configtypes import ConfigWarning
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers.descriptors import ProviderDescriptor, ProviderEnv, Section
from cloudtaskd.fleet.providers.sections.ssh import SshHostConfig, SshProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.fleet.providers.base import Provider
    from cloudtaskd.fleet.providers.checks import CheckResult

CONNECT_TIMEOUT_S = 5.0  # `cloudtaskctl check`: how long a host's SSH port may take to answer


def _validate(c: SshProviderConfig, where: Section) -> list[ConfigWarning]:
    seen: dict[tuple[str, int], int] = {}
    for i, host in enumerate(c.hosts):
        at = f"{where.at}.hosts[{i}]"
        if not host.address:
            raise ConfigError(where.source, f"{at}.address", "required: the host's name or IP address")
        if not host.key_file:
            raise ConfigError(where.source, f"{at}.key_file", "required: the private key the daemon logs in with")
        first = seen.setdefault((host.address, host.port), i)
        if first != i:
            raise ConfigError(where.source, at, f"the same host as {where.at}.hosts[{first}] "
                                                f"({host.address}:{host.port}): one agent runs per host, list it once")
    return []


def _start(c: SshProviderConfig, env: ProviderEnv) -> Provider:
    from cloudtaskd.fleet.pins import AddressPins
    from cloudtaskd.fleet.providers.ssh import SshProvider

    pins = AddressPins(env.store)
    return SshProvider(c, env.state_dir, pins.get, pins.set, env.runtime, env.tunnels)


async def _check(c: SshProviderConfig, cheap: bool) -> list[CheckResult]:
    out: list[CheckResult] = []
    for group in await asyncio.gather(*(_check_host(h, cheap) for h in c.hosts)):
        out.extend(group)
    return out


async def _check_host(host: SshHostConfig, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.fleet.providers.checks import CheckResult

    address, port, key_file = host.address, host.port, host.key_file
    where = f"host {address}:{port}"
    if not key_file or not os.access(key_file, os.R_OK):
        return [CheckResult("ssh", where, "FAIL", f"key_file {key_file or '(none)'} is not readable: set"
                                                  " providers.ssh.hosts[].key_file to the private key")]
    if cheap:
        return [CheckResult("ssh", where, "ok", f"key {key_file}")]
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT_S)
        writer.close()
        return [CheckResult("ssh", where, "ok", "answers on its SSH port")]
    except (OSError, TimeoutError) as exc:
        return [CheckResult("ssh", where, "FAIL", f"no answer on port {port} ({exc or 'timed out'}): start sshd"
                                                  " there, or fix the address or port, or a firewall in between")]


DESCRIPTOR = ProviderDescriptor(
    name="ssh", config=SshProviderConfig, remote=True, enabled=lambda c: bool(c.hosts),
    max_instances=lambda c: len(c.hosts), start=_start, check=_check, validate=_validate)
