"""Python-mode test worker: `handle` (sync, runs in a thread) and `ahandle` (async, on the agent's loop)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

release = threading.Event()  # lets a test end a hanging sync call
started: list[str] = []  # task ids that began, for tests to poll


class PermanentFailure(Exception):
    """Same name as the agent's class: recognised without importing the agent."""


def _common(task_id: str, data: dict[str, Any]) -> Any:
    op = data.get("op", "echo")
    if op == "echo":
        return {"id": task_id, "value": data.get("value"), "thread": threading.current_thread().name}
    if op == "fail":
        raise ValueError(f"bad value {data.get('value')!r}")
    if op == "permanent_own":
        raise PermanentFailure("cannot process this input")
    if op == "permanent_agent":
        from agent.runner import PermanentFailure as AgentPermanentFailure

        raise AgentPermanentFailure("rejected by the agent's class")
    if op == "not_json":
        return {"value": object()}
    return None


def handle(task_id: str, data: dict[str, Any]) -> Any:
    if data.get("op") == "hang":
        started.append(task_id)
        release.wait(data.get("max_s", 30))
        return "released"
    return _common(task_id, data)


async def ahandle(task_id: str, data: dict[str, Any]) -> Any:
    if data.get("op") == "hang":
        started.append(task_id)
        await asyncio.sleep(3600)
    if data.get("op") == "swallow_cancel":
        started.append(task_id)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "swallowed"
    return _common(task_id, data)


async def noop(task_id: str, data: Any) -> Any:
    return data
