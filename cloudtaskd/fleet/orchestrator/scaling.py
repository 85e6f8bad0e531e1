"""Scaling decisions as a pure function: plain records in, plain decisions out.

The daemon, the tests and the fleet simulator all call `decide` with the same inputs, so what the
tests prove is what runs.

The fleet follows the backlog: enough task slots to finish the outstanding work within
`target_s` given the observed task duration (without a target or an observation: a slot per
outstanding task), bought from the cheapest candidates first, within every instance limit and
the hourly budget. A task that has waited longer than `scale_up_after_s` adds an instance even
when the estimate says the fleet is big enough. Instances with an interruption coming (a
rebalance recommendation) do not count: their replacement starts now, from another offer where
one is on sale, and they are drained once it is up (never before: an at-risk instance still
works). Idle instances beyond the need are drained, the dearest first; one holding leases never is.

An instance runs one worker. When a pool with work waiting cannot buy an instance because an
instance limit binds, an idle instance of another worker with nothing queued is drained at once
(`reclaim`), not after `idle_timeout_s`: its place is worth more to the work that waits.

When the instance limit is what stops the fleet from covering the need, bigger instances finish
sooner for the same money: an offer up to SLOT_TOLERANCE dearer per slot-hour is then preferred
for its slots (the fleet simulator showed the cheapest-only choice filling the limit with small
instances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cloudtaskd.fleet.orchestrator.selection import Candidate
from cloudtaskd.fleet.providers.base import Offer


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    state: str  # InstanceState value
    slots: int
    leases: int
    idle_since: float | None  # when it last held a lease (or started), None while busy
    price_per_hour: float = 0.0
    at_risk: bool = False  # the cloud recommended replacing it (AWS rebalance): replaced, then drained
    provider: str = ""
    offer_key: str = ""


@dataclass(frozen=True, slots=True)
class PoolView:
    pool_id: int
    outstanding: int  # queued + leased + waiting to retry
    max_instances: int  # the tightest of the jobs' and the global limit, for this pool
    # Ranked offers this pool may buy (cheapest slot-hour first; backed-off offers already removed).
    candidates: list[Candidate] = field(default_factory=list)
    provider_room: dict[str, int] = field(default_factory=dict)  # more instances each provider may start
    instances: list[InstanceView] = field(default_factory=list)
    last_work_at: float = 0.0  # when it last had outstanding work
    mean_task_s: float | None = None  # observed task duration; None before the first result
    waiting_s: float = 0.0  # how long work has been queued with nothing of this pool booting
    budget_per_hour: float = math.inf  # what new instances may add to the hourly spend
    # The same within each provider's own limit only (the fleet-wide limit frees when any instance
    # stops); None: as provider_room.
    provider_spare: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Targets:
    idle_timeout_s: float
    target_s: float = 0.0  # 0: as fast as the limits allow
    scale_up_after_s: float = 0.0  # 0: off


@dataclass(frozen=True, slots=True)
class Decision:
    launch: tuple[Candidate, ...] = ()  # one per instance to start
    drain: tuple[str, ...] = ()


ACTIVE = ("pending", "starting", "running")
# When the instance limit binds, an offer this much dearer per slot-hour is taken for more slots.
SLOT_TOLERANCE = 0.10
# A running instance this many times dearer per slot-hour than the best offer on sale is replaced
# (on-demand is typically 3x spot), when the work left would keep the fleet busy this long
# (the fleet simulator: at 30 min a fleet hardly returned before the end; a swap costs ~3 min).
DISPLACE_RATIO = 1.5
DISPLACE_MIN_WORK_S = 900.0


def slots_needed(pool: PoolView, targets: Targets, capacity: int) -> int:
    need = pool.outstanding
    if targets.target_s > 0 and pool.mean_task_s is not None:
        need = min(need, math.ceil(pool.outstanding * pool.mean_task_s / targets.target_s))
    if targets.scale_up_after_s > 0 and pool.waiting_s > targets.scale_up_after_s and capacity >= need:
        need = capacity + 1  # work is waiting anyway: one instance more (decide adds exactly one)
    return need


def decide(pool: PoolView, now: float, targets: Targets) -> Decision:
    active = [i for i in pool.instances if i.state in ACTIVE]
    capacity = sum(i.slots for i in active if not i.at_risk)
    # Instances to replace: at risk of interruption, or far dearer than what can be bought now
    # (the on-demand fallback, once spot capacity is back). Replacements start first; the old
    # ones are drained once nothing boots (at once when no replacement can start).
    displaced = _displaced(pool, active, capacity)
    replace = {i.id for i in active if i.at_risk} | displaced
    capacity = sum(i.slots for i in active if i.id not in replace)
    if pool.outstanding > 0:
        need = slots_needed(pool, targets, capacity)
        count = len(active)
        room = dict(pool.provider_room)
        left = {c.offer.key: c.offer.available for c in pool.candidates if c.offer.available is not None}
        budget = pool.budget_per_hour
        # Work the kept instances cannot cover is bought from any offer; the place of a displaced
        # instance only from offers near the best (else a dearer kind would come back).
        ranked, cheap = _replacement_offers(pool, active)
        freed = sum(i.slots for i in active if i.id in displaced)
        launch: list[Candidate] = []
        for candidates, reserve in ((ranked, freed), (cheap, 0)):
            while capacity + reserve < need and count < pool.max_instances:
                eligible = [c for c in candidates if room.get(c.offer.provider, 0) > 0
                            and left.get(c.offer.key, 1) > 0 and _price(c.offer) <= budget]
                if not eligible:
                    break
                pick = eligible[0]
                if (pool.max_instances - count) * pick.slots < need - capacity:
                    # The instance limit binds: slots per instance now decide how fast the work
                    # goes. Among offers nearly as cheap per slot, take the biggest.
                    near = [c for c in eligible
                            if c.cost_per_slot_hour <= pick.cost_per_slot_hour * (1 + SLOT_TOLERANCE)]
                    pick = max(near, key=lambda c: c.slots)
                launch.append(pick)
                room[pick.offer.provider] -= 1
                if pick.offer.key in left:
                    left[pick.offer.key] -= 1
                budget -= _price(pick.offer)
                capacity += pick.slots
                count += 1
        if launch:
            return Decision(launch=tuple(launch))
        # Replaced instances stop taking leases once their replacements are up (draining lets
        # what runs finish); until then they keep working. An at-risk one with no replacement
        # (no room, nothing on sale) keeps working until the cloud takes it; a displaced one is
        # drained to make room for its replacement (_displaced checked it can then start).
        booting = any(i.state in ("pending", "starting") for i in active)
        covered = sum(i.slots for i in active if i.state == "running" and i.id not in replace) >= need
        old = () if booting else tuple(i.id for i in active if i.state == "running" and (
            i.id in displaced or (i.at_risk and covered)))
        return Decision(drain=old + _surplus(active, capacity, need, now, targets.idle_timeout_s))
    if now - pool.last_work_at < targets.idle_timeout_s:
        return Decision()
    return Decision(drain=tuple(i.id for i in active if i.state == "running" and i.leases == 0))


def _replacement_offers(pool: PoolView, active: list[InstanceView]) -> tuple[list[Candidate], list[Candidate]]:
    """(what new instances may be bought from, the part of it near the best offer).

    Not the offer an at-risk instance runs on (its rebalance says capacity there is going) unless
    nothing else is on sale. A displaced instance's place is only for offers near the best: while
    one still drains (it is DISPLACE_RATIO dearer than the best), nothing dearer is bought at all,
    or a dear offer of another cloud with room would take the place meant for the cheap kind."""
    ranked = pool.candidates
    risky = {i.offer_key for i in active if i.at_risk and i.offer_key}
    if risky:
        ranked = [c for c in ranked if c.offer.key not in risky] or ranked
    if not ranked:
        return ranked, ranked
    ceiling = ranked[0].cost_per_slot_hour * DISPLACE_RATIO
    cheap = [c for c in ranked if c.cost_per_slot_hour <= ceiling]
    if any(i.state == "draining" and i.price_per_hour / max(1, i.slots) > ceiling for i in pool.instances):
        return cheap, cheap
    return ranked, cheap


def _displaced(pool: PoolView, active: list[InstanceView], capacity: int) -> set[str]:
    """Running instances DISPLACE_RATIO dearer per slot-hour than the best offer on sale now, while
    the work left would keep the fleet busy for DISPLACE_MIN_WORK_S (a replacement's boot must pay
    for itself). This is how a fleet that fell back to on-demand returns to spot.

    An offer off back-off is not proof of capacity, so the switch ramps up like a slow start: while
    anything boots or drains, nothing more is displaced; then at most as many as already run at the cheap
    price (at least one). During a long stock-out that costs one instance's boot per back-off
    expiry, not the whole fleet's; once spot answers, the fleet moves over in doublings."""
    if pool.mean_task_s is None or capacity <= 0 or not pool.candidates:
        return set()
    if any(i.state in ("pending", "starting", "draining") for i in pool.instances):
        return set()  # a switch is under way (a draining one still holds its place under the limits)
    if pool.outstanding * pool.mean_task_s / capacity < DISPLACE_MIN_WORK_S:
        return set()
    on_sale = [c for c in pool.candidates if c.offer.available is None or c.offer.available > 0]
    if not on_sale:
        return set()
    best = on_sale[0]
    # Its provider must have room under its own limit, or get it from the drain (spot and
    # on-demand of one cloud); else a drained instance would come back as the same dear kind.
    spare = pool.provider_room if pool.provider_spare is None else pool.provider_spare
    room = spare.get(best.offer.provider, 0) > 0
    running = [i for i in active if i.state == "running" and not i.at_risk]
    dear = [i for i in running if i.price_per_hour / max(1, i.slots) > best.cost_per_slot_hour * DISPLACE_RATIO]
    # When the instance limit binds, slots per instance set the pace: a smaller replacement would
    # trade the saving for a slower job.
    if pool.outstanding > capacity + max(0, pool.max_instances - len(active)) * best.slots:
        dear = [i for i in dear if i.slots <= best.slots]
    cheap = len(running) - len(dear)
    dear = sorted((i for i in dear if room or i.provider == best.offer.provider),
                  key=lambda i: (-i.price_per_hour / max(1, i.slots), i.id))
    return {i.id for i in dear[:max(1, cheap)]}


