"""Configuration: parsed once from YAML into frozen, typed objects.

Every error names the file and the key path (`agents.lease_ttl_s`). Unknown keys are
refused (a typo must not silently fall back to a default). `${VAR}` in a string value is
taken from the environment, so secrets need not live in the file; `Secret` values print as
`<SECRET>` in every repr, log line and error.
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from cloudtaskd.errors import ConfigError

DEFAULT_LEASE_TTL_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF_S = 2.0
DEFAULT_RETRY_BACKOFF_MAX_S = 300.0
DEFAULT_IDLE_TIMEOUT_S = 30.0


class Secret(str):
    """A string that never shows itself in repr/str formatting of containers or logs."""

    def __repr__(self) -> str:
        return "<SECRET>"

    def reveal(self) -> str:
        return str.__str__(self)


NO_SECRET = Secret("")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class ApiConfig:
    # Unix socket of the control API; empty = <state_dir>/cloudtaskd.sock. Mode 0660: the daemon's
    # user and socket_group only.
    socket: str = ""
    # The group that may use the socket besides the daemon's user; empty: the daemon's own group.
    socket_group: str = ""
    # Optional TCP listener ("host:port", port 0 = any free port), always TLS with a bearer token.
    # Empty: none, only the unix socket.
    listen: str = ""
    # The bearer token TCP clients must send (at least 16 characters); required with listen.
    # Put it in the environment: token: ${CLOUDTASK_API_TOKEN}
    token: Secret = NO_SECRET
    # Certificate and key for the TCP listener (PEM files); empty: issued by the daemon's own CA.
    tls_cert: str = ""
    tls_key: str = ""
    # Requests each client (a TCP peer address, or the unix socket as a whole) may make per
    # second, with bursts up to rate_burst; more wait for their turn.
    rate_limit_per_s: float = field(default=100.0, metadata=_range(0.1, 1e6))
    rate_burst: int = field(default=200, metadata=_range(1, 1_000_000))


@dataclass(frozen=True)
class AgentsConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = field(default=0, metadata=_range(0, 65535))  # 0 = any free port
    # Address agents dial; empty = ws://<listen_host>:<port>/v1/agent
    public_url: str = ""
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata=_range(1024, 256 * 1024 * 1024))
    lease_ttl_s: float = field(default=DEFAULT_LEASE_TTL_S, metadata=_range(1, 86400))
    # Leases handed out per dispatch round, across all agents
    lease_batch_max: int = field(default=4096, metadata=_range(1, 100_000))
    # TLS on the agent websocket, with a certificate from the daemon's own CA (created on first
    # start in <state_dir>/tls); agents pin that CA. Off only for tests and trusted networks.
    tls: bool = True
    # More names (DNS names or IP addresses) the agent certificate is valid for, besides
    # listen_host and public_url's host: the addresses VMs reach the daemon at.
    tls_names: tuple[str, ...] = ()
    # Live websocket connections per instance (a reconnect may overlap the old one for a moment).
    max_connections_per_instance: int = field(default=2, metadata=_range(1, 64))
    # Messages per second one agent connection may send (bursts of twice that); more are read later.
    max_messages_per_s: float = field(default=5000.0, metadata=_range(1, 1e7))


@dataclass(frozen=True)
class QueueConfig:
    max_attempts: int = field(default=DEFAULT_MAX_ATTEMPTS, metadata=_range(1, 100))
    retry_backoff_s: float = field(default=DEFAULT_RETRY_BACKOFF_S, metadata=_range(0, 86400))
    retry_backoff_max_s: float = field(default=DEFAULT_RETRY_BACKOFF_MAX_S, metadata=_range(0, 86400))
    # Per-task timeout when neither the task nor cloudtask.yaml gives one; 0 = none
    task_timeout_s: float = field(default=0.0, metadata=_range(0, 7 * 86400))


@dataclass(frozen=True)
class ScalingConfig:
    max_instances: int = field(default=8, metadata=_range(0, 100_000))
    idle_timeout_s: float = field(default=DEFAULT_IDLE_TIMEOUT_S, metadata=_range(0, 86400))
    # An instance that has not connected within this long is stopped and replaced
    start_timeout_s: float = field(default=600.0, metadata=_range(1, 86400))
    tick_s: float = field(default=1.0, metadata=_range(0.05, 600))
    # Size the fleet to finish the backlog within this long, from the observed task duration;
    # 0: as fast as the instance limits allow (a slot per outstanding task).
    target_s: float = field(default=0.0, metadata=_range(0, 30 * 86400))
    # Work that has waited this long with nothing booting adds one instance (below the limits),
    # even when the estimate says the fleet is big enough; 0: off.
    scale_up_after_s: float = field(default=60.0, metadata=_range(0, 86400))
    # What the whole fleet may cost per hour (list prices); 0: no limit.
    max_cost_per_hour: float = field(default=0.0, metadata=_range(0, 1e9))


@dataclass(frozen=True)
class LocalProviderConfig:
    enabled: bool = True
    max_instances: int = field(default=1, metadata=_range(0, 1024))
    # CPUs one local instance offers; 0 = all of this host's CPUs
    cpus: int = field(default=0, metadata=_range(0, 4096))
    # Rehearse spot interruptions locally: local agents watch this cloud's notices at metadata_url
    # (a stand-in that serves them; "{instance}" in it becomes the instance id). Empty: no watcher.
    interruption_source: str = field(default="", metadata={"choices": ("", "aws", "gcp", "azure")})
    metadata_url: str = ""


@dataclass(frozen=True)
class SshHostConfig:
    address: str = ""
    port: int = field(default=22, metadata=_range(1, 65535))
    user: str = "root"
    key_file: str = ""  # private key the daemon logs in with
    cpus: int = field(default=1, metadata=_range(1, 4096))  # slots = cpus / cpus_per_task
    # The host's public key (an OpenSSH line). Empty: trust on first use, then pinned in the database.
    host_key: str = ""


@dataclass(frozen=True)
class SshProviderConfig:
    hosts: tuple[SshHostConfig, ...] = ()
    # Extra pip arguments for installing aiohttp in the agent's virtualenv (a mirror, a wheelhouse).
    pip_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class CloudProviderConfig:
    """What every cloud shares: the offer to launch, and how the daemon reaches a new VM over SSH."""

    enabled: bool = False
    max_instances: int = field(default=4, metadata=_range(0, 100_000))
    machine_type: str = ""
    cpus: int = field(default=2, metadata=_range(1, 4096))  # of machine_type: slots = cpus / cpus_per_task
    spot: bool = True
    # With spot: fall back to on-demand while no spot offer has capacity (back to spot when it returns).
    on_demand_fallback: bool = True
    # More instance types and zones to choose among, cheapest task-slot-hour first; their sizes and
    # prices come from the catalog (`cloudtaskctl catalog refresh`). machine_type and the provider's
    # own zone are always included.
    machine_types: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    image: str = ""  # empty: the latest Ubuntu 22.04 LTS image
    ssh_user: str = "ubuntu"
    # Private key the daemon logs in with (its .pub is installed on each VM).
    # Empty: <state_dir>/ssh/id_ed25519, created on first start.
    ssh_key_file: str = ""
    # Emulators and tests only: reach every VM's SSH at host:port instead of its public address.
    ssh_address_override: str = ""
    # Tests only: where agents on spot VMs read interruption notices, instead of the cloud's own
    # metadata service (169.254.169.254 / metadata.google.internal).
    metadata_url: str = ""

    @property
    def placement(self) -> str:
        """Where VMs go, in the cloud's own terms (an AWS zone or region, a GCP zone, an Azure location)."""
        return ""


