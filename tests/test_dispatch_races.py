"""Races between the dispatcher's rounds and agents reconnecting (found in review, kept as tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.protocol import Handback, parse_agent_message
from cloudtaskd.dispatch import Dispatcher, Session
from cloudtaskd.store import Store
from tests.conftest import make_config
from tests.test_queue import submit


async def test_a_round_never_grants_to_a_connection_a_newer_hello_replaced(store: Store, tmp_path: Path) -> None:
    """A round picks the old connection (it has credit), waits for the writer; meanwhile the
    agent's new connection says hello (reclaim) and is attached. The grant must not go out on the
    old connection, where it would strand the tasks until their lease expired."""
    await submit(store, 2, max_attempts=1)
    d = Dispatcher(store, make_config(tmp_path, lease_ttl_s=30.0))
    old_frames: list[str] = []
    new_frames: list[str] = []
    old = Session("inst-1", 1, 2, old_frames.append)
    d.attach(old)
    old.credit = 2
    hello = asyncio.create_task(d.reclaim("inst-1", []))
    rnd = asyncio.create_task(d.round())  # chooses `old`, then waits for the writer behind the reclaim
    await hello
    new = Session("inst-1", 1, 2, new_frames.append)
    d.attach(new)
    await rnd
    assert not any('"t":"grant"' in f for f in old_frames)
    new.credit = 2
    await d.round()
    grants = [f for f in new_frames if '"t":"grant"' in f]
    assert len(grants) == 1 and grants[0].count('"token"') == 2  # both tasks reach the live connection
    rows = await store.fetchall("SELECT state, failures FROM tasks")
    assert [(r["state"], r["failures"]) for r in rows] == [("leased", 0), ("leased", 0)]


async def test_a_report_that_breaks_a_round_does_not_stop_the_dispatcher(store: Store, tmp_path: Path) -> None:
    """A hand-back naming a task id SQLite cannot hold raised out of the round and ended the
    dispatcher (and with it the daemon). The parser now refuses such ids; and should anything
    else raise in a round, that round is dropped and the next ones run."""
    await submit(store, 1)
    d = Dispatcher(store, make_config(tmp_path))
    frames: list[str] = []
    s = Session("inst-1", 1, 1, frames.append)
    d.attach(s)
    d.handle(s, Handback([(2**63, 1)], "x"))  # past the parser (which now refuses it): a round that raises
    task = asyncio.create_task(d.run())
    try:
        d.handle(s, parse_agent_message('{"t":"lease","n":1}'))
        d._wake.set()
        for _ in range(200):
            if any('"t":"grant"' in f for f in frames):
                break
            await asyncio.sleep(0.05)
        assert not task.done()
        assert any('"t":"grant"' in f for f in frames)  # a later round still serves the agent
    finally:
        task.cancel()


def test_lease_references_out_of_range_are_refused_by_the_parser() -> None:
    import pytest

    from agent.protocol import ProtocolError

    for bad in (2**63, -1):
        with pytest.raises(ProtocolError, match=r"leases\[0\]"):
            parse_agent_message(f'{{"t":"handback","leases":[[{bad},1]],"reason":"x"}}')
