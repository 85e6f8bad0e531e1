"""The agent's log: one JSON object per line on stdout (the agent ships without structlog)."""

from __future__ import annotations

import time
from typing import Any

from cloudtask_wire import jsonx


def log(event: str, **fields: Any) -> None:
    print(jsonx.dumps({"ts": round(time.time(), 3), "event": event, **fields}), flush=True)