@dataclass(frozen=True)
class AwsProviderConfig(CloudProviderConfig):
    region: str = "us-east-1"
    zone: str = ""  # availability zone; empty: any in the region
    access_key: Secret = NO_SECRET  # empty: the standard AWS credential chain
    secret_key: Secret = NO_SECRET
    endpoint_url: str = ""  # an emulator (e.g. moto) instead of AWS
    pricing_endpoint_url: str = ""  # an emulator of the Pricing API (on-demand prices) instead of AWS's
    machine_type: str = "t3.small"

    @property
    def placement(self) -> str:
        return self.zone or self.region


@dataclass(frozen=True)
class GcpProviderConfig(CloudProviderConfig):
    project_id: str = ""
    zone: str = "us-central1-a"
    # Service-account JSON. Empty: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
    # the gcloud user file, the metadata server).
    credentials_file: str = ""
    api_endpoint: str = ""  # an emulator, scheme included (http://127.0.0.1:PORT)
    # The Cloud Billing Catalog API (list prices; needs the Cloud Billing API enabled); an emulator in tests.
    billing_endpoint: str = "https://cloudbilling.googleapis.com"
    machine_type: str = "e2-standard-2"

    @property
    def placement(self) -> str:
        return self.zone


@dataclass(frozen=True)
class AzureProviderConfig(CloudProviderConfig):
    subscription_id: str = ""
    resource_group: str = "cloudtask"
    location: str = "eastus"
    # A service principal (ClientSecretCredential) when all three are set, else DefaultAzureCredential.
    tenant_id: str = ""
    client_id: str = ""
    client_secret: Secret = NO_SECRET
    base_url: str = ""  # an emulator instead of https://management.azure.com
    # The public Retail Prices API (no credentials); an emulator's address in tests.
    retail_prices_url: str = "https://prices.azure.com/api/retail/prices"
    machine_type: str = "Standard_D2s_v5"

    @property
    def placement(self) -> str:
        return self.location


