"""Configuration: parsed once from YAML into frozen, typed objects.

Every error names the file and the key path (`agents.lease_ttl_s`). Unknown keys are
refused (a typo must not silently fall back to a default). `${VAR}` in a string value is
taken from the environment, so secrets need not live in the file; `Secret` values print as
`<SECRET>` in every repr, log line and error.

Loading goes: read, YAML (duplicate keys refused), types and ranges (`_build`), keys that need
each other (`_check`: what cannot work is an error now, not at the first cloud call), then
warnings for what works but is probably a mistake (`Config.warnings`, logged by the daemon) —
secrets written in a file others can read among them. docs/configuration.md lists every error.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

import yaml

from cloudtask_wire.messages import TASK_FRAME_MARGIN_BYTES, frame_limit_for
from cloudtaskd import redact
from cloudtaskd.configtypes import NO_SECRET
from cloudtaskd.configtypes import ConfigWarning as ConfigWarning  # re-exported: part of this module's interface
from cloudtaskd.configtypes import Secret as Secret  # re-exported, as above
from cloudtaskd.configtypes import bounds as _range
from cloudtaskd.configtypes import num as _num
from cloudtaskd.core.taskfile import DEFAULT_MAX_TASK_BYTES
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers import registry
from cloudtaskd.fleet.providers.descriptors import Section

DEFAULT_LEASE_TTL_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF_S = 2.0
DEFAULT_RETRY_BACKOFF_MAX_S = 300.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
MAX_FRAME_BYTES = 256 * 1024 * 1024
DEFAULT_RECONNECT_GRACE_S = 60.0  # an agent's reconnect backoff tops out at 15 s: four tries
DEFAULT_RUN_ATTACH_TTL_S = 15.0  # a run renews every 5 s: three renewals missed before its job is held
DEFAULT_EXTERNAL_CONNECT_TIMEOUT_S = 3600.0


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
    # Requests each client (a TCP peer address, a unix-socket peer's uid) may make per second,
    # with bursts up to rate_burst; more are answered 429 with Retry-After (cloudtaskctl waits).
    rate_limit_per_s: float = field(default=100.0, metadata=_range(0.1, 1e6))
    rate_burst: int = field(default=200, metadata=_range(1, 1_000_000))
    # A `cloudtaskctl run` attached to this daemon that has not been heard from this long is gone: its
    # unfinished job is held (paused, never leased) until the same run is started again or it is
    # resumed by hand (cloudtaskd/http/runs.py). A run renews its attachment every third of this.
    run_attach_ttl_s: float = field(default=DEFAULT_RUN_ATTACH_TTL_S, metadata=_range(1, 3600))


@dataclass(frozen=True)
class AgentsConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = field(default=0, metadata=_range(0, 65535))  # 0 = any free port
    # Address agents dial; empty = ws://<listen_host>:<port>/v1/agent
    public_url: str = ""
    # Every replica's agent URL (docs/replicas.md): the agents this daemon starts are given this
    # daemon's own URL first, then these; they move to another when their session ends. Empty:
    # this daemon's URL alone. Agents behind SSH tunnels are given their tunnel only.
    urls: tuple[str, ...] = ()
    # The largest websocket frame, each way, in bytes: what the daemon reads from an agent, and what the
    # agents it starts read from it. 0: follows queue.max_task_bytes (max(4 MiB, max_task_bytes +
    # 8 KiB)), so that every accepted task can be delivered; Config resolves it, code never sees 0.
    max_message_bytes: int = field(default=0, metadata=_range(0, MAX_FRAME_BYTES))
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
    # An instance registered by hand (POST /v1/instances) whose agent has not connected this long
    # after registering is ended and its token revoked: a token nobody used must not stay valid for
    # ever. No 0/"never": the bound is the point.
    external_connect_timeout_s: float = field(default=DEFAULT_EXTERNAL_CONNECT_TIMEOUT_S,
                                              metadata=_range(1, 30 * 86400))
    # A running instance whose agent has had no connection for this long (after a daemon restart, its
    # agent never came back; or it went silent) is lost: its leases go back to the queue at once and a
    # replacement may start. No 0/"never": an instance nobody hears from must not hold the fleet.
    reconnect_grace_s: float = field(default=DEFAULT_RECONNECT_GRACE_S, metadata=_range(1, 86400))

    def dial_urls(self, own: str) -> tuple[str, ...]:
        """What an agent this daemon starts is given: its own agent URL first (its agents spread
        over the replicas that started them), then every other replica's from `urls`."""
        return (own, *(url for url in self.urls if url != own))


