"""The building blocks of a typed config section, shared by config.py and the providers' own sections.

A leaf module: each provider's section (cloudtaskd/fleet/providers/sections/) is defined with these
without importing config.py, which builds `providers:` from the registry of descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudtaskd.errors import ConfigError


class Secret(str):
    """A string that never shows itself in repr/str formatting of containers or logs."""

    def __repr__(self) -> str:
        return "<SECRET>"

    def reveal(self) -> str:
        return str.__str__(self)


NO_SECRET = Secret("")


def bounds(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """A number field's metadata: the loader refuses values outside [lo, hi], naming the key."""
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class ConfigWarning:
    """A config that loads and works but is probably a mistake. Never carries a secret's value."""

    event: str  # stable snake_case: the log event (config_secrets_readable)
    keys: tuple[str, ...]  # the key paths concerned
    message: str  # what, and what to do
    extra: tuple[tuple[str, str], ...] = ()  # more log fields (the file's mode)


def num(x: float) -> str:
    """A number as an error shows it: 3, not 3.0."""
    return str(int(x)) if float(x).is_integer() else str(x)


def together(source: str, prefix: str, enabled: bool, keys: dict[str, str], otherwise: str) -> None:
    """Keys that only work as a set: all given, or none."""
    given = [k for k, v in keys.items() if v]
    if enabled and 0 < len(given) < len(keys):
        missing = [k for k in keys if k not in given]
        raise ConfigError(source, f"{prefix}.{missing[0]}",
                          f"required with {', '.join(f'{prefix}.{k}' for k in given)}: give "
                          f"{', '.join(keys)} together{otherwise}")