def _price(offer: Offer) -> float:
    return offer.price_per_hour or 0.0


def _surplus(active: list[InstanceView], capacity: int, need: int, now: float,
             idle_timeout_s: float) -> tuple[str, ...]:
    """Idle instances the backlog does not need: the dearest slot first, then the longest idle."""
    idle = sorted(
        (i for i in active if i.state == "running" and not i.at_risk and i.leases == 0 and i.idle_since is not None
         and now - i.idle_since >= idle_timeout_s),
        key=lambda i: (-i.price_per_hour / max(1, i.slots), i.idle_since or 0.0),
    )
    drain = []
    for inst in idle:
        if capacity - inst.slots < need:
            continue  # a smaller one further down may still go
        capacity -= inst.slots
        drain.append(inst.id)
    return tuple(drain)


def waiting_work(pool: PoolView) -> int:
    """Tasks of the pool no instance holds: queued, or waiting out a retry's back-off."""
    return max(0, pool.outstanding - sum(i.leases for i in pool.instances))


FREEING = ("draining", "stopping")  # states whose place under the limits is on its way back


def reclaim(waiting: list[PoolView], holders: list[PoolView], global_room: int, now: float,
            targets: Targets) -> dict[int, tuple[str, ...]]:
    """Idle instances of other workers to drain now so that pools with work waiting get their places.

    waiting: the pools that may launch now (in the order to serve them); holders: every pool with
    live instances, active or not. An instance is taken only when it runs, holds no lease, and its
    own pool has nothing waiting; and only when its place lets the waiting pool buy an instance it
    cannot buy now (an instance limit or the hourly budget binds, not the job's own limit). Places
    already on their way back (draining or stopping instances of other pools) are counted first, so
    an instance is not drained twice over for the same need. Returns pool id -> instances drained
    for it."""
    idle = sorted(
        (i for p in holders if waiting_work(p) == 0 for i in p.instances
         if i.state == "running" and i.leases == 0),
        key=lambda i: (i.idle_since if i.idle_since is not None else now, -i.price_per_hour, i.id))
    taken: set[str] = set()
    out: dict[int, tuple[str, ...]] = {}
    if not idle:
        return out  # the usual case: no decide to run again
    for pool in waiting:
        if waiting_work(pool) == 0:
            continue
        freed = [i for p in holders if p.pool_id != pool.pool_id for i in p.instances if i.state in FREEING]
        launches = len(decide(_with_freed(pool, freed, global_room), now, targets).launch)
        mine: list[str] = []
        while True:
            # One try per provider is enough: idle places of one provider free the same limits.
            tried: set[str] = set()
            for inst in idle:
                if inst.id in taken or inst.provider in tried:
                    continue
                tried.add(inst.provider)
                more = len(decide(_with_freed(pool, [*freed, inst], global_room), now, targets).launch)
                if more > launches:
                    freed.append(inst)
                    taken.add(inst.id)
                    mine.append(inst.id)
                    launches = more
                    break
            else:
                break
        if mine:
            out[pool.pool_id] = tuple(mine)
    return out


def _with_freed(pool: PoolView, freed: list[InstanceView], global_room: int) -> PoolView:
    """The pool as it would be with these instances' places free under every limit they count against."""
    spare = dict(pool.provider_room if pool.provider_spare is None else pool.provider_spare)
    for inst in freed:
        spare[inst.provider] = spare.get(inst.provider, 0) + 1
    fleet = global_room + len(freed)
    return replace(pool, provider_spare=spare, provider_room={name: max(0, min(n, fleet)) for name, n in spare.items()},
                   budget_per_hour=pool.budget_per_hour + sum(i.price_per_hour for i in freed))