@dataclass(frozen=True)
class QueueConfig:
    max_attempts: int = field(default=DEFAULT_MAX_ATTEMPTS, metadata=_range(1, 100))
    retry_backoff_s: float = field(default=DEFAULT_RETRY_BACKOFF_S, metadata=_range(0, 86400))
    retry_backoff_max_s: float = field(default=DEFAULT_RETRY_BACKOFF_MAX_S, metadata=_range(0, 86400))
    # Per-task timeout when neither the task nor cloudtask.yaml gives one; 0 = none
    task_timeout_s: float = field(default=0.0, metadata=_range(0, 7 * 86400))
    # The largest task an upload accepts, in bytes: its line (or array element) in the task file, and
    # its data as stored. agents.max_message_bytes follows it.
    max_task_bytes: int = field(default=DEFAULT_MAX_TASK_BYTES,
                                metadata=_range(1024, MAX_FRAME_BYTES - TASK_FRAME_MARGIN_BYTES))


@dataclass(frozen=True)
class WorkersConfig:
    """Worker bundles (POST /v1/workers): what one upload may cost the state disk (agent/bundle.py)."""
    max_upload_bytes: int = field(default=256 * 1024 * 1024, metadata=_range(1024, 16 * 1024**3))
    max_unpacked_bytes: int = field(default=1024**3, metadata=_range(1024, 64 * 1024**3))
    max_files: int = field(default=20_000, metadata=_range(1, 10_000_000))
    max_depth: int = field(default=32, metadata=_range(1, 256))
    # A bundle no job and no live instance uses is removed this long after its upload.
    unused_ttl_s: float = field(default=3600.0, metadata=_range(60, 30 * 86400))


@dataclass(frozen=True)
class EventsConfig:
    """The event log (GET /v1/events, cloudtaskctl events), pruned by the housekeeper. The events that
    record how a task of a job still held finished are its results stream's and stay with the job."""
    max_age_s: float = field(default=7 * 86400.0, metadata=_range(60, 10 * 365 * 86400))
    max_rows: int = field(default=1_000_000, metadata=_range(1000, 10**10))


@dataclass(frozen=True)
class RetentionConfig:
    # A job over (nothing unfinished) this long is deleted with its tasks, results and events; 0: never.
    # Off by default: results are the product's output, and deleting them unasked cannot be undone.
    finished_jobs_s: float = field(default=0.0, metadata=_range(0, 10 * 365 * 86400))
    # Rows per transaction of a cancel, a delete or the event pruning: dispatch runs between chunks.
    chunk_rows: int = field(default=10_000, metadata=_range(100, 1_000_000))
    # How often the event log and finished jobs are looked at.
    interval_s: float = field(default=60.0, metadata=_range(1, 86400))


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


