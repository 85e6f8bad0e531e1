"""What an agent's hello lists when it (re)connects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.connection import Agent
from cloudtask_wire.messages import Failure, Returned, Success
from cloudtask_wire.workerspec import WorkerSpec


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
    agent._unacked = {5: Success(5, 2, 1, 0.1)}
    agent._pending = [Failure(6, 1, "x", True, 0.1), Returned(7, 3)]
    ws = CapturingSocket()
    with pytest.raises(aiohttp.ClientError):
        await agent._session(ws)  # type: ignore[arg-type]
    hello = json.loads(ws.sent[0])
    assert hello["t"] == "hello"
    assert hello["max_message_bytes"] == 4 * 1024 * 1024  # the frame limit it reads: grants are packed under it
    assert sorted(map(tuple, hello["held"])) == [(5, 2), (6, 1)]  # a hand-back goes back to the queue anyway


def test_reports_are_packed_into_frames_under_the_limit() -> None:
    from cloudtask_wire.frames import FRAME_OVERHEAD, pack

    items = [json.dumps({"id": i, "token": 1, "result": "x" * 300, "duration_s": 0.1}) for i in range(50)]
    frames = pack('{"t":"done","results":[', items, "]}", 4096)
    assert len(frames) > 1 and all(len(f) <= 4096 - FRAME_OVERHEAD for f in frames)
    ids = [r["id"] for f in frames for r in json.loads(f)["results"]]
    assert ids == list(range(50))  # every report once, in order
    assert pack('{"t":"done","results":[', [], "]}", 4096) == []


async def test_a_result_no_frame_can_carry_fails_permanently_instead_of_looping(tmp_path: Path) -> None:
    """A 5 KB result against a 4 KB message limit: sent as a permanent failure that names the
    sizes (before, the oversized frame closed the connection and was resent after every reconnect)."""
    import asyncio

    spec = WorkerSpec.from_dict({"mode": "python", "function": "w:run"})
    agent = Agent("ws://127.0.0.1:1/v1/agent", "inst-1", "token", tmp_path, 2, spec=spec, max_message_bytes=4096)
    agent._pending = [Success(1, 1, "y" * 5000, 0.1), Success(2, 1, "small", 0.1)]
    ws = CapturingSocket()
    agent._flush_event.set()
    flusher = asyncio.create_task(agent._flush_loop(ws))  # type: ignore[arg-type]
    for _ in range(100):
        if len(ws.sent) >= 2:
            break
        await asyncio.sleep(0.01)
    flusher.cancel()
    frames = [json.loads(f) for f in ws.sent]
    assert all(len(f) <= 4096 for f in ws.sent)
    done = [r for f in frames if f["t"] == "done" for r in f["results"]]
    failed = [r for f in frames if f["t"] == "fail" for r in f["failures"]]
    assert [r["id"] for r in done] == [2]
    assert [(r["id"], r["retryable"]) for r in failed] == [(1, False)]
    assert "over the daemon's message limit" in failed[0]["error"]
    assert isinstance(agent._unacked[1], Failure)  # a resend after a reconnect is the same failure