@dataclass(frozen=True)
class ProvidersConfig:
    local: LocalProviderConfig = field(default_factory=LocalProviderConfig)
    ssh: SshProviderConfig = field(default_factory=SshProviderConfig)
    aws: AwsProviderConfig = field(default_factory=AwsProviderConfig)
    gcp: GcpProviderConfig = field(default_factory=GcpProviderConfig)
    azure: AzureProviderConfig = field(default_factory=AzureProviderConfig)


@dataclass(frozen=True)
class Config:
    # Where the database, sockets, worker bundles and logs live; empty = per-user default
    state_dir: str = ""
    log_level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error")})
    api: ApiConfig = field(default_factory=ApiConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def socket_path(self) -> Path:
        return Path(self.api.socket) if self.api.socket else self.state_path / "cloudtaskd.sock"

    def with_state_dir(self, path: str | Path) -> Config:
        return replace(self, state_dir=str(path))


def default_state_dir() -> Path:
    """/var/lib/cloudtask for root (the service), else the XDG state home of the user."""
    if os.environ.get("CLOUDTASK_STATE_DIR"):
        return Path(os.environ["CLOUDTASK_STATE_DIR"])
    if os.geteuid() == 0 and not os.environ.get("HOME", "").startswith("/tmp"):
        return Path("/var/lib/cloudtask")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cloudtask"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(value: str, source: str, path: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(source, path, f"environment variable {name} is not set")
        return os.environ[name]

    return _VAR.sub(sub, value)


def _build(cls: type[Any], raw: Any, source: str, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, path or "(top level)", f"expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(source, where, f"unknown key (expected one of: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        where = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], raw[name], f.metadata, source, where)
    return cls(**values)


def _coerce(hint: Any, value: Any, meta: Any, source: str, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if is_dataclass(hint):
        return _build(hint, value, source, where)  # type: ignore[arg-type]
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list):
            raise ConfigError(source, where, f"expected a list, got {type(value).__name__}")
        item = get_args(hint)[0]
        return tuple(_coerce(item, v, {}, source, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, where, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or (hint is int and int(value) != value):
            kind = "a whole number" if hint is int else "a number"
            raise ConfigError(source, where, f"expected {kind}, got {value!r}")
        lo, hi = meta.get("range", (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(source, where, f"must be between {lo} and {hi}, got {value!r}")
        return hint(value)
    if hint in (str, Secret):
        if not isinstance(value, str):
            raise ConfigError(source, where, f"expected a string, got {value!r}")
        value = _interpolate(value, source, where)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(source, where, f"expected one of {', '.join(choices)}, got {value!r}")
        return Secret(value) if hint is Secret else value
    raise TypeError(f"config field {where} has unsupported type {hint!r}")  # a bug in this module


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config file; None gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    config: Config = _build(Config, raw, source, "")
    return replace(config, source=source)