# One section per registered provider (cloudtaskd/fleet/providers/registry.py), each its descriptor's
# typed class (providers/sections/): a new provider brings its section with it, and this module names none of them.
if TYPE_CHECKING:
    @dataclass(frozen=True)
    class ProvidersConfig:  # what mypy sees: the sections are typed where they are read, via descriptor.section
        def __init__(self, **sections: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...
else:
    ProvidersConfig = make_dataclass(
        "ProvidersConfig", [(d.name, d.config, field(default_factory=d.config)) for d in registry.PROVIDERS],
        frozen=True)
    ProvidersConfig.__module__ = __name__  # make_dataclass's own module= is Python 3.12+


def __getattr__(name: str) -> Any:
    """The providers' section classes (LocalProviderConfig, SshHostConfig, ...) by the names they had
    when this module defined them: each now lives in its provider's module in providers/sections/."""
    for d in registry.PROVIDERS:
        found = getattr(sys.modules[d.config.__module__], name, None)
        if name.endswith("Config") and isinstance(found, type):
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Config:
    # Where the database, sockets, worker bundles and logs live; empty = per-user default
    state_dir: str = ""
    # The database: empty or "sqlite" = the embedded SQLite file in state_dir; or a PostgreSQL URL,
    # postgresql://USER:${PGPASSWORD}@HOST:PORT/DBNAME (docs/replicas.md). A Secret: it holds the password.
    database: Secret = field(default=NO_SECRET, metadata={"dsn": True})
    log_level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error")})
    api: ApiConfig = field(default_factory=ApiConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
    # What load_config found that works but is probably a mistake; logged once logging is set up.
    warnings: tuple[ConfigWarning, ...] = field(default=(), metadata={"internal": True})
    # The clouds written in the original spec's form, a top-level `aws:` section rather than
    # providers.aws: messages about them name the keys as the file has them.
    seed_sections: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def __post_init__(self) -> None:
        # agents.max_message_bytes 0 follows the task limit, however the Config was made (a file,
        # defaults, dataclasses.replace in tests): every reader sees the frame limit in force.
        if self.agents.max_message_bytes == 0:
            object.__setattr__(self, "agents", replace(
                self.agents, max_message_bytes=frame_limit_for(self.queue.max_task_bytes)))

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def socket_path(self) -> Path:
        return Path(self.api.socket) if self.api.socket else self.state_path / "cloudtaskd.sock"

    @property
    def postgres(self) -> bool:
        """Does the daemon keep its state in PostgreSQL (`database`) rather than SQLite in state_dir?"""
        return self.database.reveal() not in SQLITE_VALUES

    def with_state_dir(self, path: str | Path) -> Config:
        return replace(self, state_dir=str(path))

    def provider_path(self, cloud: str) -> str:
        """The key path of a cloud's section as the file wrote it: `aws` (seed form) or `providers.aws`."""
        return cloud if cloud in self.seed_sections else f"providers.{cloud}"


def default_state_dir() -> Path:
    """/var/lib/cloudtask for root (the service), else the XDG state home of the user."""
    if os.environ.get("CLOUDTASK_STATE_DIR"):
        return Path(os.environ["CLOUDTASK_STATE_DIR"])
    if os.geteuid() == 0 and not os.environ.get("HOME", "").startswith("/tmp"):
        return Path("/var/lib/cloudtask")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cloudtask"


SQLITE_VALUES = ("", "sqlite")  # `database` values meaning the embedded SQLite file
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A `<<` key merges another mapping in (YAML anchors): its keys are not duplicates of the others.
_MERGE_TAG = "tag:yaml.org,2002:merge"
# The longest wrong value an error quotes: enough to recognise it, short enough for one line.
_SHOWN_CHARS = 60
MIN_API_TOKEN_CHARS = 16
_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):([0-9]{1,5})")
_KINDS = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true/false", "list": "a list",
          "dict": "a mapping", "NoneType": "nothing (an empty value; write \"\" for an empty string)"}


@dataclass
class _Load:
    """One load: the file's name for errors, and what was learned on the way."""

    source: str
    # Key paths of Secret values written in the file itself, i.e. more than ${VAR} references.
    literal_secrets: list[str] = field(default_factory=list)


class _Loader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping: PyYAML would keep the last one silently,
    so a second `aws:` section would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _got(value: Any, secret: bool = False) -> str:
    """A wrong value as an error shows it: its kind, and the value itself unless it is a secret."""
    kind = _KINDS.get(type(value).__name__, type(value).__name__)
    if secret or value is None:
        return kind
    return f"{kind} {value!r:.{_SHOWN_CHARS}}"


