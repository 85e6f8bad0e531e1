"""Why a pool's queued work has no instance: one sentence from the scaler's last decision.

Pure: the reconciler hands in what it already has after `decide` and `reclaim` (the pool's view, the
decision, the other pools' instances, the limits), and the API shows the sentence on a job that has
queued tasks and none leased. Nothing here reads the store, so answering costs nothing per request.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudtaskd.fleet.orchestrator.scaling import ACTIVE, FREEING, Decision, InstanceView, PoolView

LOCAL_PROVIDERS = ("local", "ssh")  # one kind of machine each: the provider's name says it all


@dataclass(frozen=True, slots=True)
class Limits:
    max_instances: int  # scaling.max_instances, fleet-wide
    global_room: int  # more instances it allows now (<= 0: it binds)
    provider_max: Mapping[str, int] = field(default_factory=dict)  # each provider's own max_instances


def describe_offer(offer_key: str) -> str:
    """`aws/us-east-1a/m7i.large/spot` -> `aws m7i.large spot`; the local provider -> `local`."""
    parts = offer_key.split("/")
    if len(parts) != 4 or parts[0] in LOCAL_PROVIDERS:
        return parts[0]
    return f"{parts[0]} {parts[2]} {parts[3]}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _launching(view: PoolView, decision: Decision) -> str | None:
    keys = [c.offer.key for c in decision.launch]
    keys += [i.offer_key or i.provider for i in view.instances if i.state in ("pending", "starting")]
    if not keys:
        return None
    kinds = sorted({describe_offer(k) for k in keys})
    return f"launching {_count(len(keys), 'instance')} ({', '.join(kinds)})"


def _whose(pools: Sequence[int], jobs_of: Mapping[int, Sequence[int]]) -> str:
    jobs = sorted({j for p in pools for j in jobs_of.get(p, ())})
    if not jobs:
        return "a worker with no active job"
    if len(jobs) == 1:
        return f"job {jobs[0]}'s worker"
    names = ", ".join(str(j) for j in jobs[:-1]) + f" and {jobs[-1]}"
    return f"the workers of jobs {names}"


def _held(view: PoolView, holders: Sequence[PoolView], provider: str | None, reclaimed: Collection[str],
          jobs_of: Mapping[int, Sequence[int]]) -> str:
    """Who holds the places under a limit (provider None: the fleet-wide one), and what becomes of them."""
    held: list[tuple[int, InstanceView]] = [
        (p.pool_id, i) for p in holders if p.pool_id != view.pool_id for i in p.instances
        if i.state in (*ACTIVE, *FREEING) and (provider is None or i.provider == provider)]
    if not held:
        return ""
    text = f", held by {_whose([p for p, _ in held], jobs_of)}"
    freeing = [i for _, i in held if i.state in FREEING or i.id in reclaimed]
    it = "it is" if len(held) == 1 else "they are"
    if len(freeing) == len(held):
        return f"{text}; {it} being drained"
    if freeing:
        return f"{text}; {_count(len(freeing), 'instance')} of them being drained"
    if len(held) == 1:
        return f"{text}, busy with its work; this job starts when it is idle"
    return f"{text}, busy with their work; this job starts when one of them is idle"


def explain(view: PoolView, decision: Decision, *, holders: Sequence[PoolView], limits: Limits,
            jobs_of: Mapping[int, Sequence[int]], reclaimed: Collection[str] = (), held_back: str | None = None,
            no_offer: str | None = None) -> str:
    """Why this pool's queued work has nothing leased, as "waiting: …".

    held_back: why the reconciler does not launch now even if it could (a start back-off);
    no_offer: why the pool has no candidate at all (nothing fits, every offer backed off or blocked)."""
    launching = _launching(view, decision)
    if launching:
        return f"waiting: {launching}"
    running = [i for i in view.instances if i.state == "running"]
    if running and any(not i.at_risk for i in running):
        kinds = ", ".join(sorted({describe_offer(i.offer_key or i.provider) for i in running}))
        if any(i.leases for i in running):
            # Jobs of one worker share its instances: this one's tasks queue behind the others'.
            return (f"waiting: {_count(len(running), 'instance')} of this job's worker running ({kinds}),"
                    " busy with tasks of its other jobs")
        return (f"waiting: {_count(len(running), 'instance')} of this job's worker running ({kinds});"
                " its agent takes work at its next request")
    if held_back:
        return f"waiting: {held_back}"
    if not view.candidates:
        return f"waiting: no offer fits ({no_offer or 'none on sale'})"
    active = [i for i in view.instances if i.state in ACTIVE]
    if len(active) >= view.max_instances and view.max_instances < limits.max_instances:
        return f"waiting: the job's max_instances {view.max_instances} reached"
    if limits.global_room <= 0:
        return (f"waiting: instance limit {limits.max_instances} reached (scaling.max_instances)"
                + _held(view, holders, None, reclaimed, jobs_of))
    spare = view.provider_room if view.provider_spare is None else view.provider_spare
    full = [c.offer.provider for c in view.candidates if spare.get(c.offer.provider, 0) <= 0]
    if len(full) == len(view.candidates):
        provider = full[0]  # the best offer's provider: the place this job is waiting for
        limit = limits.provider_max.get(provider)
        return (f"waiting: instance limit {limit if limit is not None else '?'} reached ({provider})"
                + _held(view, holders, provider, reclaimed, jobs_of))
    if all((c.offer.price_per_hour or 0.0) > view.budget_per_hour for c in view.candidates):
        return ("waiting: scaling.max_cost_per_hour reached: the live fleet leaves"
                f" {max(0.0, view.budget_per_hour):.4g} USD/h, the cheapest offer costs"
                f" {min(c.offer.price_per_hour or 0.0 for c in view.candidates):.4g}")
    draining = [i for i in view.instances if i.state in FREEING]
    if draining:
        return f"waiting: {_count(len(draining), 'instance')} of this job's worker draining; a new one starts after"
    return "waiting: for the next scaling tick"


def job_waiting(row: Mapping[str, Any] | sqlite3.Row, waits: Callable[[int], str | None]) -> str | None:
    """Why a job with queued tasks has none leased: paused (its reason), else what the scaler last
    decided for its worker's pool. None while something of it runs, or nothing is queued."""
    if not row["n_queued"] or row["n_leased"]:
        return None
    if row["state"] == "paused":
        return f"waiting: job paused: {(row['state_reason'] or '').removeprefix('paused: ')}".rstrip(": ")
    if row["state"] != "active":
        return None
    return waits(row["pool_id"]) or "waiting: for the scaler's first look at this job (within scaling.tick_s)"
