"""Scaling decisions as a pure function: plain records in, plain decisions out.

The daemon, the tests and (later) the fleet simulator all call `decide` with the same inputs,
so what the tests prove is what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    state: str  # InstanceState value
    slots: int
    leases: int
    idle_since: float | None  # when it last held a lease (or started), None while busy


@dataclass(frozen=True, slots=True)
class PoolView:
    pool_id: int
    outstanding: int  # queued + leased + waiting to retry
    slots_per_instance: int
    max_instances: int  # the tightest of the jobs', the provider's and the global limit
    instances: list[InstanceView] = field(default_factory=list)
    last_work_at: float = 0.0  # when it last had outstanding work


@dataclass(frozen=True, slots=True)
class Decision:
    launch: int = 0
    drain: tuple[str, ...] = ()


ACTIVE = ("pending", "starting", "running")


def decide(pool: PoolView, now: float, idle_timeout_s: float) -> Decision:
    active = [i for i in pool.instances if i.state in ACTIVE]
    if pool.outstanding > 0:
        want = min(pool.max_instances, math.ceil(pool.outstanding / max(1, pool.slots_per_instance)))
        if len(active) < want:
            return Decision(launch=want - len(active))
        # More instances than the backlog needs: let idle ones go, never one holding leases.
        surplus = len(active) - want
        idle = sorted(
            (i for i in active if i.state == "running" and i.leases == 0 and i.idle_since is not None
             and now - i.idle_since >= idle_timeout_s),
            key=lambda i: i.idle_since or 0.0,
        )
        return Decision(drain=tuple(i.id for i in idle[:surplus]))
    if now - pool.last_work_at < idle_timeout_s:
        return Decision()
    return Decision(drain=tuple(i.id for i in active if i.state == "running" and i.leases == 0))
