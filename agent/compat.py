"""What the agent needs from Python 3.10/3.11, on the 3.9 and 3.10 of cloud images.

The agent runs on an instance's own python3 (Debian 11 and Amazon Linux 2023: 3.9; Ubuntu 22.04:
3.10). The daemon imports the same modules on 3.11+, where these are the standard library's own.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from cloudtask_wire.compat import SLOTS  # one definition, shared with the wire's messages

if sys.version_info >= (3, 11):
    from datetime import UTC

    timeout = asyncio.timeout
else:  # exercised on the foreign host's 3.9 (tests/integration/test_foreign_host.py)
    from datetime import timezone

    from async_timeout import timeout  # aiohttp's own dependency below 3.11, in every runtime

    UTC = timezone.utc


def expired(deadline: Any) -> bool:
    """asyncio.Timeout.expired() is a method; async_timeout's `expired` a property."""
    value = deadline.expired
    return bool(value() if callable(value) else value)


def uncancel(task: asyncio.Task[Any] | None) -> int:
    """Withdraw one cancellation request; returns those left. Below 3.11 tasks do not count them:
    0, as if ours were the only one (the agent's own abort is then told from its flag alone)."""
    fn = getattr(task, "uncancel", None)
    return int(fn()) if fn is not None else 0


def cancelling(task: asyncio.Task[Any] | None) -> int:
    fn = getattr(task, "cancelling", None)
    return int(fn()) if fn is not None else 0


__all__ = ["SLOTS", "UTC", "cancelling", "expired", "timeout", "uncancel"]
