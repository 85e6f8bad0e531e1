"""What a provider's `cloudtaskctl check` answers: one line per thing looked at (credentials, an
instance type, a quota), each ok, warn or FAIL with what to fix. Below the providers, so that they and
cloudtaskd/fleet/check.py both stand on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "FAIL"]


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
