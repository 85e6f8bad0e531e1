"""What a config reload (SIGHUP) may change while the daemon runs, and what waits for a restart.

Pure: `plan(old, new, providers)` compares two configs key by key and returns the config to run
with — the old one with only the live-safe changes taken from the new — and the key paths on each
side. Everything bound at start (listeners, the state directory, provider objects and their
credentials) keeps its old value: changing it under a running daemon would leave sockets, agents
or cloud clients behind that the new value no longer describes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from cloudtask_wire.messages import TASK_FRAME_MARGIN_BYTES
from cloudtaskd.config import Config

# Key paths (a prefix ending in "." covers a whole section) that take effect without a restart,
# each with who reads it again.
LIVE_KEYS = (
    "log_level",  # logging is configured again
    "scaling.",  # the reconciler reads config.scaling at every tick
    "workers.",  # the bundle store reads its caps at each upload and prune
    "events.",  # the housekeeper reads them at each pruning
    "retention.",  # the housekeeper reads them at each chunk and sweep
    "queue.",  # retry backoff: the dispatcher's next round; max_attempts, task_timeout_s: new jobs;
    # max_task_bytes: the next upload (only while it fits the agents' frame limit in force, see plan)
    "agents.lease_batch_max",  # the dispatcher's next round
    "agents.max_connections_per_instance",  # checked at each new connection
    "agents.max_messages_per_s",  # a new connection's rate; connected agents keep theirs
    "agents.external_connect_timeout_s",  # the reconciler's next tick
    "agents.reconnect_grace_s",  # the reconciler's next tick
)


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # the old config with the applied changes
    applied: tuple[str, ...]  # key paths now in force
    needs_restart: tuple[str, ...]  # changed key paths that keep their old value until a restart
    reasons: dict[str, str]  # key path -> why it waits for a restart, where that is not obvious


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ; a list (ssh hosts) counts as one value."""
    out: list[str] = []
    for f in fields(old):
        if f.metadata.get("internal"):
            continue  # the file's name and its load-time warnings, not settings
        path = f"{prefix}{f.name}"
        a, b = getattr(old, f.name), getattr(new, f.name)
        if is_dataclass(a) and is_dataclass(b) and type(a) is type(b):
            out += changed_keys(a, b, f"{path}.")
        elif a != b:
            out.append(path)
    return out


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _with(obj: Any, path: str, value: Any) -> Any:
    """A copy of the frozen dataclass tree obj with the value at path replaced."""
    head, _, rest = path.partition(".")
    if not rest:
        return replace(obj, **{head: value})
    return replace(obj, **{head: _with(getattr(obj, head), rest, value)})


def plan(old: Config, new: Config, providers: dict[str, int]) -> ReloadPlan:
    """providers: the running providers by name with their instance limits (the reconciler's), whose
    max_instances may change live. A provider that is not running needs a restart to start."""
    config = old
    applied: list[str] = []
    restart: list[str] = []
    reasons: dict[str, str] = {}
    for key in changed_keys(old, new):
        live = any(key == k or (k.endswith(".") and key.startswith(k)) for k in LIVE_KEYS)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "providers" and parts[2] == "max_instances":
            live = parts[1] in providers
            if not live:
                reasons[key] = f"the {parts[1]} provider is not running; it starts with the daemon"
        elif key == "agents.lease_ttl_s":
            # Connected agents heartbeat at the old lease_ttl_s / 4 they were told at connect: a
            # shorter lease would expire between their heartbeats. A longer one is safe.
            live = new.agents.lease_ttl_s >= old.agents.lease_ttl_s
            if not live:
                reasons[key] = "a shorter lease needs connected agents to reconnect (they heartbeat at the old pace)"
        elif key == "queue.max_task_bytes":
            # Agents read frames up to the limit they were started with (agents.max_message_bytes waits
            # for a restart): a task bigger than that could be accepted but never delivered.
            live = new.queue.max_task_bytes + TASK_FRAME_MARGIN_BYTES <= config.agents.max_message_bytes
            if not live:
                reasons[key] = (f"agents read frames of at most {config.agents.max_message_bytes} bytes until a "
                                "restart, too small for tasks of this size")
        elif len(parts) == 3 and parts[0] == "providers" and parts[2] == "ssh_key_file":
            # Not re-checked here: the provider keeps logging in with the key it started with, and its
            # VMs carry that key's public half. The restart checks the new key against the replicas'.
            reasons[key] = ("the provider logs in to its VMs with the key it started with until a restart; on "
                            "PostgreSQL every replica must use the same key, which the restart checks "
                            "(docs/replicas.md, One SSH key for the clouds' VMs)")
        elif key == "database":
            reasons[key] = ("the daemon's state lives in that database: restart needed (the new database does not "
                            "hold this one's jobs; nothing is copied over)")
        if live:
            config = _with(config, key, _get(new, key))
            applied.append(key)
        else:
            restart.append(key)
    return ReloadPlan(config, tuple(applied), tuple(restart), reasons)
