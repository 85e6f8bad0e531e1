"""Races between the dispatcher's rounds and agents reconnecting (found in review, kept as tests)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cloudtask_wire.messages import Handback, LeaseRequest, ProtocolError, parse_agent_message
from cloudtaskd.core.dispatch import Dispatcher, Session
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import tasks as queue
from tests.conftest import make_config
from tests.unit.core.test_queue import submit


@pytest.fixture
def store(both_stores: Store) -> Store:
    """Every test here runs on SQLite and on PostgreSQL."""
    return both_stores


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

    from cloudtask_wire.messages import ProtocolError

    for bad in (2**63, -1):
        with pytest.raises(ProtocolError, match=r"leases\[0\]"):
            parse_agent_message(f'{{"t":"handback","leases":[[{bad},1]],"reason":"x"}}')


async def test_every_connection_is_served_in_turn_when_the_round_budget_is_short(store: Store, tmp_path: Path) -> None:
    """Found by benchmarks/scale.py: with 2,000 agents asking for more than one round's budget, the
    rotation moved one connection per round, so those late in the order waited up to 57 s for a
    grant. Now a round starts where the last one's budget ran out: with budget B and N connections
    wanting c each, everyone is served within ceil(N * c / B) rounds. (Agents that were served ask
    again at once, as busy agents with short tasks do.)"""
    await submit(store, 1000, max_attempts=1)
    config = make_config(tmp_path)
    config = replace(config, agents=replace(config.agents, lease_batch_max=8))
    d = Dispatcher(store, config)
    frames: dict[str, list[str]] = {}
    for i in range(20):
        frames[f"inst-{i}"] = []
        s = Session(f"inst-{i}", 1, 2, frames[f"inst-{i}"].append)
        d.attach(s)
        d.handle(s, LeaseRequest(2))
    first_grant: dict[str, int] = {}
    for rnd in range(1, 6):  # 20 connections x 2 credit / 8 per round = 5 rounds
        await d.round()
        for inst, fs in frames.items():
            if any('"t":"grant"' in f for f in fs):
                first_grant.setdefault(inst, rnd)
        for session in d.sessions.values():
            if session.credit == 0:
                d.handle(session, LeaseRequest(2))
    assert sorted(first_grant) == sorted(frames), f"never served: {sorted(set(frames) - set(first_grant))}"
    assert max(first_grant.values()) == 5


async def test_a_heartbeat_then_the_report_in_one_round_revokes_nothing(store: Store, tmp_path: Path) -> None:
    """An agent heartbeats a running task, then the task ends and its report follows; both land in
    one round. Applied report-first, the heartbeat found the task finished and a revoke went out
    for a lease the agent had already given up (seen as stray revokes in benchmarks/scale.py)."""
    await submit(store, 1, max_attempts=1)
    d = Dispatcher(store, make_config(tmp_path))
    frames: list[str] = []
    s = Session("inst-1", 1, 1, frames.append)
    d.attach(s)
    s.credit = 1
    await d.round()
    grant = json.loads(next(f for f in frames if '"t":"grant"' in f))["tasks"][0]
    d.handle(s, parse_agent_message(json.dumps({"t": "hb", "leases": [[grant["id"], grant["token"]]]})))
    d.handle(s, parse_agent_message(json.dumps(
        {"t": "done", "results": [{"id": grant["id"], "token": grant["token"], "result": 1, "duration_s": 0.1}]})))
    await d.round()
    assert not any('"t":"revoke"' in f for f in frames), frames
    assert any('"t":"ack"' in f and str(grant["id"]) in f for f in frames)
    rows = await store.fetchall("SELECT state FROM tasks")
    assert [r["state"] for r in rows] == ["succeeded"]


async def test_a_wall_clock_step_back_does_not_stop_the_timers(store: Store, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by reading the code after the agent clock tests: the timers (lease expiry, retries) were
    scheduled on time.time(), so a daemon whose clock stepped back an hour ran none for an hour."""
    import time as time_mod

    d = Dispatcher(store, make_config(tmp_path))
    await d.round()  # runs the timers and schedules the next run
    real = time_mod.time
    monkeypatch.setattr(time_mod, "time", lambda: real() - 3600)  # NTP steps the clock an hour back
    await asyncio.sleep(0.6)  # past TIMER_INTERVAL_S on the monotonic clock
    calls: list[bool] = []
    monkeypatch.setattr(d, "_round_tx", lambda tx, reports, wants, timers: calls.append(timers) or queue.RoundResult())
    await d.round()
    assert calls == [True], "the timers did not run after the wall clock stepped back"


