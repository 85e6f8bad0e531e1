"""What the daemon knows of a provider without importing it: one descriptor per provider.

A descriptor names the provider, its config section (the frozen dataclass in sections/ that the
generic loader in config.py reads, plus the cross-key checks types cannot say), how to start it, how
to fetch its catalog, how `cloudtaskctl check` checks it, and which spot-notice watcher its agents
run. Each provider's module here exports one as `DESCRIPTOR`; cloudtaskd/fleet/providers/registry.py
lists them, and config loading, the daemon and `cloudtaskctl check` loop over that list instead of
naming providers. (SkyPilot's sky/provision/__init__.py routing is the model.)

A provider stands on three floors: its section (sections/<name>.py) at the bottom, its driver
(<name>.py) above it, its descriptor here on top; each imports only downward.

These modules stay light: a cloud SDK, asyncssh and the drivers are imported inside the functions
that need them, so loading a config costs no SDK import and an unused cloud never loads its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cloudtaskd.configtypes import ConfigWarning
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers import login_key
from cloudtaskd.fleet.providers.sections import CloudProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.core.store import Store
    from cloudtaskd.fleet.catalog import Fetcher
    from cloudtaskd.fleet.providers.base import Provider
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.cloud import CloudDriver, CloudSettings
    from cloudtaskd.fleet.runtime import RuntimeBuilder
    from cloudtaskd.fleet.tunnels import Tunnels

C = TypeVar("C")


@dataclass(frozen=True, kw_only=True)
class ProviderEnv:
    """What the daemon hands a provider it starts."""

    daemon_id: str  # cloud resources are tagged with it
    state_dir: Path
    store: Store  # host keys are pinned there
    runtime: RuntimeBuilder  # the agent's packages for a remote machine's Python
    tunnels: Tunnels | None  # None: agents dial agents.public_url directly
    source: str  # the config file, which errors name


@dataclass(frozen=True, kw_only=True)
class Section:
    """One provider's section as the config file wrote it, for the errors its checks raise."""

    source: str  # the config file
    at: str  # its key path as written: providers.aws, or aws in the top-level (seed) form
    seed: bool  # written as a top-level section, which enables the cloud
    # The spot-notice watchers of every registered provider (registry.interruption_sources), given
    # by the loader: a section that rehearses one (providers.local) checks against it without
    # importing the registry, which imports every descriptor.
    interruption_sources: tuple[str, ...] = ()

    def why_on(self, name: str) -> str:
        return f"the top-level {name} section is given" if self.seed else f"providers.{name}.enabled is true"


def _no_checks(section: Any, where: Section) -> list[ConfigWarning]:
    return []


@dataclass(frozen=True, kw_only=True)
class ProviderDescriptor(Generic[C]):
    """One provider, as config loading, the daemon and `cloudtaskctl check` see it."""

    name: str  # its key under providers:, its instances' id prefix, Offer.provider
    config: type[C]  # its section: a frozen dataclass of typed fields (config.py's loader reads it)
    remote: bool  # machines elsewhere: reached over SSH, cannot dial the daemon at a loopback address
    enabled: Callable[[C], bool]  # configured to run (a cloud's `enabled`, ssh's hosts)
    max_instances: Callable[[C], int]
    # The running provider. Imports its driver (and SDK) only now, when enabled.
    start: Callable[[C, ProviderEnv], Provider]
    # `cloudtaskctl check`'s lines for it; cheap: no more than a round trip (credentials).
    check: Callable[[C, bool], Awaitable[list[CheckResult]]]
    # Keys that need each other: raises ConfigError naming the key as written; returns warnings.
    validate: Callable[[C, Section], list[ConfigWarning]] = _no_checks
    # How the started provider fetches its priced offers; None: it has no catalog (its offers are free).
    catalog: Callable[[C, Provider], Fetcher] | None = None
    # The agent's watcher for its spot machines' notices (agent/interruption.py); None: no notices.
    interruption_source: str | None = None
    # The original spec's form: a top-level `<name>:` section enables it (config.py folds it in).
    seed_section: bool = False
    # The SSH private key it logs in to its machines with, where the daemon chooses which public key
    # they carry (a cloud installs it on each VM it launches), made if it is the daemon's own and
    # missing: replicas must share it (core/pg/shared_identity.py). None: the machines' authorized keys
    # are not the daemon's to choose (ssh: the user's hosts).
    login_key: Callable[[C, ProviderEnv], Path] | None = None

    def section(self, providers: Any) -> C:
        """This provider's section of a loaded config's `providers`."""
        value = getattr(providers, self.name)
        if not isinstance(value, self.config):
            raise TypeError(f"providers.{self.name} is a {type(value).__name__}, not {self.config.__name__}")
        return value

    def launches(self, section: C) -> bool:
        """Whether it can start an instance at all."""
        return self.enabled(section) and self.max_instances(section) > 0


