"""Why a job waits: the sentence built from the scaler's decision (waits.explain, pure), the job's
answer (job_waiting) and the progress line that shows it in place of `ETA --`."""

from __future__ import annotations

import io
from typing import Any

from cloudtaskd.ctl.progress import ProgressDisplay, format_progress
from cloudtaskd.fleet.orchestrator.scaling import Decision, InstanceView, PoolView
from cloudtaskd.fleet.orchestrator.selection import Needs, Policy, rank
from cloudtaskd.fleet.orchestrator.waits import Limits, explain, job_waiting
from cloudtaskd.fleet.providers.base import Offer

LOCAL = Offer("local", "local", "localhost", False, 2, None, 0.0)
SPOT = Offer("aws", "m7i.large", "us-east-1a", True, 2, 8, 0.04, "us-east-1")
LIMITS = Limits(max_instances=8, global_room=7, provider_max={"local": 1, "aws": 4})


def view(offers: list[Offer], spare: dict[str, int], *instances: InstanceView, max_instances: int = 8,
         pool_id: int = 1) -> PoolView:
    return PoolView(pool_id, 4, max_instances, rank(offers, Needs(cpus_per_task=1), Policy()), dict(spare),
                    list(instances), provider_spare=dict(spare))


def other(*instances: InstanceView) -> PoolView:
    return PoolView(2, 0, 8, instances=list(instances))


def test_at_the_limit_it_names_the_limit_the_job_holding_it_and_what_becomes_of_it() -> None:
    pool = view([LOCAL], {"local": 0})
    busy = InstanceView("local-x", "running", 2, 1, None, provider="local")
    kw: dict[str, Any] = {"limits": LIMITS, "jobs_of": {2: [3]}}
    assert explain(pool, Decision(), holders=[pool, other(busy)], **kw) == (
        "waiting: instance limit 1 reached (local), held by job 3's worker, busy with its work;"
        " this job starts when it is idle")
    idle = InstanceView("local-x", "running", 2, 0, 0.0, provider="local")
    assert explain(pool, Decision(), holders=[pool, other(idle)], reclaimed=["local-x"], **kw) == (
        "waiting: instance limit 1 reached (local), held by job 3's worker; it is being drained")
    # The fleet-wide limit: every other worker's instance holds a place of it.
    fleet_full = Limits(max_instances=1, global_room=0, provider_max={"local": 4})
    assert explain(pool, Decision(), holders=[pool, other(busy)], limits=fleet_full, jobs_of={}) == (
        "waiting: instance limit 1 reached (scaling.max_instances), held by a worker with no active job,"
        " busy with its work; this job starts when it is idle")


def test_launching_no_offer_held_back_and_the_jobs_own_limit() -> None:
    pool = view([SPOT], {"aws": 4})
    launch = Decision(launch=tuple(pool.candidates[:1]) * 2)
    assert explain(pool, launch, holders=[pool], limits=LIMITS, jobs_of={}) == \
        "waiting: launching 2 instances (aws m7i.large spot)"
    assert explain(view([], {}), Decision(), holders=[], limits=LIMITS, jobs_of={},
                   no_offer="no offer has room for one task of 64 CPUs") == \
        "waiting: no offer fits (no offer has room for one task of 64 CPUs)"
    assert explain(pool, Decision(), holders=[pool], limits=LIMITS, jobs_of={},
                   held_back="the last 2 instance starts of this worker failed; the next launch in 4 s") == \
        "waiting: the last 2 instance starts of this worker failed; the next launch in 4 s"
    up = InstanceView("local-1", "running", 2, 0, 0.0, provider="local", offer_key=LOCAL.key)
    assert explain(view([LOCAL], {"local": 0}, up), Decision(), holders=[], limits=LIMITS, jobs_of={}) == \
        "waiting: 1 instance of this job's worker running (local); its agent takes work at its next request"
    shared = InstanceView("local-1", "running", 2, 4, None, provider="local", offer_key=LOCAL.key)
    assert explain(view([LOCAL], {"local": 0}, shared), Decision(), holders=[], limits=LIMITS, jobs_of={}) == \
        "waiting: 1 instance of this job's worker running (local), busy with tasks of its other jobs"
    gone = InstanceView("aws-1", "draining", 2, 0, None, provider="aws")
    capped = view([SPOT], {"aws": 3}, InstanceView("aws-2", "stopping", 2, 0, None, provider="aws"),
                  max_instances=1)
    assert explain(capped, Decision(), holders=[capped, other(gone)], limits=LIMITS, jobs_of={}) == \
        "waiting: 1 instance of this job's worker draining; a new one starts after"


def row(**kw: Any) -> dict[str, Any]:
    return {"n_queued": 5, "n_leased": 0, "state": "active", "state_reason": None, "pool_id": 1, **kw}


def test_a_job_carries_a_reason_only_while_work_is_queued_and_nothing_is_leased() -> None:
    def waits(pool_id: int) -> str:
        return "waiting: launching 1 instance (local)"

    assert job_waiting(row(), waits) == "waiting: launching 1 instance (local)"
    assert job_waiting(row(n_leased=1), waits) is None
    assert job_waiting(row(n_queued=0), waits) is None
    assert job_waiting(row(state="cancelled"), waits) is None
    assert job_waiting(row(state="paused", state_reason="paused: 1.02 USD spent, cap 1"), waits) == \
        "waiting: job paused: 1.02 USD spent, cap 1"
    assert job_waiting(row(), lambda pool_id: None).startswith("waiting: for the scaler's first look")


def test_the_progress_line_shows_the_reason_where_eta_was_and_writes_it_whole_once() -> None:
    reason = "waiting: instance limit 1 reached (local), held by job 3's worker; it is being drained"
    job = {"id": 4, "state": "active", "rate_per_s": 0.0, "instances": 0, "waiting": reason,
           "counts": {"total": 10, "queued": 10, "leased": 0, "succeeded": 0, "dead": 0, "cancelled": 0}}
    assert reason in format_progress(job, 200) and "ETA" not in format_progress(job, 200)
    line = format_progress(job, 80)  # a narrow terminal: the reason is cut, the bar stays
    assert len(line) <= 80 and line.startswith("[") and "waiting: instance limit" in line and "…" in line
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    display.update(job)
    display.update({**job, "waiting": reason}, force=True)
    assert out.getvalue().count(f"job 4 {reason}\n") == 1  # whole, above the line, once per kind
    display.update({**job, "waiting": "waiting: launching 1 instance (local)"}, force=True)
    assert "job 4 waiting: launching 1 instance (local)\n" in out.getvalue()
    # A log gets the whole reason in its line.
    plain = io.StringIO()
    ProgressDisplay(plain, tty=False).update(job)
    assert reason in plain.getvalue()
