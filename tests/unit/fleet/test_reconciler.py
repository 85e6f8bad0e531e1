"""The reconciler's tick on a real Store with an in-memory provider: it syncs from what the provider
reports first, then acts (lost, leaked, launched, failed starts)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cloudtaskd.config import Config, ScalingConfig
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.errors import CapacityError
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer

NAME = "fake"
OFFER = Offer(NAME, "m1", "z1", spot=False, cpus=2, memory_gb=4.0, price_per_hour=0.0)


class FakeProvider:
    """The provider contract in memory: what it runs, and a log of the calls made to it."""

    name = NAME

    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: dict[str, CloudInstance] = {}
        self.calls: list[str] = []
        self.launch_error: Exception | None = None
        self.row_state_at_launch: list[str] = []

    def offers(self) -> list[Offer]:
        return [OFFER]

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        self.calls.append(f"launch {spec.instance_id}")
        row = await self.store.fetchone("SELECT state FROM instances WHERE id = ?", (spec.instance_id,))
        self.row_state_at_launch.append(row["state"] if row is not None else "(no row)")
        if self.launch_error is not None:
            raise self.launch_error
        made = CloudInstance(spec.instance_id, f"vm-{len(self.running)}", address="10.0.0.9")
        self.running[spec.instance_id] = made
        return made

    async def terminate(self, instance_id: str) -> None:
        self.calls.append(f"terminate {instance_id}")
        self.running.pop(instance_id, None)

    async def list_instances(self) -> list[CloudInstance]:
        self.calls.append("list")
        return list(self.running.values())

    async def close(self) -> None:
        pass


def make_reconciler(store: Store, provider: FakeProvider, tmp_path: Path, **scaling: float) -> Reconciler:
    """The one place the reconciler is built (its constructor's collaborators may change)."""
    config = Config(state_dir=str(tmp_path / "state"), scaling=replace(ScalingConfig(), **scaling))
    dispatcher = Dispatcher(store, config)
    return Reconciler(store=store, dispatcher=dispatcher, providers=[(provider, 5)],  # type: ignore[list-item]
                      config=config, agent_url="ws://127.0.0.1:1/v1/agent", metrics=dispatcher.metrics,
                      sessions=dispatcher.sessions)


@pytest.fixture
def provider(store: Store) -> FakeProvider:
    return FakeProvider(store)


def _instance(tx: Tx, inst: str, state: str, changed_at: float = 0.0) -> None:
    tx.db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, created_at,"
                  " state_changed_at) VALUES (?, ?, NULL, ?, 1, 'h', ?, ?, ?)",
                  (inst, NAME, state, json.dumps({"key": OFFER.key, "spot": False}), changed_at, changed_at))


def _job_with_queued_work(tx: Tx, queued: int) -> int:
    spec = json.dumps({"mode": "command", "command": "true"})
    tx.db.execute("INSERT INTO pools (digest, spec, path, created_at) VALUES ('d', ?, '/nowhere', 0)", (spec,))
    cur = tx.db.execute("INSERT INTO jobs (name, pool_id, state, created_at, max_attempts, n_queued)"
                        " VALUES ('j', 1, 'active', 0, 3, ?)", (queued,))
    return int(cur.lastrowid or 0)


async def _row(store: Store, inst: str) -> dict[str, object]:
    row = await store.fetchone("SELECT state, last_error, cloud_id, address FROM instances WHERE id = ?", (inst,))
    assert row is not None, f"no row for {inst}"
    return dict(row)


async def _events(store: Store, inst: str) -> list[str]:
    return [r["kind"] for r in await store.fetchall("SELECT kind FROM events WHERE instance_id = ? ORDER BY id",
                                                    (inst,))]


