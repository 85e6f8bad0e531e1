"""agent/failover.py: the order the daemon URLs are tried in, the staggered dial, and an agent given
two scripted daemons moving from one to the other with its leases listed in the hello."""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from agent.connection import Agent
from agent.failover import NoneAnswered, UrlRing, dial_first, parse_urls
from cloudtask_wire.messages import Grant, Hello, LeaseRequest
from cloudtask_wire.workerspec import WorkerSpec
from tests.procs import free_port
from tests.unit.agent.test_connection import CMD_DIR, WAIT_S, ScriptedDaemon, hang, poll

A, B, C = "ws://a:1/v1/agent", "ws://b:1/v1/agent", "ws://c:1/v1/agent"


# ---- the URL list ----

def test_parse_urls_takes_flags_commas_and_lines_once_each_in_order() -> None:
    assert parse_urls([A, f"{B},{C}", f" {A} \n{C}\n", ""]) == [A, B, C]


def test_ring_tries_in_order_and_after_a_lost_session_the_others_first() -> None:
    ring = UrlRing([A, B, C])
    assert ring.order() == [A, B, C]
    ring.lost(A)
    assert ring.order() == [B, C, A]
    ring.lost(C)
    assert ring.order() == [A, B, C]
    ring.lost("ws://gone:1/v1/agent")  # no longer listed: the order stays
    assert ring.order() == [A, B, C]


def test_ring_replaced_keeps_the_url_tried_first_when_still_listed() -> None:
    ring = UrlRing([A, B])
    ring.lost(A)
    assert ring.replace([C, B]) is True
    assert ring.order() == [B, C]
    assert ring.replace([C, B]) is False
    assert ring.replace([A]) is True and ring.order() == [A]  # B gone: the new list from its start


def test_ring_refuses_no_url() -> None:
    with pytest.raises(ValueError, match="no daemon URL"):
        UrlRing([" , "])


# ---- the staggered dial ----

class Dials:
    """Fake dials: each URL fails, hangs or answers as told; records what was dialled and cancelled."""

    def __init__(self, plan: dict[str, str], release: asyncio.Event | None = None) -> None:
        self.plan = plan
        self.release = release or asyncio.Event()
        self.dialled: list[str] = []
        self.cancelled: list[str] = []
        self.closed: list[str] = []

    async def dial(self, url: str) -> str:
        self.dialled.append(url)
        what = self.plan[url]
        try:
            if what == "fail":
                raise ConnectionRefusedError(f"refused: {url}")
            if what == "hang":
                await asyncio.Event().wait()
            if what == "slow":
                await self.release.wait()
            return f"conn:{url}"
        except asyncio.CancelledError:
            self.cancelled.append(url)
            raise

    async def close(self, conn: str) -> None:
        self.closed.append(conn)


async def test_a_url_that_hangs_does_not_stall_the_next() -> None:
    dials = Dials({A: "hang", B: "ok"})
    url, conn = await asyncio.wait_for(dial_first([A, B], dials.dial, close=dials.close, stagger_s=0.05), WAIT_S)
    assert (url, conn) == (B, f"conn:{B}")
    assert dials.cancelled == [A], "the dial still hanging is cancelled once another answered"


async def test_a_failed_url_hands_over_at_once_without_waiting_the_stagger() -> None:
    dials = Dials({A: "fail", B: "fail", C: "ok"})
    # A stagger far beyond the deadline: only a failure may start the next dial.
    url, _ = await asyncio.wait_for(dial_first([A, B, C], dials.dial, close=dials.close, stagger_s=3600), WAIT_S)
    assert url == C and dials.dialled == [A, B, C]


async def test_every_url_failed_names_each_in_the_order_dialled() -> None:
    dials = Dials({A: "fail", B: "fail"})
    with pytest.raises(NoneAnswered) as err:
        await dial_first([A, B], dials.dial, close=dials.close, stagger_s=0.05)
    assert [url for url, _ in err.value.errors] == [A, B]
    assert isinstance(err.value, OSError), "the connection loop's retry catches it as a network error"
    assert A in str(err.value) and B in str(err.value)


async def test_a_bad_url_is_that_urls_failure_only() -> None:
    async def dial(url: str) -> str:
        if url == A:
            raise ValueError("not a URL")
        return url

    async def close(conn: str) -> None:
        pass

    assert (await dial_first([A, B], dial, close=close, stagger_s=3600))[0] == B


async def test_two_answering_at_once_keep_the_first_dialled_and_close_the_other() -> None:
    dials = Dials({A: "slow", B: "slow"})
    run = asyncio.ensure_future(dial_first([A, B], dials.dial, close=dials.close, stagger_s=0.01))
    await poll(lambda: dials.dialled == [A, B], "both dialled")
    dials.release.set()
    assert await asyncio.wait_for(run, WAIT_S) == (A, f"conn:{A}")
    assert dials.closed == [f"conn:{B}"]


async def test_cancelled_dial_first_cancels_its_dials() -> None:
    dials = Dials({A: "hang", B: "hang"})
    run = asyncio.ensure_future(dial_first([A, B], dials.dial, close=dials.close, stagger_s=0.01))
    await poll(lambda: dials.dialled == [A, B], "both dialled")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sorted(dials.cancelled) == [A, B]


# ---- an agent between two scripted daemons ----

@asynccontextmanager
async def scripted() -> AsyncIterator[tuple[ScriptedDaemon, web.AppRunner]]:
    daemon = ScriptedDaemon()
    app = web.Application()
    app.router.add_get("/v1/agent", daemon.handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    daemon.url = f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/agent"
    try:
        yield daemon, runner
    finally:
        await runner.cleanup()


def _agent(urls: list[str], slots: int = 1) -> tuple[Agent, asyncio.Task[int]]:
    spec = WorkerSpec(mode="command", command=f"{shlex.quote(sys.executable)} worker.py")
    agent = Agent(urls, "inst-1", "tok-1", CMD_DIR, slots, spec=spec, prefetch=0)
    return agent, asyncio.get_running_loop().create_task(agent.run(), name="agent")


async def _stop(agent: Agent, task: asyncio.Task[int]) -> None:
    agent.done.set()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT_S)


async def test_an_agent_given_a_dead_url_first_connects_to_the_live_one() -> None:
    dead = f"ws://127.0.0.1:{free_port()}/v1/agent"  # nothing listens: refused
    async with scripted() as (live, _):
        agent, task = _agent([dead, live.url])
        try:
            conn = await live.accept()
            await conn.welcome()
            assert (await conn.next(LeaseRequest)).n == 1
            assert agent.url == live.url
        finally:
            await _stop(agent, task)


async def test_a_lost_session_moves_to_the_other_daemon_holding_its_leases(tmp_path: Path) -> None:
    async with scripted() as (first, first_runner), scripted() as (second, _):
        agent, task = _agent([first.url, second.url])
        try:
            conn = await first.accept()
            await conn.welcome()
            await conn.next(LeaseRequest)
            marker = tmp_path / "started"
            await conn.send(Grant([hang(5, marker, token=3)]))
            await poll(marker.exists, "the task to start")
            # The first daemon goes away for good (its listener too): the agent must not wait for it.
            await first_runner.cleanup()
            moved = await second.accept()
            hello = await moved.next(Hello)
            assert hello.held == [(5, 3)], "the lease held is listed so the other replica reclaims it"
            assert agent.held and 5 in agent.held, "the running task was kept through the move"
        finally:
            await _stop(agent, task)

