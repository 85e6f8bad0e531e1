"""Replicas on one PostgreSQL database (cloudtaskd/core/pg/replica.py, issue 17): the quota is one pool
counted in the launch transaction, so two stores launching at once never pass max_instances; the
orchestrator runs only while its replica leads and is cancelled the moment it stops leading; work
announced by one replica wakes another's listener."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from cloudtaskd.core.pg import replica
from cloudtaskd.core.pg.leader import Leadership
from cloudtaskd.core.pg.notify import Listener
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.states import InstanceState
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import instances
from cloudtaskd.errors import FleetFull
from tests.conftest import wait_for

MAX_TOTAL = 5
HOLD_S = 0.01  # inside the launch transaction, so the two stores' launches overlap


def _launch(tx: Tx, inst: str, provider: str, max_total: int, max_provider: int) -> bool:
    try:
        instances.reserve_place(tx, provider, max_total=max_total, max_provider=max_provider)
    except FleetFull:
        return False
    time.sleep(HOLD_S)  # the other store's launch counts meanwhile: without the lock it would count too few
    instances.add(tx, inst, provider=provider, pool_id=1, state=InstanceState.PENDING, slots=1, token_hash="h")
    return True


async def _launch_many(store: PgStore, name: str, n: int, provider: str, max_provider: int) -> int:
    made = 0
    for i in range(n):
        made += await store.write(_launch, f"{provider}-{name}{i}", provider, MAX_TOTAL, max_provider)
    return made


async def test_two_stores_racing_launches_never_pass_the_one_quota(pg_dsn: str) -> None:
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        made = await asyncio.gather(_launch_many(a, "a", 10, "local", 99), _launch_many(b, "b", 10, "local", 99))
        assert sum(made) == MAX_TOTAL, made
        assert all(made), made  # both did launch: the race was real
        live = await a.fetchone("SELECT count(*) AS n FROM instances WHERE state != 'stopped'")
        assert live is not None and live["n"] == MAX_TOTAL
        # The provider's own limit holds across both as well.
        await a.write(lambda tx: tx.db.execute("UPDATE instances SET state = 'stopped'"))
        made = await asyncio.gather(_launch_many(a, "c", 5, "ssh", 2), _launch_many(b, "d", 5, "ssh", 2))
        assert sum(made) == 2, made
    finally:
        await a.close()
        await b.close()


async def test_the_reconciler_runs_only_while_leading_and_stops_at_the_loss(pg_dsn: str) -> None:
    runs: list[str] = []
    cancelled: list[str] = []

    def work(name: str) -> Any:
        async def loop() -> None:
            runs.append(name)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
        return loop

    a = Leadership(pg_dsn, name="a", retry_s=0.1)
    b = Leadership(pg_dsn, name="b", retry_s=0.1)
    gate_a, gate_b = replica.LeaderGate(a, work("a"), name="r"), replica.LeaderGate(b, work("b"), name="r")
    a.on_change, b.on_change = gate_a.on_change, gate_b.on_change
    tasks = [asyncio.create_task(t) for t in (a.run(), gate_a.run())]

    async def leads(lead: Leadership) -> bool:
        return lead.is_leader
    try:
        await wait_for(lambda: leads(a), timeout=10, message="a leads")
        tasks += [asyncio.create_task(t) for t in (b.run(), gate_b.run())]
        await wait_for(lambda: _true(runs == ["a"]), timeout=10, message="a's reconciler running")
        await asyncio.sleep(0.3)
        assert runs == ["a"] and not b.is_leader  # b waits: one orchestrator at a time
        # a's session ends (as when its host dies): a steps down and its work is cancelled; b takes over.
        assert a.backend_pid is not None
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (a.backend_pid,))
        await wait_for(lambda: _true(cancelled == ["a"]), timeout=10, message="a's reconciler cancelled")
        await wait_for(lambda: _true(runs[-1:] == ["b"]), timeout=10, message="b's reconciler running")
        assert runs.count("b") == 1
    finally:
        await a.resign()
        await b.resign()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value


async def test_work_announced_on_one_replica_wakes_the_other(pg_dsn: str) -> None:
    got: list[int | None] = []
    listener = Listener(pg_dsn, on_notify=lambda payload: replica.woken(payload, got.append))
    sender = replica.Broadcaster(pg_dsn)
    tasks = [asyncio.create_task(listener.run()), asyncio.create_task(sender.run())]
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        got.clear()  # the connection's own wake-up (None)
        sender.announce(7)
        sender.announce(3)
        await wait_for(lambda: _true(sorted(p for p in got if p is not None) == [3, 7]), timeout=10,
                       message="pools 3 and 7 woken on the listener")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sender.close()
