"""Scaling decisions as a pure function: plain records in, plain decisions out.

The daemon, the tests and (later) the fleet simulator all call `decide` with the same inputs,
so what the tests prove is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    state: str  # InstanceState value
    slots: int
    leases: int
    idle_since: float | None  # when it last held a lease (or started), None while busy


@dataclass(frozen=True, slots=True)
class ProviderRoom:
    """A provider that could launch for this pool: how big its instance is, how many more it may start."""

    name: str
    slots: int
    room: int


@dataclass(frozen=True, slots=True)
class PoolView:
    pool_id: int
    outstanding: int  # queued + leased + waiting to retry
    max_instances: int  # the tightest of the jobs' and the global limit, for this pool
    providers: list[ProviderRoom] = field(default_factory=list)  # in order of preference
    instances: list[InstanceView] = field(default_factory=list)
    last_work_at: float = 0.0  # when it last had outstanding work


@dataclass(frozen=True, slots=True)
class Decision:
    launch: tuple[str, ...] = ()  # one provider name per instance to start
    drain: tuple[str, ...] = ()


ACTIVE = ("pending", "starting", "running")


def decide(pool: PoolView, now: float, idle_timeout_s: float) -> Decision:
    active = [i for i in pool.instances if i.state in ACTIVE]
    if pool.outstanding > 0:
        slots = sum(i.slots for i in active)
        count = len(active)
        rooms = {p.name: p.room for p in pool.providers}
        launch: list[str] = []
        # Enough slots for the whole backlog, within every limit, from the preferred providers first.
        while slots < pool.outstanding and count < pool.max_instances:
            provider = next((p for p in pool.providers if rooms[p.name] > 0), None)
            if provider is None:
                break
            launch.append(provider.name)
            rooms[provider.name] -= 1
            slots += provider.slots
            count += 1
        if launch:
            return Decision(launch=tuple(launch))
        # More instances than the backlog needs: let idle ones go, never one holding leases.
        idle = sorted(
            (i for i in active if i.state == "running" and i.leases == 0 and i.idle_since is not None
             and now - i.idle_since >= idle_timeout_s),
            key=lambda i: i.idle_since or 0.0,
        )
        drain = []
        for inst in idle:
            if slots - inst.slots < pool.outstanding:
                break
            slots -= inst.slots
            drain.append(inst.id)
        return Decision(drain=tuple(drain))
    if now - pool.last_work_at < idle_timeout_s:
        return Decision()
    return Decision(drain=tuple(i.id for i in active if i.state == "running" and i.leases == 0))