def _interpolate(value: str, ctx: _Load, path: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(ctx.source, path, f"environment variable {name} is not set")
        return os.environ[name]

    return _VAR.sub(sub, value)


def _build(cls: type[Any], raw: Any, ctx: _Load, path: str, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass from a mapping. `aliases` are more keys the caller reads itself: accepted here, and
    offered in the unknown-key message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(ctx.source, path or "(top level)", f"expected a mapping, got {_got(raw)}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    accepted = [*known, *aliases]
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(ctx.source, path or "(top level)", f"keys must be names, got {_got(key)}")
        if key not in accepted:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, accepted, n=1)
            guess = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(ctx.source, where, f"unknown key ({guess}expected one of: {', '.join(sorted(accepted))})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        where = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], raw[name], f.metadata, ctx, where)
    return cls(**values)


# The original spec's form: a top-level section per cloud, which enables it (the clouds whose
# descriptors say seed_section). Each is read as the providers.<cloud> section it stands for, with
# every key that one accepts (the spec's own keys are a subset of them), and errors name the keys as
# written (`aws.region`).
SEED_SECTIONS = registry.seed_sections()


def _build_config(raw: Any, ctx: _Load) -> Config:
    """The whole file: Config's own keys, then any seed-form cloud sections folded into providers."""
    seeds = {k: raw[k] for k in SEED_SECTIONS if k in raw} if isinstance(raw, dict) else {}
    rest = {k: v for k, v in raw.items() if k not in seeds} if seeds else raw
    config: Config = _build(Config, rest, ctx, "", aliases=SEED_SECTIONS)
    if not seeds:
        return config
    written = rest.get("providers")
    clouds: dict[str, Any] = {}  # name -> that cloud's own config class: keyword arguments of replace()
    for name, section in seeds.items():
        if isinstance(written, dict) and name in written:
            # Two sections for one cloud: merging them would hide which value wins.
            raise ConfigError(ctx.source, name, f"the {name} cloud is configured twice, as the top-level {name} "
                                                f"section and as providers.{name}: keep one of them")
        if isinstance(section, dict) and "enabled" not in section:
            section = {"enabled": True, **section}
        elif section is None:
            section = {"enabled": True}
        clouds[name] = _build(registry.get(name).config, section, ctx, name)
    return replace(config, providers=replace(config.providers, **clouds), seed_sections=tuple(seeds))


def _coerce(hint: Any, value: Any, meta: Any, ctx: _Load, where: str) -> Any:
    source = ctx.source
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if is_dataclass(hint):
        return _build(hint, value, ctx, where)  # type: ignore[arg-type]
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list):
            raise ConfigError(source, where, f"expected a list, got {_got(value)}")
        item = get_args(hint)[0]
        return tuple(_coerce(item, v, {}, ctx, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, where, f"expected true or false, got {_got(value)}")
        return value
    if hint in (int, float):
        kind = "a whole number" if hint is int else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, where, f"expected {kind}, got {_got(value)}")
        if not math.isfinite(value):  # .nan would pass every range check, .inf fails int()
            raise ConfigError(source, where, f"expected a finite number, got {value!r}")
        if hint is int and int(value) != value:
            raise ConfigError(source, where, f"expected {kind}, got {_got(value)}")
        lo, hi = meta.get("range", (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f"between {_num(lo)} and {_num(hi)}" if lo is not None and hi is not None
                      else f"at least {_num(lo)}" if lo is not None else f"at most {_num(hi)}")
            raise ConfigError(source, where, f"must be {bounds}, got {value!r}")
        return hint(value)
    if hint in (str, Secret):
        secret = hint is Secret
        if not isinstance(value, str):
            quote = " (quote it to make it a string)" if isinstance(value, int | float) else ""
            raise ConfigError(source, where, f"expected a string, got {_got(value, secret)}{quote}")
        written = _dsn_password(value) if meta.get("dsn") else value  # a URL's secret is its password
        if secret and _VAR.sub("", written).strip():
            ctx.literal_secrets.append(where)
        value = _interpolate(value, ctx, where)
        choices = meta.get("choices")
        if choices and value not in choices:
            shown = ", ".join(c or '""' for c in choices)
            raise ConfigError(source, where, f"expected one of {shown}, got {value!r}")
        return Secret(value) if secret else value
    raise TypeError(f"config field {where} has unsupported type {hint!r}")  # a bug in this module


def secrets_of(obj: Any, path: str = "") -> Iterator[tuple[str, Secret]]:
    """Every Secret in a config (or one of its parts), with its key path; empty ones included."""
    if isinstance(obj, Secret):
        yield path, obj
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            yield from secrets_of(item, f"{path}[{i}]")
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            if not f.metadata.get("internal"):
                yield from secrets_of(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)


def _dsn_password(value: str) -> str:
    """The password part of a database URL as written (`${PGPASSWORD}`, a literal, or nothing)."""
    try:
        return urlsplit(value).password or ""
    except ValueError:
        return value  # malformed: _database refuses it; counted as a literal secret meanwhile


def _database(source: str, value: str) -> None:
    """`database`: "sqlite" or a PostgreSQL URL with a host and a database name. Errors show the URL
    with its password as <SECRET>."""
    if value in SQLITE_VALUES:
        return
    form = "postgresql://USER:${PGPASSWORD}@HOST:PORT/DBNAME, or sqlite"
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(source, "database", f"expected {form}; the URL is malformed (a port that is no "
                                              "number?)") from None  # the cause may quote the password
    from cloudtaskd.core.pg.connect import SCHEMES, shown  # psycopg only when PostgreSQL is configured

    if url.scheme not in SCHEMES:
        raise ConfigError(source, "database", f"expected {form}, got a URL with scheme {url.scheme!r} "
                                              f"({shown(value)})")
    if not url.hostname:
        raise ConfigError(source, "database", f"the URL names no host: write {form} (got {shown(value)})")
    if not url.path.strip("/"):
        raise ConfigError(source, "database", f"the URL names no database: write {form} (got {shown(value)}); "
                                              "create it first (docs/replicas.md)")
    if not url.username:
        raise ConfigError(source, "database", f"the URL names no user: write {form} (got {shown(value)})")
    if url.password:
        redact.register(unquote(url.password))  # from now on kept out of every log line and error
        redact.register(url.password)


def _listen_address(source: str, value: str) -> None:
    match = _LISTEN.fullmatch(value)
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(source, "api.listen", "expected host:port with a port from 0 to 65535 (e.g. 127.0.0.1:8443, "
                                                f"0.0.0.0:8443, [::1]:8443), got {value!r}")


def _agent_url(config: Config, key: str, value: str, remote: list[str]) -> None:
    """An address agents dial (agents.public_url, an entry of agents.urls): refused, naming the key,
    when it cannot work."""
    src = config.source
    url = urlsplit(value)
    try:
        url.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        url = url._replace(netloc="")
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise ConfigError(src, key, f"expected a ws:// or wss:// URL with a host (agents dial it), got {value!r}")
    if config.agents.tls and url.scheme != "wss":
        raise ConfigError(src, key, f"agents.tls is on, so agents dial wss://…, got {value!r}")
    if remote and _is_loopback(url.hostname):
        # The agents of machines elsewhere would dial their own loopback and never connect.
        how = ("set the replica's address they can dial" if key.startswith("agents.urls") else
               "set the address they can dial (and agents.listen_host to listen on it), or remove agents.public_url "
               "to have their agents come through the daemon's SSH connections")
        raise ConfigError(src, key, f"{value!r} is a loopback address, which the machines of "
                          f"{config.provider_path(remote[0])} cannot reach: {how}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check(config: Config) -> list[ConfigWarning]:
    """What the types alone cannot say: keys that need each other. Raises ConfigError for what cannot
    work (at load, not minutes later in the reconciler); returns warnings for what works but is
    probably a mistake."""
    src = config.source
    warnings: list[ConfigWarning] = []
    api, agents, queue = config.api, config.agents, config.queue
    _database(src, config.database.reveal())
    sections = [(d, d.section(config.providers)) for d in registry.PROVIDERS]

    if bool(api.tls_cert) != bool(api.tls_key):
        given, missing = ("tls_cert", "tls_key") if api.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(src, f"api.{missing}", f"required with api.{given}: give both (PEM files), or neither "
                                                 "for a certificate from the daemon's own CA")
    if api.listen:
        _listen_address(src, api.listen)
        if not api.token:
            raise ConfigError(src, "api.token", "required with api.listen: TCP clients must send it "
                                                "(put it in the environment: token: ${CLOUDTASK_API_TOKEN})")
        if len(api.token) < MIN_API_TOKEN_CHARS:
            raise ConfigError(src, "api.token", f"must be at least {MIN_API_TOKEN_CHARS} characters, got "
                                                f"{len(api.token)} (e.g. `openssl rand -base64 32`)")
    else:
        unused = tuple(f"api.{k}" for k in ("token", "tls_cert", "tls_key") if getattr(api, k))
        if unused:
            warnings.append(ConfigWarning("config_keys_unused", unused,
                                          f"{', '.join(unused)} only serve api.listen, which is empty"))

    remote = [d.name for d, section in sections if d.remote and d.enabled(section)]
    if agents.public_url:
        _agent_url(config, "agents.public_url", agents.public_url, remote)
    for i, value in enumerate(agents.urls):
        # Remote agents are given agents.urls only when they dial directly (public_url set).
        _agent_url(config, f"agents.urls[{i}]", value, remote if agents.public_url else [])
        if value in agents.urls[:i]:
            first = agents.urls.index(value)
            raise ConfigError(src, f"agents.urls[{i}]", f"{value!r} is listed twice (agents.urls[{first}] too): "
                                                        "list each replica's agent URL once")
    if agents.urls and not agents.public_url and remote:
        warnings.append(ConfigWarning(
            "config_agents_urls_tunnelled", ("agents.urls", "agents.public_url"),
            f"agents.public_url is empty, so the agents of {', '.join(remote)} instances come through this daemon's "
            "SSH tunnels and are given their tunnel only, not agents.urls: set agents.public_url to have them dial "
            "the replicas directly"))
    if not agents.tls and not _is_loopback(agents.listen_host):
        warnings.append(ConfigWarning(
            "config_agents_plaintext", ("agents.tls", "agents.listen_host"),
            f"agents.tls is off and agents listen on {agents.listen_host}: agent tokens and task data cross "
            "the network unencrypted"))

    needed = queue.max_task_bytes + TASK_FRAME_MARGIN_BYTES
    if agents.max_message_bytes < needed:
        raise ConfigError(src, "agents.max_message_bytes", f"must be at least queue.max_task_bytes + "
                                                           f"{TASK_FRAME_MARGIN_BYTES} ({needed}), so that every task "
                                                           f"an upload accepts can be delivered to an agent; got "
                                                           f"{agents.max_message_bytes} (leave it out to follow "
                                                           "queue.max_task_bytes)")

    if queue.retry_backoff_max_s < queue.retry_backoff_s:
        raise ConfigError(src, "queue.retry_backoff_max_s", "must be at least queue.retry_backoff_s "
                                                            f"({_num(queue.retry_backoff_s)}), got "
                                                            f"{_num(queue.retry_backoff_max_s)}")

    for d, section in sections:  # each provider's own keys that need each other, named as the file has them
        at = config.provider_path(d.name)
        warnings += d.validate(section, Section(source=src, at=at, seed=d.name in config.seed_sections,
                                                interruption_sources=registry.interruption_sources()))

    can_launch = any(d.launches(section) for d, section in sections)
    if config.scaling.max_instances == 0 or not can_launch:
        warnings.append(ConfigWarning(
            "config_no_instances", ("scaling.max_instances", "providers"),
            "no instance can ever start (scaling.max_instances is 0 or no provider is enabled): only agents "
            "registered from outside will run tasks"))
    return warnings


def _secrets_readable(source: str, st: os.stat_result, keys: list[str]) -> ConfigWarning | None:
    """A warning when secrets are written in a file that others can read.

    The rule: others (o+r) may never read such a file; its group may, only when that group is the
    daemon's own (effective) group. The service layout is root:cloudtask mode 0640: the daemon, user
    cloudtask, reads the file through its group, and nobody else can. The same mode with another
    group (root:users 0640), or a daemon running as root, lets that group's members read the secrets.
    """
    others = bool(st.st_mode & 0o004)
    group = bool(st.st_mode & 0o040) and st.st_gid != os.getegid()
    if not keys or not (others or group):
        return None
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    who = "every user" if others else f"group {st.st_gid}"
    return ConfigWarning(
        "config_secrets_readable", tuple(keys),
        f"{source} (mode {mode}) is readable by {who} and holds the secrets {', '.join(keys)}: write them as "
        "${VAR} and set the variables in the environment (systemd: EnvironmentFile= with mode 0600), or "
        "chmod o-r (and g-r unless the file's group is the daemon's own)",
        (("mode", mode),))


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config file; None gives the defaults.

    Every non-empty secret is registered with cloudtaskd.redact, so that it is replaced by <SECRET>
    in every log line and error this process writes, whoever wrote it.
    """
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror}") from exc
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, f"line {line}", "not UTF-8 text") from exc
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data, never objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}{column}") from exc
    ctx = _Load(source)
    config = replace(_build_config(raw, ctx), source=source)
    for key, value in secrets_of(config):
        if key == "database":
            continue  # its password is registered by _check (the rest of the URL is no secret)
        redact.register(value.reveal())
    warnings = _check(config)
    readable = _secrets_readable(source, st, ctx.literal_secrets)
    if readable is not None:
        warnings.insert(0, readable)
    return replace(config, warnings=tuple(warnings))
