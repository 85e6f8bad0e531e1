"""Spot interruptions in the daemon: notices recorded once, leases of an interrupted instance
requeued without counting an attempt, rates per offer feeding the ranking. Real SQLite, hand-made rows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloudtask_wire.messages import Notice, ProtocolError, encode, parse_agent_message
from cloudtaskd.config import Config
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.fleet import interruptions
from cloudtaskd.fleet.orchestrator.market import Market
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.orchestrator.selection import PRIOR_HOURS, PRIOR_SPOT_RATE_PER_H, Needs, Policy
from cloudtaskd.fleet.providers.base import CloudInstance, Offer

CHEAP = Offer("aws", "t3.small", "us-east-1a", True, 2, 4.0, 0.0100, "us-east-1")
DEARER = Offer("aws", "t3.small", "us-east-1b", True, 2, 4.0, 0.0101, "us-east-1")


def world(tx: Tx) -> None:
    db = tx.db
    db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/x', 0)")
    db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, n_leased)"
               " VALUES (1, 'j', 1, 'active', 0, 3, 4)")
    for inst, state, offer in (("aws-a", "running", CHEAP), ("aws-b", "running", DEARER)):
        db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, created_at,"
                   " state_changed_at) VALUES (?, 'aws', 1, ?, 2, 'h', ?, 0, 0)",
                   (inst, state, json.dumps({"key": offer.key, "spot": offer.spot})))
    for n, inst in enumerate(("aws-a", "aws-a", "aws-b", "aws-b")):
        db.execute("INSERT INTO tasks (job_id, pool_id, key, state, data, max_attempts, attempt, instance_id,"
                   " lease_expires_at) VALUES (1, 1, ?, 'leased', '{}', 3, 1, ?, 100)", (str(n), inst))


@pytest.fixture
async def db(store: Store) -> Store:
    await store.write(world, now=0.0)
    return store


async def test_an_interruption_is_recorded_once_and_drains_the_instance(db: Store) -> None:
    first = await db.write(interruptions.record, "aws-a", "interruption", "aws", 120.0, "terminate", now=10.0)
    assert first is not None and first.new and first.drained and first.offer_key == CHEAP.key
    again = await db.write(interruptions.record, "aws-a", "interruption", "aws", 120.0, "terminate", now=11.0)
    assert again is not None and not again.new and not again.drained
    row = await db.fetchone("SELECT state, interrupted_at, at_risk_since FROM instances WHERE id = 'aws-a'")
    assert row is not None and (row["state"], row["interrupted_at"], row["at_risk_since"]) == ("draining", 10.0, None)
    n = await db.fetchone("SELECT count(*) AS n FROM interruptions WHERE instance_id = 'aws-a'")
    assert n is not None and n["n"] == 1
    assert await db.write(interruptions.record, "nope", "interruption", "aws", None, "x") is None


async def test_a_rebalance_marks_the_instance_at_risk_without_draining_it(db: Store) -> None:
    got = await db.write(interruptions.record, "aws-b", "rebalance", "aws", None, "rebalance", now=5.0)
    assert got is not None and got.new and not got.drained
    row = await db.fetchone("SELECT state, interrupted_at, at_risk_since FROM instances WHERE id = 'aws-b'")
    assert row is not None and (row["state"], row["interrupted_at"], row["at_risk_since"]) == ("running", None, 5.0)


async def test_expired_leases_of_an_interrupted_instance_come_back_uncounted(db: Store) -> None:
    await db.write(interruptions.record, "aws-a", "interruption", "aws", None, "terminate", now=10.0)

    def sweep(tx: Tx) -> tuple[list[tuple[int, str | None]], set[int], list[tuple[int, str | None]]]:
        back, pools = queue.requeue_interrupted(tx)
        return back, pools, queue.expire_leases(tx, (0.0, 0.0))

    back, pools, expired = await db.write(sweep, now=200.0)
    assert sorted(back) == [(1, "aws-a"), (2, "aws-a")] and pools == {1}
    assert sorted(expired) == [(3, "aws-b"), (4, "aws-b")]  # not interrupted: a failed attempt
    rows = {r["id"]: (r["state"], r["failures"]) for r in await db.fetchall("SELECT id, state, failures FROM tasks")}
    assert rows == {1: ("queued", 0), 2: ("queued", 0), 3: ("failed", 1), 4: ("failed", 1)}
    counters = await db.fetchone("SELECT n_queued, n_leased, n_failed FROM jobs WHERE id = 1")
    assert counters is not None and tuple(counters) == (2, 0, 2)
    assert await db.read(queue.check_counters) == []


async def test_requeue_instance_hands_back_everything_it_holds(db: Store) -> None:
    leases, pools = await db.write(queue.requeue_instance, "aws-b", "gone", now=50.0)
    assert sorted(leases) == [(3, "aws-b"), (4, "aws-b")] and pools == {1}
    rows = await db.fetchall("SELECT state, failures FROM tasks WHERE id IN (3, 4)")
    assert [tuple(r) for r in rows] == [("queued", 0), ("queued", 0)]
    events = await db.fetchall("SELECT kind, detail FROM events WHERE task_id = 3")
    assert [tuple(e) for e in events] == [("lease_handed_back", "gone")]


async def test_rates_count_each_instance_once_over_its_exposure(db: Store) -> None:
    # Both ran 0 -> 36000 s (10 h); a was interrupted (its notice and rebalance: counted once).
    await db.write(interruptions.record, "aws-a", "rebalance", "aws", None, "r", now=100.0)
    await db.write(interruptions.record, "aws-a", "interruption", "aws", None, "t", now=200.0)
    rates = await db.read(lambda d: interruptions.rates(d, 36000.0))
    prior = PRIOR_SPOT_RATE_PER_H * PRIOR_HOURS
    assert rates[CHEAP.key] == pytest.approx((1 + prior) / (10 + PRIOR_HOURS))
    assert rates[DEARER.key] == pytest.approx(prior / (10 + PRIOR_HOURS))
    counts = {c["offer"]: c for c in await db.read(lambda d: interruptions.counts(d, 36000.0))}
    assert counts[CHEAP.key]["interruptions"] == 1 and counts[CHEAP.key]["rebalances"] == 1
    assert counts[DEARER.key]["instance_hours"] == pytest.approx(10.0)
    # Outside the window (ended long ago): nothing observed.
    await db.write(lambda tx: tx.db.execute("UPDATE instances SET ended_at = 3600, state = 'stopped'"))
    assert await db.read(lambda d: interruptions.rates(d, 3600.0 + interruptions.RATE_WINDOW_S + 1)) == {}


async def test_observed_interruptions_steer_the_market_to_the_steadier_zone(db: Store) -> None:
    class Fixed:
        name = "aws"

        def offers(self) -> list[Offer]:
            return [CHEAP, DEARER]

    market = Market(db, [Fixed()], {})  # type: ignore[list-item]
    await market.observe(0.0)
    assert market.rank(Needs(1), Policy())[0].offer.key == CHEAP.key  # same prior: cheaper wins
    # Three of the cheap zone's instances are taken within an hour each; the dearer zone's ran steadily.
    for i in range(3):
        await db.write(lambda tx, i=i: tx.db.execute(
            "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, created_at,"
            " state_changed_at, ended_at, interrupted_at) VALUES (?, 'aws', 1, 'stopped', 2, 'h', ?, 0, 0, 3600, 3000)",
            (f"aws-x{i}", json.dumps({"key": CHEAP.key, "spot": True}))))
    await market.observe(1.0)  # within the minute: the cached rates stand
    assert market.rank(Needs(1), Policy())[0].offer.key == CHEAP.key
    await market.observe(2.0, force=True)
    assert market.rank(Needs(1), Policy())[0].offer.key == DEARER.key


def test_notice_messages_are_validated_with_the_field_named() -> None:
    msg = parse_agent_message(encode(Notice("interruption", "aws", 123.5, "terminate")))
    assert msg == Notice("interruption", "aws", 123.5, "terminate")
    assert parse_agent_message('{"t":"notice","kind":"rebalance","source":"aws","deadline":null,"detail":""}') \
        == Notice("rebalance", "aws", None, "")
    for raw, field in (('{"t":"notice","kind":"reboot","source":"aws","deadline":null,"detail":""}', "kind"),
                       ('{"t":"notice","kind":"interruption","source":"aws","deadline":-1,"detail":""}', "deadline"),
                       ('{"t":"notice","kind":"interruption","source":7,"deadline":null,"detail":""}', "source"),
                       ('{"t":"notice","kind":"interruption","source":"aws","deadline":1}', "detail")):
        with pytest.raises(ProtocolError) as err:
            parse_agent_message(raw)
        assert err.value.field == field


class Listed:
    """A provider that lists its VMs as the cloud reports them; the reconciler is what is tested."""

    name = "aws"

    def __init__(self, vms: list[CloudInstance]) -> None:
        self.vms = vms
        self.terminated: list[str] = []

    def offers(self) -> list[Offer]:
        return [CHEAP, DEARER]

    async def list_instances(self) -> list[CloudInstance]:
        return [v for v in self.vms if v.instance_id not in self.terminated]

    async def terminate(self, instance_id: str) -> None:
        self.terminated.append(instance_id)


async def test_a_spot_vm_listed_as_stopped_is_an_interruption_not_a_failure(db: Store, tmp_path: Any) -> None:
    """GCP keeps a preempted VM as TERMINATED, Azure an evicted one deallocated: still listed, not
    running. Its leases come back uncounted at once, even when no notice reached the daemon (the
    agent was disconnected when the cloud gave it), and a spot VM taken while it booted is not a
    start failure (that would back the pool's launches off)."""
    await db.write(lambda tx: tx.db.execute(
        "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, created_at, state_changed_at)"
        " VALUES ('aws-boot', 'aws', 1, 'starting', 2, 'h', ?, 0, 0),"
        "        ('aws-od', 'aws', 1, 'starting', 2, 'h', ?, 0, 0)",
        (json.dumps({"key": CHEAP.key, "spot": True}), json.dumps({"key": "aws/x/y/on-demand", "spot": False}))))
    provider = Listed([CloudInstance("aws-a", "i-a", running=False), CloudInstance("aws-b", "i-b"),
                       CloudInstance("aws-boot", "i-boot", running=False)])
    config = Config(state_dir=str(tmp_path))
    reconciler = Reconciler(store=db, dispatcher=(disp := Dispatcher(db, config)),  # type: ignore[list-item]
                            providers=[(provider, 5)], config=config, agent_url="ws://x", metrics=disp.metrics,
                            sessions=disp.sessions)
    await reconciler.sync(now=50.0)

    tasks = {r["id"]: (r["state"], r["failures"]) for r in await db.fetchall("SELECT id, state, failures FROM tasks")}
    assert tasks == {1: ("queued", 0), 2: ("queued", 0), 3: ("leased", 0), 4: ("leased", 0)}
    noticed = await db.fetchall("SELECT instance_id, source FROM interruptions ORDER BY instance_id")
    assert [tuple(r) for r in noticed] == [("aws-a", "provider"), ("aws-boot", "provider")]
    states = {r["id"]: (r["state"], r["last_error"])
              for r in await db.fetchall("SELECT id, state, last_error FROM instances")}
    assert states["aws-b"] == ("running", None)
    assert states["aws-a"][0] == "stopped" and sorted(provider.terminated) == ["aws-a", "aws-boot", "aws-od"]
    assert "spot capacity was reclaimed" in str(states["aws-boot"][1])
    # The on-demand VM that vanished while booting is the worker's or the image's fault: backed off.
    assert "before connecting" in str(states["aws-od"][1])
    assert reconciler._start_failures[1][0] == 1
    assert await db.read(queue.check_counters) == []
