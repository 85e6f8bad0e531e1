"""cloudtaskctl against a busy daemon (issue 13): 429/503 with Retry-After are waited out, cut streams
resume from their cursor, and a daemon too busy to accept is reported busy, never down. A small aiohttp
server on a unix socket plays the daemon."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloudtaskd.ctl import client as client_mod
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.commands import follow_results
from cloudtaskd.ctl.main import main
from cloudtaskd.ctl.run import _write_results
from cloudtaskd.errors import Busy, DaemonBusy
from cloudtaskd.http.api import errors_middleware


def line(task: int, **extra: Any) -> bytes:
    return json.dumps({"id": f"t{task}", "status": "succeeded", "result": task, "task": task, **extra}).encode() + b"\n"


class Busyish:
    """Refuses the first `refuse` requests of each path (429, then 503 from Busy), then answers."""

    def __init__(self, refuse: int = 2) -> None:
        self.refuse = refuse
        self.seen: dict[str, list[dict[str, str]]] = {}
        self.bodies: list[int] = []

    def _refuse(self, request: web.Request) -> None:
        calls = self.seen.setdefault(request.path, [])
        calls.append(dict(request.query))
        if len(calls) > self.refuse:
            return
        if len(calls) % 2:
            raise web.HTTPTooManyRequests(headers={"Retry-After": "0"}, text="too many requests; try again in 0.00 s")
        raise Busy("cloudtaskd is busy", retry_after_s=0.0)

    async def results(self, request: web.Request) -> web.StreamResponse:
        self._refuse(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        after = int(request.query.get("after", 0))
        if request.query.get("follow"):
            cursor = int(request.query["cursor"])
            todo = [t for t in range(1, 6) if 100 + t > cursor]
            for t in todo[:2]:
                await resp.write(line(t, seq=100 + t))
            if len(todo) > 2:  # cut mid-stream: no clean end
                assert request.transport is not None
                request.transport.close()
                return resp
        else:
            todo = [t for t in range(1, 6) if t > after]
            for t in todo[:3]:
                await resp.write(line(t))
            if len(todo) > 3:
                assert request.transport is not None
                request.transport.close()
                return resp
        await resp.write_eof()
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._refuse(request)
        self.bodies.append(len(body))
        return web.json_response({"accepted": 3})

    async def job(self, request: web.Request) -> web.Response:
        self._refuse(request)
        return web.json_response({"id": 1, "name": "j", "state": "active", "done": True, "counts": {"total": 1}})


@pytest.fixture
async def busy(tmp_path: Path) -> AsyncIterator[tuple[Busyish, Path]]:
    fake = Busyish()
    app = web.Application(middlewares=[errors_middleware])
    app.add_routes([web.get("/v1/jobs/{job}/results", fake.results), web.post("/v1/jobs/{job}/tasks", fake.upload),
                    web.get("/v1/jobs/{job}", fake.job)])
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "busy.sock"
    await web.UnixSite(runner, str(sock)).start()
    yield fake, sock
    await runner.cleanup()


async def test_results_ride_out_429_and_503_and_resume_a_cut_stream(busy: tuple[Busyish, Path],
                                                                    tmp_path: Path) -> None:
    fake, sock = busy
    async with ApiClient(sock) as api:
        got = [r["task"] async for r in api.results(1)]
    assert got == [1, 2, 3, 4, 5]  # the cut after 3 is resumed with after=3: nothing twice, nothing lost
    assert [q.get("after") for q in fake.seen["/v1/jobs/1/results"]] == [None, None, None, "3"]


async def test_run_writes_its_results_through_429s(busy: tuple[Busyish, Path], tmp_path: Path) -> None:
    _, sock = busy
    out = tmp_path / "results.jsonl"
    async with ApiClient(sock) as api:
        assert await _write_results(api, 1, out) == 5
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [f"t{i}" for i in range(1, 6)]


async def test_follow_resumes_from_its_cursor(busy: tuple[Busyish, Path]) -> None:
    fake, sock = busy
    seen: list[dict[str, Any]] = []
    async with ApiClient(sock) as api:
        await follow_results(api, 1, seen.append)
    assert [r["task"] for r in seen] == [1, 2, 3, 4, 5]
    assert all("seq" not in r for r in seen)
    follows = [q for q in fake.seen["/v1/jobs/1/results"] if q.get("follow")]
    assert [q["cursor"] for q in follows] == ["0", "0", "0", "102", "104"]


async def test_a_streamed_upload_is_sent_again_after_429(busy: tuple[Busyish, Path], tmp_path: Path) -> None:
    fake, sock = busy
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n')
    async with ApiClient(sock) as api:
        assert await api.upload_tasks(1, tasks) == 3
    assert fake.bodies == [tasks.stat().st_size]


async def test_a_full_accept_queue_is_busy_not_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "BUSY_BUDGET_S", 1.0)
    path = tmp_path / "full.sock"
    held = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(0)  # never accepted: the queue fills, as a daemon's does when its loop is swamped
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                try:
                    s.connect(str(path))
                except BlockingIOError:
                    s.close()
                    break
                held.append(s)
            async with ApiClient(path) as api:
                with pytest.raises(DaemonBusy, match="busy"):
                    await api.get_job(1)
            out, err = io.StringIO(), io.StringIO()
            code = await asyncio.to_thread(main, ["status", "1", "--socket", str(path)], out=out, err=err)
        finally:
            for s in held:
                s.close()
    assert code == 3
    assert "busy" in err.getvalue() and "not reachable" not in err.getvalue()

