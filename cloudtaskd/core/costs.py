"""What the fleet has cost and what a job will cost: read from the instance and task rows.

An instance costs its list price from the launch request until it ended (clouds bill the boot;
per-second billing is assumed). A job is charged the slot-time of its tasks: each finished
task's duration at the price of one slot of the instance that ran it. What the fleet spent beyond
that — booting, idling, interrupted work — is overhead, reported for the pool and shared out in
the estimate to finish by the ratio observed so far.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cloudtaskd.core.states import COUNTER, OPEN_TASK_STATES
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import instances, jobs, tasks
from cloudtaskd.errors import BadInput, CloudtaskError, no_job

HOUR = 3600.0


def fleet(db: sqlite3.Connection, now: float) -> dict[str, Any]:
    providers = {r["provider"]: {"instances": r["n"], "spent": (r["spent"] or 0.0) / HOUR,
                                 "rate_per_hour": r["rate"] or 0.0} for r in instances.spend_by_provider(db, now)}
    return {"spent": sum(p["spent"] for p in providers.values()),
            "rate_per_hour": sum(p["rate_per_hour"] for p in providers.values()), "providers": providers}


def job(db: sqlite3.Connection, job_id: int, now: float) -> dict[str, Any] | None:
    j = jobs.counters(db, job_id)
    if j is None:
        return None
    task = tasks.job_spend(db, job_id)
    spent = (task["spent"] or 0.0) / HOUR
    # The pool's instances: what they cost, and how much of it was task time (any job's).
    pool = instances.pool_cost(db, j["pool_id"], now)
    pool_cost, pool_task_cost = (pool["cost"] or 0.0) / HOUR, tasks.pool_task_spend(db, j["pool_id"]) / HOUR
    overhead = pool_cost / pool_task_cost if pool_task_cost > 0 else 1.0
    remaining = sum(j[COUNTER[s]] for s in OPEN_TASK_STATES)
    estimate = None
    if task["n"] and remaining:
        mean_s = (task["busy"] or 0.0) / task["n"]
        # A slot at what the live fleet charges now, else at what finished tasks paid on average.
        slot_rate = (pool["rate"] / pool["live_slots"]) if pool["live_slots"] else spent * HOUR / (task["busy"] or 1.0)
        estimate = remaining * mean_s * slot_rate / HOUR * overhead
    elif not remaining:
        estimate = 0.0
    return {"job": job_id, "spent": spent, "overhead_factor": overhead, "pool_spent": pool_cost,
            "remaining_tasks": remaining, "estimate_to_finish": estimate,
            "estimate_total": None if estimate is None else spent * overhead + estimate}


def pool_spend(db: sqlite3.Connection, pool_id: int, since: float, now: float) -> tuple[float, float]:
    """(USD spent by the pool's instances since `since`, USD per hour its live instances cost now)."""
    spend = instances.pool_spend_since(db, pool_id, since, now)
    return spend.price_seconds / HOUR, spend.rate_per_hour


def pause_over_budget(tx: Tx, horizon_s: float) -> list[tuple[int, int, str]]:
    """Pause every active job whose worker's instances, since the job began, would pass its
    `max_total_cost` within `horizon_s` at their current rate: before it is exceeded, since
    draining takes a while. Returns (job, pool, message) for each job paused now."""
    paused = []
    for row in jobs.active_capped(tx.db):
        job_id, pool_id, created, cap = row["id"], row["pool_id"], row["created_at"], row["max_total_cost"]
        spent, rate = pool_spend(tx.db, pool_id, created, tx.now)
        if spent + rate * horizon_s / HOUR < cap:
            continue
        message = (f"paused: ${spent:.4f} spent of max_total_cost ${cap:.4f} (at ${rate:.4f}/h it would pass it"
                   f" within {horizon_s:.0f} s); raise it to go on: cloudtaskctl resume {job_id} --max-total-cost USD")
        jobs.pause(tx, job_id, message, jobs.BUDGET)
        tx.event("job_paused", job_id=job_id, detail=message)
        paused.append((job_id, pool_id, message))
    return paused


def resume(tx: Tx, job_id: int, max_total_cost: float | None) -> int:
    """A paused job goes on; returns its pool. One held because its `cloudtaskctl run` is gone is the
    user's own from now on: no run owns it, so it is not held again (cloudtaskd/http/runs.py)."""
    row = jobs.budget(tx.db, job_id)
    if row is None:
        raise no_job(job_id)
    state, pool_id, created_at, old_cap = row["state"], row["pool_id"], row["created_at"], row["max_total_cost"]
    if state != jobs.PAUSED:
        raise CloudtaskError(f"job {job_id} is {state}, not paused")  # 409
    cap = max_total_cost if max_total_cost is not None else old_cap
    spent, _ = pool_spend(tx.db, pool_id, created_at, tx.now)
    if cap is not None and cap <= spent:
        raise BadInput(f"max_total_cost: ${cap:.4f} is not above the ${spent:.4f} already spent",
                       field="max_total_cost")
    jobs.resume_with_cap(tx, job_id, cap)
    tx.event("job_resumed", job_id=job_id, detail=f"max_total_cost={cap}")
    return int(pool_id)
