"""Cost accounting on hand-made rows, checked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudtaskd.core import costs
from cloudtaskd.core.store import Store, Tx


def world(tx: Tx) -> None:
    db = tx.db
    db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/x', 0)")
    db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, n_queued, n_succeeded)"
               " VALUES (1, 'j', 1, 'active', 0, 3, 3, 6)")
    for inst, price, slots, created, ended, state in (("aws-a", 0.2, 2, 0.0, 3600.0, "stopped"),
                                                      ("aws-b", 0.1, 1, 1800.0, None, "running"),
                                                      ("local-c", 0.0, 4, 0.0, None, "running")):
        db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, price_per_hour,"
                   " created_at, state_changed_at, ended_at) VALUES (?, ?, 1, ?, ?, 'h', ?, ?, ?, ?)",
                   (inst, inst.split("-")[0], state, slots, price, created, created, ended))
    rows = [("aws-a", 900.0)] * 4 + [("aws-b", 600.0)] * 2
    for n, (inst, duration) in enumerate(rows):
        db.execute("INSERT INTO tasks (job_id, pool_id, key, state, data, max_attempts, instance_id, finished_at,"
                   " duration_s) VALUES (1, 1, ?, 'succeeded', '{}', 3, ?, 100, ?)", (str(n), inst, duration))
    for n in range(3):
        db.execute("INSERT INTO tasks (job_id, pool_id, key, state, data, max_attempts)"
                   " VALUES (1, 1, ?, 'queued', '{}', 3)", (f"q{n}",))


async def test_fleet_and_job_cost(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.write(world)
        fleet = await store.read(lambda db: costs.fleet(db, 3600.0))
        # a: 0.2 $/h for 1 h; b: 0.1 $/h for the last half hour; local: free.
        assert fleet["spent"] == pytest.approx(0.25)
        assert fleet["rate_per_hour"] == pytest.approx(0.1)
        assert fleet["providers"]["aws"]["instances"] == 2 and fleet["providers"]["local"]["spent"] == 0.0

        job = await store.read(lambda db: costs.job(db, 1, 3600.0))
        assert job is not None
        # Task time: 4 x 900 s at 0.1 $/slot-h (a) + 2 x 600 s at 0.1 $/slot-h (b) = 0.1 + 0.0333.
        assert job["spent"] == pytest.approx(0.1 + 1 / 30)
        # The pool paid 0.25 for 0.1333 of task time: overhead x1.875.
        assert job["overhead_factor"] == pytest.approx(0.25 / (0.1 + 1 / 30))
        # 3 tasks left x 800 s mean at the live fleet's slot price (0.1 $/h over 1 + 4 slots = 0.02 $/slot-h).
        assert job["remaining_tasks"] == 3
        assert job["estimate_to_finish"] == pytest.approx(3 * 800 * 0.02 / 3600 * 1.875)
        assert job["estimate_total"] == pytest.approx(0.25 + job["estimate_to_finish"])
        assert await store.read(lambda db: costs.job(db, 99, 0.0)) is None
    finally:
        await store.close()