async def test_credit_in_a_report_and_acks_in_a_grant_halve_the_frames(store: Store, tmp_path: Path) -> None:
    """protocol.CREDIT_IN_REPORT and ACK_IN_GRANT: an agent that offered them gets its acks inside
    the grant of the same round (one frame, not two), and credit carried by its done frame is
    granted; an agent that did not offer them (an older one) gets a separate ack, as before."""
    await submit(store, 20, max_attempts=1)
    d = Dispatcher(store, make_config(tmp_path))
    frames: dict[str, list[str]] = {"new": [], "old": []}
    sessions = {name: Session(name, 1, 2, frames[name].append, ack_in_grant=(name == "new")) for name in frames}
    for s in sessions.values():
        d.attach(s)
        d.handle(s, LeaseRequest(1))
    await d.round()
    for name, s in sessions.items():
        grant = json.loads(frames[name].pop())
        task = grant["tasks"][0]
        done = {"t": "done", "results": [{"id": task["id"], "token": task["token"], "result": 1, "duration_s": 0.1}],
                "n": 1}
        d.handle(s, parse_agent_message(json.dumps(done)))  # the credit rides in the report
    await d.round()
    new = [json.loads(f) for f in frames["new"]]
    assert [m["t"] for m in new] == ["grant"] and len(new[0]["tasks"]) == 1 and len(new[0]["ok"]) == 1, new
    old = [json.loads(f) for f in frames["old"]]
    assert [m["t"] for m in old] == ["ack", "grant"] and "ok" not in old[1], old


def test_protocol_features_are_offered_and_parsed() -> None:
    from cloudtask_wire.messages import (
        ACK_IN_GRANT,
        CREDIT_IN_REPORT,
        Complete,
        Fail,
        Grant,
        Hello,
        parse_daemon_message,
    )

    hello = parse_agent_message(json.dumps({"t": "hello", "instance": "i", "token": "x", "slots": 1, "held": [],
                                            "version": 1, "features": [ACK_IN_GRANT, "something-newer"]}))
    assert isinstance(hello, Hello) and hello.features == [ACK_IN_GRANT]  # unknown ones ignored
    old = parse_agent_message('{"t":"hello","instance":"i","token":"x","slots":1,"held":[],"version":1}')
    assert isinstance(old, Hello) and old.features == []
    done = parse_agent_message('{"t":"done","results":[],"n":3}')
    assert isinstance(done, Complete) and done.n == 3
    fail = parse_agent_message('{"t":"fail","failures":[]}')
    assert isinstance(fail, Fail) and fail.n == 0
    for bad in ('{"t":"done","results":[],"n":-1}', '{"t":"done","results":[],"n":"3"}',
                '{"t":"hello","instance":"i","token":"x","slots":1,"held":[],"version":1,"features":"all"}'):
        with pytest.raises(ProtocolError):
            parse_agent_message(bad)
    grant = parse_daemon_message('{"t":"grant","tasks":[],"ok":[1],"refused":[2]}')
    assert isinstance(grant, Grant) and grant.ok == [1] and grant.refused == [2]
    plain = parse_daemon_message('{"t":"grant","tasks":[]}')
    assert isinstance(plain, Grant) and plain.ok == plain.refused == []
    assert CREDIT_IN_REPORT != ACK_IN_GRANT


async def test_pools_take_turns_when_the_round_budget_is_short(store: Store, tmp_path: Path) -> None:
    """Connections took turns within a pool, but pools were served in a fixed order: agents of the
    first pool asking for the whole budget every round starved every other pool."""
    await submit(store, 100, max_attempts=1)

    def second_pool(tx: Tx) -> None:
        tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES ('d2', '{}', '/', 0)")
        tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts)"
                      " VALUES ('j2', 2, 'active', 0, 1)")
        tx.db.executemany("INSERT INTO tasks (job_id, pool_id, key, state, data, max_attempts)"
                          " VALUES (2, 2, ?, 'queued', '{}', 1)", [(f"p2-{i}",) for i in range(100)])
    await store.write(second_pool)
    config = make_config(tmp_path)
    d = Dispatcher(store, replace(config, agents=replace(config.agents, lease_batch_max=4)))
    frames: dict[str, list[str]] = {"first": [], "second": []}
    sessions = [Session("first", 1, 4, frames["first"].append), Session("second", 2, 4, frames["second"].append)]
    for s in sessions:
        d.attach(s)
        d.handle(s, LeaseRequest(4))
    for _ in range(2):
        await d.round()
        for s in sessions:
            if s.credit == 0:
                d.handle(s, LeaseRequest(4))  # a busy agent asks again at once
    assert any('"t":"grant"' in f for f in frames["second"]), "the second pool was never served"
    assert any('"t":"grant"' in f for f in frames["first"])
