"""What an agent's hello lists when it (re)connects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.connection import Agent
from agent.workerspec import WorkerSpec


class CapturingSocket:
    """Takes the hello, then closes before any welcome."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_str(self, data: str) -> None:
        self.sent.append(data)

    async def receive(self, timeout: float | None = None) -> Any:
        return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, None, None)


async def test_tasks_reported_but_not_acknowledged_are_listed_as_held(tmp_path: Path) -> None:
    """Otherwise the daemon requeues a finished task on reconnect and it runs again."""
    (tmp_path / "w.py").write_text("def run(i, d):\n    return d\n")
    spec = WorkerSpec.from_dict({"mode": "python", "function": "w:run"})
    agent = Agent("ws://127.0.0.1:1/v1/agent", "inst-1", "token", tmp_path, 2, spec=spec)
    agent._unacked = {5: {"kind": "done", "id": 5, "token": 2, "result": 1, "duration_s": 0.1}}
    agent._pending = [{"kind": "fail", "id": 6, "token": 1, "error": "x", "retryable": True, "duration_s": 0.1},
                      {"kind": "handback", "id": 7, "token": 3}]
    ws = CapturingSocket()
    with pytest.raises(aiohttp.ClientError):
        await agent._session(ws)  # type: ignore[arg-type]
    hello = json.loads(ws.sent[0])
    assert hello["t"] == "hello"
    assert sorted(map(tuple, hello["held"])) == [(5, 2), (6, 1)]  # a hand-back goes back to the queue anyway
