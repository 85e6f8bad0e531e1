"""The fleet's table modules on real SQLite and hand-made rows: tables/instances.py, events.py,
interruptions.py, catalog.py, host_keys.py. Each function's rows, filters and guards, checked by hand."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest

from cloudtaskd.core.states import ACTIVE_INSTANCE_STATES, LIVE_INSTANCE_STATES, InstanceState
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import catalog, events, host_keys, instances, interruptions
from cloudtaskd.fleet.providers.base import Offer

# id, provider, pool, state, slots, price, created_at, ended_at, offer
FLEET = [
    ("aws-p", "aws", 1, "pending", 2, 0.2, 0.0, None, {"key": "aws/a/t3/spot", "spot": True, "machine_type": "t3"}),
    ("aws-s", "aws", 1, "starting", 2, 0.2, 0.0, None, {"key": "aws/a/t3/spot", "spot": True, "machine_type": "t3"}),
    ("aws-r", "aws", 1, "running", 2, 0.2, 0.0, None, {"key": "aws/a/t3/spot", "spot": True, "machine_type": "t3"}),
    ("gcp-d", "gcp", 1, "draining", 4, 0.5, 0.0, None, {"key": "gcp/b/n2/od", "spot": False, "machine_type": "n2"}),
    ("gcp-x", "gcp", 1, "stopping", 4, 0.5, 0.0, None, {"key": "gcp/b/n2/od", "spot": False, "machine_type": "n2"}),
    ("aws-z", "aws", 1, "stopped", 2, 0.2, 0.0, 1800.0, {"key": "aws/a/t3/spot", "spot": True, "machine_type": "t3"}),
    ("external-e", "external", 2, "running", 8, 0.0, 0.0, None, {}),
]


def world(tx: Tx) -> None:
    db = tx.db
    for pool in (1, 2):
        db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (?, ?, '{}', '/x', 0)",
                   (pool, f"d{pool}"))
        db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts) VALUES (?, 'j', ?,"
                   " 'active', 0, 3)", (pool, pool))
    for inst, provider, pool, state, slots, price, created, ended, offer in FLEET:
        db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, price_per_hour,"
                   " created_at, state_changed_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (inst, provider, pool, state, slots, f"hash-{inst}", json.dumps(offer), price, created, created,
                    ended))


@pytest.fixture
def store(both_stores: Store) -> Store:
    """Every test here runs on SQLite and on PostgreSQL."""
    return both_stores


@pytest.fixture
async def db(store: Store) -> Store:
    await store.write(world, now=0.0)
    return store


def ids(rows: list[Any]) -> set[str]:
    return {r["id"] for r in rows}


async def test_the_fleets_reads_leave_out_what_they_should(db: Store) -> None:
    live = {i for i, *_ in FLEET if i != "aws-z"}
    assert ids(await db.read(partial(instances.live_of_provider, provider="aws"))) == {"aws-p", "aws-s", "aws-r"}
    assert ids(await db.read(instances.launched_live)) == live - {"external-e"}
    assert ids(await db.read(instances.to_stop)) == live - {"external-e"}
    assert await db.read(instances.pending) == ["aws-p"]
    assert await db.read(partial(instances.running_in_pool, pool_id=1)) == ["aws-r"]
    assert ids(await db.read(instances.with_agents)) == {"aws-s", "aws-r", "gcp-d", "external-e"}
    row = (await db.read(partial(instances.live_of_provider, provider="aws")))[0]
    assert (row["spot"], row["offer_key"]) == (1, "aws/a/t3/spot")


async def test_a_jobs_instances_are_the_active_states(db: Store) -> None:
    # pending, starting, running, draining: not stopping (being terminated), not stopped.
    assert set(ACTIVE_INSTANCE_STATES) == set(LIVE_INSTANCE_STATES) - {InstanceState.STOPPING}
    assert await db.read(partial(instances.active_in_pool, pool_id=1)) == 4
    assert await db.read(instances.active_by_pool) == {1: 4, 2: 1}
    assert len(await db.read(partial(instances.listing, stopped=False))) == 6
    assert len(await db.read(partial(instances.listing, stopped=True))) == 7
    got = await db.read(partial(instances.get, instance_id="gcp-d"))
    assert got is not None and (got["state"], got["slots"]) == ("draining", 4)
    assert await db.read(partial(instances.exists, instance_id="nope")) is False


async def test_the_grouped_counts(db: Store) -> None:
    by_type = [tuple(r) for r in await db.read(instances.live_by_type)]
    assert ("aws", "t3", "running", 1, 2, 0.2) in by_type and ("gcp", "n2", "stopping", 1, 4, 0.5) in by_type
    assert all(r[2] != "stopped" for r in by_type)
    counts = {(r["provider"], r["machine_type"], r["state"]): r["n"] for r in await db.read(instances.live_counts)}
    assert counts[("gcp", "n2", "draining")] == 1 and ("aws", "t3", "stopped") not in counts
    rows = await db.read(instances.live_by_market)
    market = {(r["provider"], r["spot"]): (r["n"], r["price_per_hour"]) for r in rows}
    assert market[("aws", 1)] == (3, pytest.approx(0.6)) and market[("gcp", 0)] == (2, pytest.approx(1.0))


async def test_cost_reads(db: Store) -> None:
    spend = {r["provider"]: r for r in await db.read(partial(instances.spend_by_provider, now=3600.0))}
    assert "external" not in spend
    # aws: three live for an hour and one for half an hour at 0.2 $/h; rate of the three live ones.
    assert spend["aws"]["spent"] == pytest.approx(0.2 * (3 * 3600 + 1800))
    assert spend["aws"]["rate"] == pytest.approx(0.6)
    pool = await db.read(partial(instances.pool_cost, pool_id=1, now=3600.0))
    assert pool["live_slots"] == 2 + 2 + 2 + 4 + 4
    # From t=1800: the stopped one ended at 1800 and counts for nothing; the rest for half an hour.
    since = await db.write(lambda tx: instances.pool_spend_since(tx.db, 1, 1800.0, 3600.0))
    assert since == instances.Spend(pytest.approx((0.2 * 3 + 0.5 * 2) * 1800), pytest.approx(1.6))


async def test_agents_hello_reads_and_touch(db: Store) -> None:
    assert await db.read(partial(instances.token_hash_of, instance_id="aws-r")) == "hash-aws-r"
    assert await db.read(partial(instances.token_hash_of, instance_id="nope")) is None
    auth = await db.write(instances.auth_of, "aws-s")
    assert auth == instances.Auth(InstanceState.STARTING, "hash-aws-s", 1)
    assert await db.write(instances.auth_of, "nope") is None
    await db.write(instances.touch, "aws-r", now=42.0)
    await db.write(instances.set_last_error, "aws-r", "terminate failed: boom")
    row = await db.read(partial(instances.get, instance_id="aws-r"))
    assert row is not None and (row["last_seen_at"], row["last_error"]) == (42.0, "terminate failed: boom")


async def test_host_key_pins_and_spot_marks_keep_the_first(db: Store) -> None:
    assert await db.write(instances.pin_host_key, "aws-r", "ssh-ed25519 AAA") is True
    assert await db.write(instances.pin_host_key, "aws-r", "ssh-ed25519 BBB") is False
    assert await db.read(partial(instances.host_key, instance_id="aws-r")) == "ssh-ed25519 AAA"
    assert await db.read(partial(instances.host_key, instance_id="aws-s")) is None
    await db.write(host_keys.pin, "10.0.0.1", 22, "ssh-ed25519 CCC")
    await db.write(host_keys.pin, "10.0.0.1", 22, "ssh-ed25519 DDD")
    assert await db.read(partial(host_keys.get, address="10.0.0.1", port=22)) == "ssh-ed25519 CCC"
    assert await db.read(partial(host_keys.get, address="10.0.0.1", port=2222)) is None
    for at in (10.0, 20.0):
        await db.write(instances.mark_interrupted, "aws-r", now=at)
        await db.write(instances.mark_at_risk, "gcp-d", now=at)
    got = await db.write(instances.state_and_offer, "aws-r")
    assert got is not None and got.state == InstanceState.RUNNING and json.loads(got.offer)["key"] == "aws/a/t3/spot"
    r = await db.read(partial(instances.get, instance_id="aws-r"))
    d = await db.read(partial(instances.get, instance_id="gcp-d"))
    assert r is not None and d is not None
    assert (r["interrupted_at"], r["at_risk_since"]) == (10.0, None)
    assert (d["interrupted_at"], d["at_risk_since"]) == (None, 10.0)


async def test_interruption_rows(db: Store) -> None:
    assert await db.write(interruptions.add, "aws-r", "aws/a/t3/spot", "interruption", "aws", 120.0, "x", now=1.0)
    assert not await db.write(interruptions.add, "aws-r", "aws/a/t3/spot", "interruption", "aws", 120.0, "x")
    assert await db.write(interruptions.add, "aws-r", "aws/a/t3/spot", "rebalance", "aws", None, "y", now=2.0)
    assert await db.write(interruptions.add, "gcp-d", "gcp/b/n2/od", "interruption", "gcp", None, "z", now=3.0)
    recent = await db.read(partial(interruptions.recent, limit=2))
    assert [(r["instance_id"], r["kind"]) for r in recent] == [("gcp-d", "interruption"), ("aws-r", "rebalance")]
    assert await db.read(interruptions.interruptions_by_provider) == {"aws": 1, "gcp": 1}


async def test_catalog_rows(db: Store) -> None:
    offer = Offer("aws", "t3.small", "us-east-1a", True, 2, 4.0, 0.01, "us-east-1", 0, arch="X86_64")
    await db.write(catalog.replace, "aws", [offer], now=100.0)
    await db.write(catalog.replace, "gcp", [Offer("gcp", "n2", "z", False, 4)], now=200.0)
    await db.write(catalog.replace, "aws", [], now=300.0)  # replaced whole: nothing of aws is left
    assert [r["provider"] for r in await db.read(catalog.offers)] == ["gcp"]
    assert await db.read(catalog.fetched_at) == {"gcp": 200.0}


def some_events(tx: Tx) -> None:
    for kind, job, inst in (("job_created", 1, None), ("instance_launched", None, "aws-r"),
                            ("task_succeeded", 1, None), ("instance_launched", None, "external-e"),
                            ("task_dead", 2, None), ("lease_granted", 2, None)):
        tx.event(kind, job_id=job, instance_id=inst)


async def test_the_event_log_filters_pages_and_tails(db: Store) -> None:
    base = await db.read(events.last_id)
    await db.write(some_events, now=50.0)
    assert await db.read(events.last_id) == base + 6
    everything = events.Filter()
    assert [r["kind"] for r in await db.read(partial(events.page, after=base, where=everything, limit=2))] == [
        "job_created", "instance_launched"]
    # A job's events and its worker's instances' (aws-r serves pool 1, job 1; external-e pool 2).
    job1 = await db.read(partial(events.page, after=base, where=events.Filter(job=1), limit=100))
    assert [(r["kind"], r["instance_id"]) for r in job1] == [
        ("job_created", None), ("instance_launched", "aws-r"), ("task_succeeded", None)]
    kinds = events.Filter(kinds=("task_dead", "job_created"))
    assert [r["kind"] for r in await db.read(partial(events.tail, where=kinds, n=1))] == ["task_dead"]
    assert [r["instance_id"] for r in await db.read(
        partial(events.tail, where=events.Filter(instance="external-e"), n=5))] == ["external-e"]
    assert [r["kind"] for r in await db.read(partial(events.latest_errors, limit=5))] == ["task_dead"]


async def test_pruning_keeps_the_finishing_events_of_a_held_job(db: Store) -> None:
    base = await db.read(events.last_id)
    await db.write(some_events, now=50.0)
    await db.write(lambda tx: tx.db.execute("DELETE FROM jobs WHERE id = 2"))
    assert await db.read(events.cursor_before_first) <= base
    # Everything in the span is older than 100: no young event stops the walk.
    assert await db.write(events.first_young, base, base + 6, 100.0, 0) is None
    assert await db.write(events.first_young, base, base + 6, 10.0, base + 3) == base + 4
    deleted = await db.write(events.prune_span, base, base + 6)
    # Job 1 is held: its task_succeeded stays; job 2 is gone: its task_dead goes with the rest.
    assert deleted == 5
    left = await db.read(partial(events.page, after=base, where=events.Filter(), limit=10))
    assert [r["kind"] for r in left] == ["task_succeeded"]
    await db.write(events.delete_job_span, 1, base, base + 6)
    assert await db.read(partial(events.page, after=base, where=events.Filter(), limit=10)) == []
