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

HOUR = 3600.0


def fleet(db: sqlite3.Connection, now: float) -> dict[str, Any]:
    rows = db.execute(
        "SELECT provider, count(*) AS n, sum(price_per_hour * (coalesce(ended_at, ?) - created_at)) AS spent,"
        " sum(CASE WHEN state != 'stopped' THEN price_per_hour ELSE 0 END) AS rate"
        " FROM instances WHERE provider != 'external' GROUP BY provider", (now,)).fetchall()
    providers = {r["provider"]: {"instances": r["n"], "spent": (r["spent"] or 0.0) / HOUR,
                                 "rate_per_hour": r["rate"] or 0.0} for r in rows}
    return {"spent": sum(p["spent"] for p in providers.values()),
            "rate_per_hour": sum(p["rate_per_hour"] for p in providers.values()), "providers": providers}


def job(db: sqlite3.Connection, job_id: int, now: float) -> dict[str, Any] | None:
    j = db.execute("SELECT id, pool_id, n_queued, n_leased, n_failed, n_succeeded, n_dead FROM jobs WHERE id = ?",
                   (job_id,)).fetchone()
    if j is None:
        return None
    task = db.execute(
        "SELECT count(*) AS n, sum(t.duration_s) AS busy, sum(t.duration_s * i.price_per_hour / i.slots) AS spent"
        " FROM tasks t JOIN instances i ON i.id = t.instance_id"
        " WHERE t.job_id = ? AND t.finished_at IS NOT NULL AND t.duration_s IS NOT NULL", (job_id,)).fetchone()
    spent = (task["spent"] or 0.0) / HOUR
    # The pool's instances: what they cost, and how much of it was task time (any job's).
    pool = db.execute(
        "SELECT sum(price_per_hour * (coalesce(ended_at, ?) - created_at)) AS cost,"
        " sum(CASE WHEN state != 'stopped' THEN price_per_hour ELSE 0 END) AS rate,"
        " sum(CASE WHEN state != 'stopped' THEN slots ELSE 0 END) AS live_slots"
        " FROM instances WHERE pool_id = ?", (now, j["pool_id"])).fetchone()
    pool_task = db.execute(
        "SELECT sum(t.duration_s * i.price_per_hour / i.slots) AS spent FROM tasks t"
        " JOIN instances i ON i.id = t.instance_id WHERE i.pool_id = ? AND t.duration_s IS NOT NULL",
        (j["pool_id"],)).fetchone()
    pool_cost, pool_task_cost = (pool["cost"] or 0.0) / HOUR, (pool_task["spent"] or 0.0) / HOUR
    overhead = pool_cost / pool_task_cost if pool_task_cost > 0 else 1.0
    remaining = j["n_queued"] + j["n_leased"] + j["n_failed"]
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
