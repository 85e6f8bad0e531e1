"""Which offer to buy: candidates ranked by what a task-slot-hour really costs. Pure functions.

The price of an instance is divided by how many tasks fit on it at once (by CPU, memory and GPU,
whichever runs out first). A spot price is then weighed by the interruption rate seen for that
type and zone: each interruption wastes the replacement's boot time and, on average, half a
task's work, so only a fraction `1 - rate * lost_hours` of what is paid does useful work.

The daemon, the tests, `cloudtaskctl prices` and the fleet simulator all call `rank`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudtaskd.fleet.providers.base import Offer

# A spot offer with no history is assumed to be interrupted this often (per instance-hour);
# observations replace the assumption as they accumulate (PRIOR_HOURS of weight).
PRIOR_SPOT_RATE_PER_H = 0.05
PRIOR_HOURS = 10.0
MIN_USEFUL_FRACTION = 0.05  # a rate so high that almost nothing finishes still ranks, last


@dataclass(frozen=True, slots=True)
class Needs:
    """What one task takes on an instance."""

    cpus_per_task: float = 1.0
    memory_per_task_mib: int | None = None
    gpus_per_task: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """What a job allows. Empty tuples allow everything."""

    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    spot: bool = True  # spot offers may be used
    on_demand: bool = True  # on-demand offers may be used (with spot: the fallback when spot has no capacity)
    max_price_per_hour: float | None = None  # per instance


    def to_dict(self) -> dict[str, Any]:
        return {"providers": list(self.providers), "regions": list(self.regions), "spot": self.spot,
                "on_demand": self.on_demand, "max_price_per_hour": self.max_price_per_hour}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Policy:
        price = raw.get("max_price_per_hour")
        return cls(tuple(raw.get("providers") or ()), tuple(raw.get("regions") or ()), bool(raw.get("spot", True)),
                   bool(raw.get("on_demand", True)), float(price) if price is not None else None)


def combine(policies: Iterable[Policy]) -> Policy:
    """What every one of several jobs allows (they share a pool, hence its instances)."""
    out = Policy()
    for p in policies:
        providers = tuple(x for x in out.providers if x in p.providers) if out.providers and p.providers \
            else out.providers or p.providers
        regions = tuple(x for x in out.regions if x in p.regions) if out.regions and p.regions \
            else out.regions or p.regions
        prices = [x for x in (out.max_price_per_hour, p.max_price_per_hour) if x is not None]
        disjoint = (out.providers and p.providers and not providers) or (out.regions and p.regions and not regions)
        # Nothing in common: no market is allowed at all (an empty tuple would mean "any").
        out = Policy(providers, regions, out.spot and p.spot and not disjoint,
                     out.on_demand and p.on_demand and not disjoint, min(prices) if prices else None)
    return out


@dataclass(frozen=True, slots=True)
class Candidate:
    offer: Offer
    slots: int
    effective_per_hour: float  # the price weighed by interruptions (= the price for on-demand)

    @property
    def cost_per_slot_hour(self) -> float:
        return self.effective_per_hour / self.slots


def slots_on(offer: Offer, needs: Needs) -> int:
    """How many tasks run at once on one instance of this offer (0: a task does not fit)."""
    slots = math.floor(offer.cpus / needs.cpus_per_task + 1e-9)
    if needs.memory_per_task_mib and offer.memory_gb is not None:
        slots = min(slots, math.floor(offer.memory_gb * 1024 / needs.memory_per_task_mib + 1e-9))
    if needs.gpus_per_task:
        slots = min(slots, offer.gpus // needs.gpus_per_task)
    return max(0, slots)


def interruption_rate(interruptions: int, instance_hours: float, *, spot: bool) -> float:
    """Observed interruptions per instance-hour, smoothed by the prior (on-demand: 0)."""
    if not spot:
        return 0.0
    return (interruptions + PRIOR_SPOT_RATE_PER_H * PRIOR_HOURS) / (instance_hours + PRIOR_HOURS)


def rate_of(offer: Offer, rates: Mapping[str, float]) -> float:
    """The interruption rate to expect of an offer: observed, else the prior (on-demand: 0)."""
    return rates.get(offer.key, interruption_rate(0, 0.0, spot=offer.spot))


def effective_price(price: float, rate_per_h: float, lost_h: float) -> float:
    return price / max(MIN_USEFUL_FRACTION, 1.0 - rate_per_h * lost_h)


def allowed(offer: Offer, policy: Policy) -> bool:
    if policy.providers and offer.provider not in policy.providers:
        return False
    if policy.regions and offer.region not in policy.regions and offer.zone not in policy.regions:
        return False
    if not (policy.spot if offer.spot else policy.on_demand):
        return False
    return not (policy.max_price_per_hour is not None and offer.price_per_hour is not None
                and offer.price_per_hour > policy.max_price_per_hour)


def rank(offers: Iterable[Offer], needs: Needs, policy: Policy, *, rates: Mapping[str, float] | None = None,
         lost_h: float = 0.1) -> list[Candidate]:
    """Allowed offers a task fits on, cheapest task-slot-hour first.

    rates: interruptions per instance-hour by offer key (missing: the prior for spot, 0 for
    on-demand). lost_h: hours of work one interruption wastes (boot time + half a task). Offers
    whose price is unknown (no catalog yet) rank after every priced one, in the order given, so a
    provider's configured preference still holds.
    """
    rates = rates or {}
    priced: list[Candidate] = []
    unpriced: list[Candidate] = []
    for offer in offers:
        slots = slots_on(offer, needs)
        if slots < 1 or not allowed(offer, policy):
            continue
        if offer.price_per_hour is None:
            unpriced.append(Candidate(offer, slots, math.inf))
            continue
        priced.append(Candidate(offer, slots, effective_price(offer.price_per_hour, rate_of(offer, rates), lost_h)))
    # Ties: more slots per instance first (fewer boots, fewer SSH bootstraps), then a stable name.
    priced.sort(key=lambda c: (c.cost_per_slot_hour, -c.slots, c.offer.key))
    return priced + unpriced


def why_no_offer(offers: list[Offer], needs: Needs, policy: Policy) -> str:
    """The first filter that left nothing, in the order a user would check them."""
    if not offers:
        return "no provider is enabled that has offers (local disabled, no ssh host, no cloud with a catalog)"
    markets = [o for o in offers if (o.spot and policy.spot) or (not o.spot and policy.on_demand)]
    if not markets:
        if policy.spot and not policy.on_demand:
            return ("no enabled provider sells spot capacity (local and ssh hosts are on-demand): enable a cloud"
                    " with spot in the config, or leave out --spot")
        return "no enabled provider sells on-demand capacity"
    if policy.providers:
        markets = [o for o in markets if o.provider in policy.providers]
    if policy.regions:
        markets = [o for o in markets if o.region in policy.regions or o.zone in policy.regions]
    if not markets:
        return "no offer from the providers and regions asked for"
    if policy.max_price_per_hour is not None:
        priced = [o for o in markets if o.price_per_hour is None or o.price_per_hour <= policy.max_price_per_hour]
        if not priced:
            return f"every offer costs more than {policy.max_price_per_hour:g} USD per hour"
    size = f"{needs.cpus_per_task:g} CPUs"
    if needs.memory_per_task_mib:
        size += f", {needs.memory_per_task_mib} MiB"
    if needs.gpus_per_task:
        size += f", {needs.gpus_per_task} GPUs"
    return f"no offer has room for one task of {size}"
