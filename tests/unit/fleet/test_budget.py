"""max_total_cost: a job is paused before its instances cost more, and resumed with a new cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.core import costs
from cloudtaskd.core.store import Store, Tx
from tests.integration.test_daemon_e2e import daemon, submit  # noqa: F401 - daemon is a fixture


def world(tx: Tx, cap: float, price: float) -> None:
    tx.db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/x', 0)")
    tx.db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, max_total_cost)"
                  " VALUES (1, 'j', 1, 'active', 1000, 3, ?)", (cap,))
    # Before the job began (not its spend), and since: 1 h at `price`, still running.
    tx.db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, price_per_hour, created_at,"
                  " state_changed_at, ended_at) VALUES ('old', 'aws', 1, 'stopped', 2, 'h', 5.0, 0, 0, 900)")
    tx.db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, price_per_hour, created_at,"
                  " state_changed_at) VALUES ('cur', 'aws', 1, 'running', 2, 'h', ?, 1000, 1000)", (price,))


async def test_a_job_is_paused_before_it_passes_its_cap(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.write(world, 1.0, 0.9)
        # At t = 1000 + 3600: 0.90 spent, 0.9 $/h; within 60 s it would reach 0.915 < 1.0: goes on.
        assert await store.write(costs.pause_over_budget, 60.0, now=4600.0) == []
        # At t = 1000 + 3960: 0.99 spent; within 60 s 1.005 >= 1.0: paused, with what to do.
        paused = await store.write(costs.pause_over_budget, 60.0, now=4960.0)
        assert [(j, p) for j, p, _ in paused] == [(1, 1)]
        row = await store.fetchone("SELECT state, state_reason FROM jobs WHERE id = 1")
        assert row is not None and row["state"] == "paused"
        assert "$0.9900 spent of max_total_cost $1.0000" in row["state_reason"]
        assert "cloudtaskctl resume 1 --max-total-cost" in row["state_reason"]
        assert await store.write(costs.pause_over_budget, 60.0, now=5000.0) == []  # paused once
        with pytest.raises(Exception, match="not above"):
            await store.write(costs.resume, 1, 0.5, now=5000.0)  # below what is spent: refused
        await store.write(costs.resume, 1, 2.0, now=5000.0)
        row = await store.fetchone("SELECT state, state_reason, max_total_cost FROM jobs WHERE id = 1")
        assert row is not None and (row["state"], row["state_reason"], row["max_total_cost"]) == ("active", None, 2.0)
    finally:
        await store.close()


async def test_resume_through_the_api_and_follow_stops_at_a_pause(daemon: Any) -> None:  # noqa: F811
    from cloudtaskd.ctl.commands import job_finished

    d, api = daemon
    worker = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(i, d):\n    return d\n"}
    job_id = await submit(api, worker, '{"id": 1, "data": 1}\n', max_total_cost=5.0)
    await d.store.write(lambda tx: tx.db.execute(
        "UPDATE jobs SET state = 'paused', state_reason = 'paused: test' WHERE id = ?", (job_id,)))
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "paused" and job["state_reason"] == "paused: test" and job_finished(job)
    status, body = await api.request("POST", f"/v1/jobs/{job_id}/resume", json={"max_total_cost": -1})
    assert status == 400 and body["error"]["field"] == "max_total_cost"
    status, job = await api.request("POST", f"/v1/jobs/{job_id}/resume", json={"max_total_cost": 9.0})
    assert status == 200 and job["state"] == "active" and job["max_total_cost"] == 9.0
    status, body = await api.request("POST", f"/v1/jobs/{job_id}/resume", json={})
    assert status == 409 and "not paused" in body["error"]["message"]
