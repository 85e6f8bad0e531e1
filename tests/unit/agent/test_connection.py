"""agent/connection.py against a scripted daemon: a websocket server on 127.0.0.1 that speaks the
wire protocol through cloudtask_wire and does what each test tells it (no cloudtaskd). The agent
runs real worker processes (tests/workers/echo_cmd) on its real Runner."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from agent.connection import Agent
from cloudtask_wire.messages import (
    CREDIT_IN_REPORT,
    DEFAULT_MAX_MESSAGE_BYTES,
    FEATURES,
    Ack,
    AgentMessage,
    Complete,
    DaemonMessage,
    Draining,
    DrainRequest,
    Grant,
    GrantedTask,
    Handback,
    Heartbeat,
    Hello,
    LeaseRequest,
    Revoke,
    Welcome,
    encode,
    parse_agent_message,
)
from cloudtask_wire.workerspec import WorkerSpec
from tests import paths

M = TypeVar("M")
CMD_DIR = paths.WORKERS / "echo_cmd"
WAIT_S = 20.0


class Conn:
    """One agent connection as the scripted daemon sees it."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.inbox: asyncio.Queue[AgentMessage] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def send(self, msg: DaemonMessage) -> None:
        await self.ws.send_str(encode(msg))

    async def next(self, kind: type[M], *, skip: tuple[type, ...] = (Heartbeat,)) -> M:
        """The next message, which must be a `kind` (messages of the `skip` types are passed over)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for a {kind.__name__}")
            msg = await asyncio.wait_for(self.inbox.get(), left)
            if isinstance(msg, kind):
                return msg
            if not isinstance(msg, skip):
                raise AssertionError(f"expected a {kind.__name__}, got {msg!r}")

    async def welcome(self, *, heartbeat_s: float = 15.0, kept: list[int] | None = None,
                      features: list[str] | None = None) -> Hello:
        hello = await self.next(Hello)
        await self.send(Welcome(30.0, heartbeat_s, kept or [], [], features=features or []))
        return hello


class ScriptedDaemon:
    def __init__(self) -> None:
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.url = ""

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = Conn(ws)
        self.conns.put_nowait(conn)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                conn.inbox.put_nowait(parse_agent_message(msg.data))
        conn.closed.set()
        return ws

    async def accept(self) -> Conn:
        return await asyncio.wait_for(self.conns.get(), WAIT_S)


@pytest.fixture
async def daemon() -> AsyncIterator[ScriptedDaemon]:
    scripted = ScriptedDaemon()
    app = web.Application()
    app.router.add_get("/v1/agent", scripted.handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    scripted.url = f"ws://127.0.0.1:{port}/v1/agent"
    yield scripted
    await runner.cleanup()


Running = tuple[Agent, "asyncio.Task[int]"]


@pytest.fixture
async def start_agent(daemon: ScriptedDaemon) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(slots: int = 1, **kwargs: Any) -> Running:
        spec = WorkerSpec(mode="command", command=f"{shlex.quote(sys.executable)} worker.py")
        agent = Agent(daemon.url, "inst-1", "tok-1", CMD_DIR, slots, spec=spec, **kwargs)
        task = asyncio.get_running_loop().create_task(agent.run(), name="agent")
        started.append((agent, task))
        return agent, task

    yield start
    for agent, task in started:
        agent.done.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT_S)


async def poll(predicate: Callable[[], Any], message: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {message}")
        await asyncio.sleep(0.02)
    return value


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


def echo(task_id: int, value: int, token: int = 1) -> GrantedTask:
    return GrantedTask(task_id, token, f"k{task_id}", {"op": "echo", "value": value}, None)


def hang(task_id: int, marker: Path, token: int = 1) -> GrantedTask:
    return GrantedTask(task_id, token, f"k{task_id}", {"op": "hang", "marker": str(marker)}, None)


async def test_hello_says_who_we_are_and_credit_asks_for_slots_plus_prefetch(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running]) -> None:
    start_agent(slots=2, prefetch=3)
    conn = await daemon.accept()
    hello = await conn.welcome()
    assert (hello.instance, hello.token, hello.slots, hello.held) == ("inst-1", "tok-1", 2, [])
    assert hello.features == list(FEATURES)
    assert hello.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert (await conn.next(LeaseRequest)).n == 2 + 3


async def test_a_grant_runs_on_the_runner_and_is_reported_done_once(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running]) -> None:
    agent, _ = start_agent(slots=1, prefetch=0)
    conn = await daemon.accept()
    await conn.welcome()
    assert (await conn.next(LeaseRequest)).n == 1
    await conn.send(Grant([echo(7, 42, token=9)]))
    done = await conn.next(Complete)
    assert [(r.id, r.token) for r in done.results] == [(7, 9)]
    result = done.results[0].result
    assert result["value"] == 42 and result["id"] == "k7"  # the worker saw the task's key and data
    # the task left our hands: one more credit (a lease frame: the welcome did not grant credit_in_report)
    assert (await conn.next(LeaseRequest)).n == 1
    await conn.send(Ack([7], []))
    await poll(lambda: not agent._unacked, "the ack to be taken")
    assert agent.completed == 1

    # acked means gone: a reconnect resends nothing and the hello holds nothing
    await conn.ws.close()
    again = await daemon.accept()
    hello = await again.welcome()
    assert hello.held == []
    assert (await again.next(LeaseRequest)).n == 1  # a resent report would come before the credit


async def test_credit_rides_in_the_done_frame_when_the_daemon_grants_it(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running]) -> None:
    start_agent(slots=1, prefetch=0)
    conn = await daemon.accept()
    await conn.welcome(features=[CREDIT_IN_REPORT])
    assert (await conn.next(LeaseRequest)).n == 1
    await conn.send(Grant([echo(3, 1)]))
    done = await conn.next(Complete)
    assert [r.id for r in done.results] == [3] and done.n == 1


async def test_an_unacked_report_is_resent_after_a_reconnect_and_its_lease_kept(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running]) -> None:
    agent, _ = start_agent(slots=1, prefetch=0)
    conn = await daemon.accept()
    await conn.welcome()
    await conn.next(LeaseRequest)
    await conn.send(Grant([echo(11, 5, token=4)]))
    first = await conn.next(Complete)
    assert [r.id for r in first.results] == [11]
    await conn.ws.close()  # the daemon goes before it acks: it may never have committed the result

    again = await daemon.accept()
    hello = await again.welcome(kept=[11])
    assert hello.held == [(11, 4)]  # listed, the daemon keeps the lease for the resent report
    resent = await again.next(Complete, skip=(Heartbeat, LeaseRequest))
    assert [(r.id, r.token, r.result["value"]) for r in resent.results] == [(11, 4, 5)]
    await again.send(Ack([11], []))
    await poll(lambda: not agent._unacked and not agent._pending, "the resent report to be acked")
    assert agent.completed == 1  # resent, not run again


async def test_a_revoke_aborts_the_running_task_and_frees_its_slot(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running], tmp_path: Path) -> None:
    agent, _ = start_agent(slots=1, prefetch=0)
    conn = await daemon.accept()
    await conn.welcome()
    await conn.next(LeaseRequest)
    marker = tmp_path / "pids"
    await conn.send(Grant([hang(21, marker)]))
    await poll(marker.exists, "the worker to start")
    pids = [int(p) for p in marker.read_text().split()]
    assert all(alive(p) for p in pids)

    await conn.send(Revoke([21]))
    await poll(lambda: not any(alive(p) for p in pids), "the revoked task's processes to be killed")
    # the slot is back and the revoked task is neither reported nor held
    assert (await conn.next(LeaseRequest)).n == 1
    await poll(lambda: agent.free_slots == [0], "the slot to be free again")
    assert 21 not in agent.held and not agent._pending and not agent._unacked
    await conn.send(Grant([echo(22, 8)]))  # and it runs the next task
    done = await conn.next(Complete)
    assert [r.id for r in done.results] == [22]


async def test_heartbeats_list_the_leases_held(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running], tmp_path: Path) -> None:
    start_agent(slots=1, prefetch=0)
    conn = await daemon.accept()
    await conn.welcome(heartbeat_s=0.1)
    await conn.next(LeaseRequest)
    marker = tmp_path / "pids"
    await conn.send(Grant([hang(31, marker, token=6)]))
    beats = []
    for _ in range(2):  # beats go on while the task runs
        beat = await conn.next(Heartbeat, skip=())
        beats.append(beat.leases)
    assert beats == [[(31, 6)], [(31, 6)]]
    # Revoked before the agent stops: an agent stopped mid-task SIGKILLs its worker but does not wait
    # to reap it, and the unreaped child's ResourceWarning would fail a later test (filterwarnings=error).
    pids = [int(p) for p in marker.read_text().split()]
    await conn.send(Revoke([31]))
    await poll(lambda: not any(alive(p) for p in pids), "the task's processes to be stopped")
    await conn.next(LeaseRequest)  # the slot is free again


async def test_a_drain_hands_back_what_waits_at_once_and_what_runs_at_the_grace(
        daemon: ScriptedDaemon, start_agent: Callable[..., Running], tmp_path: Path) -> None:
    agent, run = start_agent(slots=1, prefetch=1, drain_grace_s=0.5)
    conn = await daemon.accept()
    await conn.welcome()
    assert (await conn.next(LeaseRequest)).n == 2
    marker = tmp_path / "pids"
    await conn.send(Grant([hang(41, marker, token=2), echo(42, 1, token=3)]))
    await poll(marker.exists, "the first task to start")
    pids = [int(p) for p in marker.read_text().split()]

    await conn.send(DrainRequest("scale_down"))
    assert (await conn.next(Draining)).reason == "scale_down"
    waiting = await conn.next(Handback)
    assert (waiting.leases, waiting.reason) == ([(42, 3)], "scale_down")  # not started: back at once
    running = await conn.next(Handback)  # the grace is over: stopped and given back
    assert (running.leases, running.reason) == ([(41, 2)], "scale_down")
    await poll(lambda: not any(alive(p) for p in pids), "the running task's processes to be stopped")
    assert not run.done()
    await conn.send(Ack([41, 42], []))
    assert await asyncio.wait_for(run, WAIT_S) == 0  # drained: the agent exits
    assert agent.completed == 0
    # no credit was asked for while draining
    assert all(not isinstance(m, LeaseRequest) for m in _drain(conn.inbox))


def _drain(queue: asyncio.Queue[AgentMessage]) -> list[AgentMessage]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out

