"""The `providers.ssh` section: machines the user already has, reached over SSH (providers/ssh.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudtaskd.configtypes import bounds


@dataclass(frozen=True)
class SshHostConfig:
    address: str = ""
    port: int = field(default=22, metadata=bounds(1, 65535))
    user: str = "root"
    key_file: str = ""  # private key the daemon logs in with
    cpus: int = field(default=1, metadata=bounds(1, 4096))  # slots = cpus / cpus_per_task
    # The host's public key (an OpenSSH line). Empty: trust on first use, then pinned in the database.
    host_key: str = ""


@dataclass(frozen=True)
class SshProviderConfig:
    hosts: tuple[SshHostConfig, ...] = ()
    # Extra pip arguments for installing aiohttp in the agent's virtualenv (a mirror, a wheelhouse).
    pip_args: tuple[str, ...] = ()