# ---- what every cloud shares ----

CC = TypeVar("CC", bound=CloudProviderConfig)


def cloud(name: str, config: type[CC], *, driver: Callable[[CC, str], CloudDriver],
          check: Callable[[CC, bool], Awaitable[list[CheckResult]]],
          catalog: Callable[[CC, CloudDriver, Sequence[str]], Fetcher] | None,
          required: tuple[str, ...], validate: Callable[[CC, Section], list[ConfigWarning]] = _no_checks,
          ) -> ProviderDescriptor[CC]:
    """A cloud's descriptor: its driver behind CloudProvider (SSH bootstrap), its agents watching its
    own spot notices, and the checks every cloud shares (the `required` keys, max_instances 0)
    before its own `validate`, all only when it is enabled.

    driver(section, daemon_id): a driver for the section. catalog(section, driver, machine_types):
    the fetch of those types' offers; None: no price catalog (its configured offers only)."""

    source = name  # the agent watches the notices of the cloud it runs on (agent/interruption.py)

    def start(section: CC, env: ProviderEnv) -> Provider:
        from cloudtaskd.fleet.pins import InstancePins
        from cloudtaskd.fleet.providers.cloud import CloudProvider

        settings = _settings(name, section, env, source)  # first: a missing key file is an error before any client
        return CloudProvider(driver(section, env.daemon_id), settings, env.daemon_id, env.state_dir,
                             InstancePins(env.store), env.runtime, env.tunnels)

    def fetcher(section: CC, provider: Provider) -> Fetcher:
        from cloudtaskd.fleet.providers.cloud import CloudProvider

        assert catalog is not None and isinstance(provider, CloudProvider), provider
        s = provider.settings
        return catalog(section, provider.driver, list(dict.fromkeys((s.machine_type, *s.machine_types))))

    def checked(section: CC, where: Section) -> list[ConfigWarning]:
        if not section.enabled:
            return []
        for key in required:
            if not getattr(section, key):
                raise ConfigError(where.source, f"{where.at}.{key}", f"required when {where.why_on(name)}")
        warnings = validate(section, where)
        if section.max_instances == 0:
            warnings.insert(0, ConfigWarning("config_cloud_unused", (f"{where.at}.max_instances",),
                                             f"{where.at} is enabled with max_instances 0: it never launches"))
        return warnings

    return ProviderDescriptor(
        name=name, config=config, remote=True, enabled=lambda c: c.enabled, max_instances=lambda c: c.max_instances,
        start=start, check=check, validate=checked, catalog=fetcher if catalog is not None else None,
        interruption_source=source, seed_section=True,
        login_key=lambda c, env: login_key.ensure(name, c.ssh_key_file, env.state_dir, env.source))


def _settings(name: str, c: CloudProviderConfig, env: ProviderEnv, interruption_source: str) -> CloudSettings:
    from cloudtaskd.fleet.providers.cloud import CloudSettings

    key = login_key.ensure(name, c.ssh_key_file, env.state_dir, env.source)
    return CloudSettings(c.machine_type, c.placement, c.spot, c.cpus, c.ssh_user, key, c.ssh_address_override,
                         c.image, c.on_demand_fallback, tuple(c.machine_types), tuple(c.zones), c.metadata_url,
                         interruption_source)
