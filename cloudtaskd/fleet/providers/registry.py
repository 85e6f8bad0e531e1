"""The one routing point from a provider's name to what it is (SkyPilot's sky/provision/__init__.py).

Config loading (the `providers:` section and the top-level seed sections), the daemon (which
providers start, their catalogs, which ones a service stop keeps running) and `cloudtaskctl check`
loop over PROVIDERS; nothing else names a provider. A new cloud is its own modules (its section in
sections/, its driver, a descriptor in descriptors/, its catalog) plus one line here; no descriptor
imports this module. docs/architecture.md says more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloudtaskd.fleet.providers.descriptors import ProviderDescriptor, ProviderEnv, aws, azure, gcp, local, ssh

# The order of the `providers:` section, of `cloudtaskctl check`'s lines, and (remote ones first,
# see launch_order) of the daemon's preference among equally good offers.
PROVIDERS: tuple[ProviderDescriptor[Any], ...] = (
    local.DESCRIPTOR,
    ssh.DESCRIPTOR,
    aws.DESCRIPTOR,
    gcp.DESCRIPTOR,
    azure.DESCRIPTOR,
)

_BY_NAME = {d.name: d for d in PROVIDERS}
if len(_BY_NAME) != len(PROVIDERS):  # a second line for one name would silently shadow the first
    raise RuntimeError(f"provider names registered twice: {[d.name for d in PROVIDERS]}")


def get(name: str) -> ProviderDescriptor[Any]:
    """The descriptor of a registered provider; KeyError names the ones there are."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no provider {name!r} (registered: {', '.join(_BY_NAME)})") from None


def find(name: str) -> ProviderDescriptor[Any] | None:
    return _BY_NAME.get(name)


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def seed_sections() -> tuple[str, ...]:
    """The providers that may be written as a top-level section (the original spec's `aws:`)."""
    return tuple(d.name for d in PROVIDERS if d.seed_section)


def interruption_sources() -> tuple[str, ...]:
    """The spot-notice watchers the registered clouds' agents run (providers.local may rehearse one)."""
    return tuple(dict.fromkeys(d.interruption_source for d in PROVIDERS if d.interruption_source))


def launch_order() -> tuple[ProviderDescriptor[Any], ...]:
    """The daemon's preference among offers of equal worth: machines elsewhere (the user's own ssh
    hosts, then the clouds) before the control host itself, which also runs the daemon."""
    return tuple(sorted(PROVIDERS, key=lambda d: not d.remote))


def login_keys(providers: Any, env: ProviderEnv) -> list[tuple[str, Path]]:
    """(provider, private key) for each provider the daemon starts (as it starts them: enabled, with
    instances allowed) whose machines carry the daemon's chosen key: the keys replicas must share.
    A key that is the daemon's own is made here if missing."""
    out: list[tuple[str, Path]] = []
    for d in launch_order():
        section = d.section(providers)
        if d.login_key is not None and d.launches(section):
            out.append((d.name, d.login_key(section, env)))
    return out