async def test_a_tick_syncs_first_then_acts(store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    await store.write(_instance, "fake-gone", "running")
    await store.write(_job_with_queued_work, 3)
    reconciler = make_reconciler(store, provider, tmp_path)
    await reconciler.tick(now=100.0)
    launched = [c for c in provider.calls if c.startswith("launch")]
    assert launched, provider.calls
    # the provider's truth was read, and the lost instance ended, before anything was launched
    assert provider.calls.index("list") < provider.calls.index("terminate fake-gone") < provider.calls.index(
        launched[0])


async def test_an_instance_the_provider_no_longer_reports_is_lost(
        store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    await store.write(_instance, "fake-gone", "running")
    await store.write(_instance, "fake-here", "running")
    provider.running["fake-here"] = CloudInstance("fake-here", "vm-here")
    reconciler = make_reconciler(store, provider, tmp_path)
    reconciler.dispatcher.sessions["fake-here"] = object()  # type: ignore[assignment]  # its agent is connected
    await reconciler.sync(now=100.0)

    gone = await _row(store, "fake-gone")
    assert (gone["state"], gone["last_error"]) == ("stopped", "instance is gone")
    assert await _events(store, "fake-gone") == ["instance_lost", "instance_terminated"]
    assert (await _row(store, "fake-here"))["state"] == "running"
    assert "terminate fake-here" not in provider.calls


async def test_a_leaked_instance_is_terminated(store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    provider.running["fake-leak"] = CloudInstance("fake-leak", "vm-leak")  # tagged ours, no row
    provider.running["vm-anon"] = CloudInstance("vm-anon", "vm-anon", anonymous=True)  # tagged, never named
    reconciler = make_reconciler(store, provider, tmp_path)
    await reconciler.sync(now=100.0)
    assert sorted(c for c in provider.calls if c.startswith("terminate")) == [
        "terminate fake-leak", "terminate vm-anon"]
    assert provider.running == {}
    assert await store.fetchone("SELECT id FROM instances") is None  # ended, not adopted


async def test_a_launch_records_the_row_pending_then_starting(
        store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    await store.write(_job_with_queued_work, 1)
    reconciler = make_reconciler(store, provider, tmp_path)
    await reconciler.tick(now=100.0)
    assert len(provider.running) == 1, provider.calls
    inst = next(iter(provider.running))
    assert provider.row_state_at_launch == ["pending"]  # recorded before the provider was asked
    row = await _row(store, inst)
    assert (row["state"], row["cloud_id"], row["address"]) == ("starting", "vm-0", "10.0.0.9")
    assert await _events(store, inst) == ["instance_requested", "instance_launched"]

    # the next tick finds it booting: nothing more is launched for one task
    await reconciler.tick(now=101.0)
    assert len([c for c in provider.calls if c.startswith("launch")]) == 1


async def test_a_refused_launch_ends_the_row_with_the_providers_reason(
        store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    await store.write(_job_with_queued_work, 1)
    provider.launch_error = CapacityError(NAME, "launch", "no m1 left in z1")
    reconciler = make_reconciler(store, provider, tmp_path)
    await reconciler.tick(now=100.0)
    rows = await store.fetchall("SELECT id, state, last_error FROM instances")
    assert [(r["state"], r["last_error"]) for r in rows] == [("stopped", "fake: launch: no m1 left in z1")]
    assert reconciler.backoff.blocked(OFFER.key, 100.0)  # the next-best offer takes over meanwhile


async def test_an_agent_that_never_connects_is_a_start_failure(
        store: Store, provider: FakeProvider, tmp_path: Path) -> None:
    await store.write(_instance, "fake-slow", "starting", 0.0)
    provider.running["fake-slow"] = CloudInstance("fake-slow", "vm-slow")
    reconciler = make_reconciler(store, provider, tmp_path, start_timeout_s=60.0)

    await reconciler.sync(now=59.0)  # within the start timeout: left alone
    assert (await _row(store, "fake-slow"))["state"] == "starting"

    async def refuse(instance_id: str) -> None:
        provider.calls.append(f"terminate {instance_id}")
        raise OSError("the provider's API is down")

    provider.terminate = refuse  # type: ignore[method-assign]  # the row must then wait in STOPPING
    await reconciler.sync(now=61.0)
    row = await _row(store, "fake-slow")
    assert row["state"] == "stopping"
    assert await _events(store, "fake-slow") == ["instance_start_failed"]
    detail = await store.fetchone("SELECT detail FROM events WHERE kind = 'instance_start_failed'")
    assert detail is not None and detail["detail"].startswith("agent did not connect within 60 s")
    assert row["last_error"] == "terminate failed: the provider's API is down"

    del provider.terminate  # the provider's own terminate again: the next sync ends it
    await reconciler.sync(now=62.0)
    assert (await _row(store, "fake-slow"))["state"] == "stopped"
    assert await _events(store, "fake-slow") == ["instance_start_failed", "instance_terminated"]
