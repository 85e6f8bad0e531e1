"""The provider registry: every provider is one descriptor, and config loading, the daemon and
`cloudtaskctl check` know providers only through it (cloudtaskd/fleet/providers/registry.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from cloudtaskd import config as config_module
from cloudtaskd.config import Config, ProvidersConfig, load_config
from cloudtaskd.core.store import Store
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.check import run_checks
from cloudtaskd.fleet.providers import registry
from cloudtaskd.fleet.providers.descriptors import ProviderEnv
from cloudtaskd.fleet.runtime import RuntimeBuilder
from tests import paths
from tests.conftest import make_config

ROOT = paths.ROOT

# The least each provider needs to start: enabled, with its required keys.
MINIMAL = {"local": {"enabled": True}, "ssh": {"hosts": [{"address": "10.0.0.5", "key_file": "/k"}]},
           "aws": {"enabled": True}, "gcp": {"enabled": True, "project_id": "p"},
           "azure": {"enabled": True, "subscription_id": "s"}}


def test_names_are_unique_and_the_config_sections_are_the_registrys() -> None:
    names = [d.name for d in registry.PROVIDERS]
    assert len(set(names)) == len(names)
    assert registry.names() == tuple(names)
    # providers: has one section per registered provider, in its order, each its descriptor's class.
    assert [(f.name, f.type) for f in fields(ProvidersConfig)] == [(d.name, d.config) for d in registry.PROVIDERS]
    assert config_module.SEED_SECTIONS == registry.seed_sections() == ("aws", "gcp", "azure")
    for d in registry.PROVIDERS:
        assert registry.get(d.name) is d
        assert isinstance(d.section(Config().providers), d.config)
    with pytest.raises(KeyError, match="registered: local, ssh, aws, gcp, azure"):
        registry.get("nimbus")


def test_spot_notices_are_ones_the_agent_can_watch() -> None:
    from agent.interruption import SOURCES

    assert set(registry.interruption_sources()) <= set(SOURCES)
    assert [d.name for d in registry.PROVIDERS if d.interruption_source] == ["aws", "gcp", "azure"]


@pytest.mark.parametrize("name", registry.names())
def test_each_section_loads_from_a_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"providers:\n  {name}: {MINIMAL[name]!r}\n".replace("'", '"'))
    d = registry.get(name)
    section = d.section(load_config(path).providers)
    assert d.launches(section)
    path.write_text(f"providers:\n  {name}:\n    no_such_key: 1\n")
    with pytest.raises(Exception, match=f"providers.{name}.no_such_key: unknown key"):
        load_config(path)


@pytest.mark.parametrize("name", registry.names())
async def test_each_starts_a_provider_of_its_name(tmp_path: Path, name: str) -> None:
    """The factory builds the running provider (a cloud's driver without a call to the cloud), and a
    provider with a catalog gives a fetcher for it."""
    path = tmp_path / "c.yaml"
    path.write_text(f"providers:\n  {name}: {MINIMAL[name]!r}\n".replace("'", '"'))
    d = registry.get(name)
    section = d.section(load_config(path).providers)
    env = ProviderEnv(daemon_id="d-test", state_dir=tmp_path, store=Store(tmp_path / "db"),
                      runtime=RuntimeBuilder(tmp_path / "runtime"), tunnels=None, source=str(path))
    provider = d.start(section, env)
    try:
        assert provider.name == name
        assert d.max_instances(section) >= 1
        if d.catalog is not None:
            assert callable(d.catalog(section, provider))
        else:
            assert all(o.price_per_hour == 0.0 for o in provider.offers())  # free: nothing to fetch
    finally:
        await provider.close()


async def test_check_asks_each_enabled_provider(tmp_path: Path) -> None:
    results = await run_checks(make_config(tmp_path), cheap=True)
    assert results[0].detail == "providers: local"
    assert [r.provider for r in results[1:]] == ["local", "agents"]


def test_only_the_registry_names_providers() -> None:
    """The modules that loop over the registry hold no provider's name as a literal: a name switch
    there would be a second place to touch for a new cloud."""
    names = set(registry.names())
    for module in ("config.py", "daemon.py", "fleet/check.py", "reload.py", "fleet/interruptions.py",
                   "fleet/catalog/__init__.py"):
        tree = ast.parse((ROOT / "cloudtaskd" / module).read_text())
        # An attribute's name (hasattr(p, "ssh"): a method) is not a provider's.
        attributes = {id(n.args[1]) for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) > 1
                      and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")}
        literals = {n.value for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in attributes}
        assert not literals & names, f"cloudtaskd/{module} names {sorted(literals & names)}"


def test_a_provider_stands_on_three_floors() -> None:
    """Section, driver, descriptor, registry: each imports only downward (lazy imports included), so
    a provider's modules never import each other in a circle and a driver never needs its descriptor."""
    base = "cloudtaskd.fleet.providers"
    floors = {f"{base}.sections": 0, base: 1, f"{base}.descriptors": 2, f"{base}.registry": 3}

    def floor(module: str) -> int:  # the longest prefix's: sections.aws is a section, not a driver
        found = [p for p in floors if module == p or module.startswith(f"{p}.")]
        return floors[max(found, key=len)] if found else -1

    for path in sorted((ROOT / "cloudtaskd" / "fleet" / "providers").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = {n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        above = sorted(m for m in imported if floor(m) > floor(module))
        assert not above, f"{path.relative_to(ROOT)} imports {above}, which stand above it"


def test_daemon_starts_the_registrys_providers_remote_first(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(
        **{name: registry.get(name).config(**{k: v for k, v in MINIMAL[name].items() if k != "hosts"})
           for name in ("local", "aws")}))
    daemon = Daemon(config)
    daemon.daemon_id = "d-test"
    started = [p.name for p, _ in daemon._providers()]
    assert started == ["aws", "local"]  # machines elsewhere first; gcp, azure and ssh are not enabled
    assert Daemon._local_names() == {"local"}


NEW_CLOUD = '''
import asyncio, dataclasses, sys, tempfile
from pathlib import Path
from cloudtaskd.fleet.providers import registry
from cloudtaskd.fleet.providers.descriptors import cloud
from cloudtaskd.fleet.providers.sections import CloudProviderConfig

@dataclasses.dataclass(frozen=True)
class NimbusConfig(CloudProviderConfig):
    region: str = ""
    machine_type: str = "n1"

async def check(c, cheap):
    from cloudtaskd.fleet.check import CheckResult
    return [CheckResult("nimbus", "credentials", "ok", c.region)]

def no_driver(c, daemon_id):
    raise AssertionError("not started here")

NIMBUS = cloud("nimbus", NimbusConfig, driver=no_driver, check=check, catalog=None, required=("region",))
registry.PROVIDERS = (*registry.PROVIDERS, NIMBUS)  # the one line a new cloud adds
registry._BY_NAME["nimbus"] = NIMBUS

from cloudtaskd.fleet.check import run_checks
from cloudtaskd.config import load_config
from cloudtaskd.errors import ConfigError

path = Path(tempfile.mkdtemp()) / "c.yaml"
def load(text):
    path.write_text(text)
    try:
        return load_config(path)
    except ConfigError as exc:
        return exc.key + ": " + str(exc).split(": ", 2)[2]

print(load("nimbus:\\n  machine_type: n2\\n"))
print(load("providers:\\n  nimbus:\\n    enabled: true\\n"))
print(load("providers:\\n  nimbus:\\n    regoin: x\\n").split(" (")[0])
print(load("nimbus:\\n  region: r1\\nagents:\\n  public_url: wss://127.0.0.1:1/v1/agent\\n").split(",")[0])
c = load("providers:\\n  local: {enabled: false}\\n  nimbus: {enabled: true, region: r1}\\n")
print(c.providers.nimbus.region)
for r in asyncio.run(run_checks(c, cheap=True)):
    print(r.line())
'''


def test_a_new_cloud_is_a_descriptor_and_one_registry_line() -> None:
    """A cloud added to PROVIDERS alone gets its section (both forms), its checks with errors naming
    its keys, the unknown-key guard and its `cloudtaskctl check` lines: nothing else names it."""
    out = subprocess.run([sys.executable, "-c", NEW_CLOUD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == [
        "nimbus.region: required when the top-level nimbus section is given",
        "providers.nimbus.region: required when providers.nimbus.enabled is true",
        "providers.nimbus.regoin: unknown key",
        "agents.public_url: 'wss://127.0.0.1:1/v1/agent' is a loopback address",
        "r1",
    ]
    assert lines[5].startswith("ok    config: ") and lines[5].endswith("providers: nimbus")
    assert lines[6:] == ["ok    nimbus: credentials: r1",
                         "ok    agents: address: nimbus instances' agents come through the daemon's SSH connections "
                         "(tunnels: no inbound port needed here)"]
