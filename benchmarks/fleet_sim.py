"""Fleet simulator: the real scaling and selection code against simulated clouds on a virtual clock.

    python benchmarks/fleet_sim.py [--seeds 1,2,3,4,5] [--tasks 20000] [--mean-task-s 60]
        [--duration-dist lognormal|uniform|fixed] [--duration-sigma 0.5] [--max-instances 50]
        [--interruption-rate 0.05] [--max-cost-per-hour 0] [--tick-s 10] [--catalog FILE] [--json]

Each scaling tick does what the reconciler does: sync (a draining instance holding nothing is
terminated), build the PoolView (idle times, waiting time, offer back-off,
interruption rates by offer key), call the real `decide` on candidates from the real `rank`, and
apply the decision. Between ticks the clock jumps from event to event: boots, task completions,
spot interruptions. An agent holds up to slots + prefetch leases (the agent's default prefetch is
its slot count) and asks for more the moment one leaves; the prefetched ones wait for a free slot.
A spot interruption comes without notice: every task the instance held goes back to the front of
the queue (no attempt counted) and its work so far is lost. Billing runs per second from the launch
request to termination, boot included.

Prints, per seed, for the autoscaler and for a naive policy (the cheapest on-demand type, a fixed
fleet of --max-instances from t=0 to the last result, no budget): makespan, cost, the cost lower bound (all work at
the cheapest slot-hour of the allowed offers, spot at its list price), the ideal makespan for the
instance limit (all work spread over max_instances x the slots of the best offer), tasks lost,
interruptions, instances launched and launches refused for capacity.

A catalog file is a JSON list of offers, one per market:
    {"provider": "gcp", "machine_type": "e2-standard-8", "zone": "us-central1-a", "region": "us-central1",
     "spot": true, "cpus": 8, "memory_gb": 32, "price_per_hour": 0.08,
     "boot_s": [45, 90], "capacity": 40, "stockout_p": 0.05}
capacity (optional): how many may run at once, a launch beyond it fails like a CapacityError;
stockout_p (optional): the chance any one launch is refused anyway.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cloudtaskd.config import ScalingConfig  # noqa: E402
from cloudtaskd.fleet.orchestrator.backoff import OfferBackoff  # noqa: E402
from cloudtaskd.fleet.orchestrator.reconciler import RECENT_TASKS  # noqa: E402
from cloudtaskd.fleet.orchestrator.scaling import Decision, InstanceView, PoolView, Targets, decide  # noqa: E402
from cloudtaskd.fleet.orchestrator.selection import (  # noqa: E402
    Candidate,
    Needs,
    Policy,
    interruption_rate,
    rank,
)
from cloudtaskd.fleet.providers.base import Offer  # noqa: E402

DEFAULT_TASKS = 20_000
DEFAULT_MEAN_TASK_S = 60.0
DEFAULT_LOGNORMAL_SIGMA = 0.5  # p99/median ~ 3.2: a moderate tail
DEFAULT_MAX_INSTANCES = 50
DEFAULT_TICK_S = 10.0
DEFAULT_INTERRUPTION_RATE_PER_H = 0.05
MAX_VIRTUAL_S = 30 * 86400.0  # a run still going after this is stuck, not slow

# The targets.
TARGET_COST_OVER_LB = 0.15
TARGET_MAKESPAN_OVER_IDEAL = 0.20

_DEFAULTS = ScalingConfig()  # the daemon's own defaults, so the simulator runs what ships


@dataclass(frozen=True, slots=True)
class SimOffer:
    """An offer and how its simulated cloud behaves."""

    offer: Offer
    boot_s: tuple[float, float]  # uniform: launch request to the agent connected
    capacity: int | None = None  # at most this many at once; None: no limit
    stockout_p: float = 0.0  # chance one launch is refused for capacity anyway


def _o(provider: str, machine_type: str, zone: str, region: str, spot: bool, cpus: int, memory_gb: float,
       price_per_hour: float, boot_s: tuple[float, float], capacity: int | None = None,
       stockout_p: float = 0.0) -> SimOffer:
    return SimOffer(Offer(provider, machine_type, zone, spot, cpus, memory_gb, price_per_hour, region),
                    boot_s, capacity, stockout_p)


# List prices (USD/h, Linux, mid-2024, rounded); spot prices are typical recent values. The cheapest
# spot pool is capacity-limited and every spot market sometimes stocks out, as real ones do.
DEFAULT_CATALOG: tuple[SimOffer, ...] = (
    _o("aws", "c5.xlarge", "us-east-1a", "us-east-1", False, 4, 8, 0.170, (60, 100)),
    _o("aws", "c5.xlarge", "us-east-1a", "us-east-1", True, 4, 8, 0.068, (60, 100), stockout_p=0.02),
    _o("aws", "m5.2xlarge", "us-east-1a", "us-east-1", False, 8, 32, 0.384, (60, 100)),
    _o("aws", "m5.2xlarge", "us-east-1a", "us-east-1", True, 8, 32, 0.140, (60, 100), stockout_p=0.02),
    _o("gcp", "e2-standard-4", "us-central1-a", "us-central1", False, 4, 16, 0.134, (45, 90)),
    _o("gcp", "e2-standard-4", "us-central1-a", "us-central1", True, 4, 16, 0.040, (45, 90), stockout_p=0.05),
    _o("gcp", "e2-standard-8", "us-central1-a", "us-central1", False, 8, 32, 0.268, (45, 90)),
    _o("gcp", "e2-standard-8", "us-central1-a", "us-central1", True, 8, 32, 0.080, (45, 90), capacity=40,
       stockout_p=0.05),
    _o("azure", "Standard_D4s_v5", "eastus", "eastus", False, 4, 16, 0.192, (90, 150)),
    _o("azure", "Standard_D4s_v5", "eastus", "eastus", True, 4, 16, 0.045, (90, 150), stockout_p=0.03),
)


def load_catalog(path: Path) -> tuple[SimOffer, ...]:
    try:
        rows = json.loads(path.read_text())
        return tuple(
            _o(r["provider"], r["machine_type"], r["zone"], r.get("region", ""), bool(r["spot"]), int(r["cpus"]),
               float(r.get("memory_gb") or 0), float(r["price_per_hour"]),
               (float(r["boot_s"][0]), float(r["boot_s"][1])), r.get("capacity"), float(r.get("stockout_p", 0)))
            for r in rows)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SystemExit(f"{path}: not a catalog ({type(exc).__name__}: {exc}); see this script's docstring") from exc


def task_durations(n: int, dist: str, mean_s: float, rng: random.Random,
                   sigma: float = DEFAULT_LOGNORMAL_SIGMA) -> list[float]:
    if dist == "fixed":
        return [mean_s] * n
    if dist == "uniform":
        return [rng.uniform(0.5 * mean_s, 1.5 * mean_s) for _ in range(n)]
    if dist == "lognormal":
        mu = math.log(mean_s) - sigma * sigma / 2  # so the mean is mean_s
        return [rng.lognormvariate(mu, sigma) for _ in range(n)]
    raise ValueError(f"unknown duration distribution {dist!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    max_instances: int = DEFAULT_MAX_INSTANCES
    tick_s: float = DEFAULT_TICK_S
    idle_timeout_s: float = _DEFAULTS.idle_timeout_s
    target_s: float = _DEFAULTS.target_s
    scale_up_after_s: float = _DEFAULTS.scale_up_after_s
    max_cost_per_hour: float = _DEFAULTS.max_cost_per_hour  # 0: no limit
    interruption_rate_per_h: float = DEFAULT_INTERRUPTION_RATE_PER_H
    prefetch: int | None = None  # leases an agent holds beyond its slots; None: its slots, as the agent does
    spot_outage_s: float = 0.0  # every spot launch is refused for capacity until then (the fallback case)
    needs: Needs = field(default_factory=Needs)
    policy: Policy = field(default_factory=Policy)


@dataclass(slots=True)
class Result:
    policy: str
    tasks: int
    work_slot_h: float
    makespan_s: float
    cost: float
    lower_bound_cost: float
    ideal_makespan_s: float
    lost: int  # tasks not completed exactly once
    interruptions: int
    launched: int
    launch_failures: int
    requeued: int
    cost_by_offer: dict[str, float]

    @property
    def cost_over_lb(self) -> float:
        return self.cost / self.lower_bound_cost - 1.0

    @property
    def makespan_over_ideal(self) -> float:
        return self.makespan_s / self.ideal_makespan_s - 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_over_lb"] = self.cost_over_lb
        d["makespan_over_ideal"] = self.makespan_over_ideal
        return d


@dataclass(slots=True)
class _Instance:
    id: str
    cand: Candidate
    launched_at: float
    state: str = "starting"  # starting -> running -> draining -> stopped; stopped also when interrupted
    leases: set[int] = field(default_factory=set)  # every task it holds: running or prefetched
    ready: deque[int] = field(default_factory=deque)  # prefetched, waiting for a slot
    running: int = 0
    drained_at: float = 0.0
    stopped_at: float | None = None


# Event kinds, in the order they run when they fall on the same instant: what the cloud and the
# agents did comes before the reconciler's tick that looks at it.
_BOOTED, _DONE, _INTERRUPTED, _TICK = 0, 1, 2, 3


class Controller(Protocol):
    name: str

    def tick(self, sim: Sim, now: float) -> None: ...

    def all_done(self, sim: Sim, now: float) -> None: ...


class Sim:
    """The simulated clouds, agents and task queue; a Controller decides what to launch and drain."""

    def __init__(self, catalog: Sequence[SimOffer], durations_s: Sequence[float], settings: Settings,
                 rng: random.Random) -> None:
        self.catalog = {s.offer.key: s for s in catalog}
        self.offers = [s.offer for s in catalog]
        self.durations_s = list(durations_s)
        self.settings = settings
        self.rng = rng
        self.queue: deque[int] = deque(range(len(self.durations_s)))
        self.completions = [0] * len(self.durations_s)
        self.lease_serial = [0] * len(self.durations_s)  # a completion of an earlier lease is void
        self.completed = 0
        self.leased = 0
        self.requeued = 0
        self.recent_s: deque[float] = deque(maxlen=RECENT_TASKS)  # the reconciler's duration estimate
        self.instances: dict[str, _Instance] = {}  # launch order
        self.live_by_offer: dict[str, int] = defaultdict(int)
        self.interruptions: dict[str, int] = defaultdict(int)
        self.launch_failures = 0
        self.makespan_s = 0.0
        self._events: list[tuple[float, int, int, str, int, int]] = []
        self._seq = 0
        self._next_id = 0

    # ---- the event loop ----

    def push(self, at: float, kind: int, inst: str = "", task: int = -1, serial: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, kind, self._seq, inst, task, serial))

    def run(self, controller: Controller) -> None:
        self.push(0.0, _TICK)
        while self._events:
            now, kind, _, inst_id, task, serial = heapq.heappop(self._events)
            if now > MAX_VIRTUAL_S:
                raise RuntimeError(f"{controller.name}: {self.completed}/{len(self.durations_s)} tasks done "
                                   f"after {MAX_VIRTUAL_S:.0f} virtual seconds: the fleet is stuck")
            if kind == _TICK:
                if self.completed == len(self.durations_s) and not self.live():
                    return
                if not self.queue and not self.leased and self.completed < len(self.durations_s):
                    raise RuntimeError(f"{controller.name}: {len(self.durations_s) - self.completed} tasks lost: "
                                       "neither queued, leased nor completed")
                controller.tick(self, now)
                self.push(now + self.settings.tick_s, _TICK)
            elif kind == _BOOTED:
                inst = self.instances[inst_id]
                if inst.state == "starting":
                    inst.state = "running"
                    self.fill(inst, now)
            elif kind == _DONE:
                inst = self.instances[inst_id]
                if task not in inst.leases or self.lease_serial[task] != serial:
                    continue  # its instance was interrupted; the task went back to the queue
                inst.leases.discard(task)
                inst.running -= 1
                self.leased -= 1
                self.completions[task] += 1
                self.completed += 1
                self.recent_s.append(self.durations_s[task])
                self.makespan_s = now
                if self.completed == len(self.durations_s):
                    controller.all_done(self, now)
                elif inst.state == "running":
                    self.fill(inst, now)
                else:
                    self.start_ready(inst, now)
            elif kind == _INTERRUPTED:
                inst = self.instances[inst_id]
                if inst.state != "stopped":
                    self.interrupt(inst, now)

    # ---- what the clouds and the agents do ----

    def live(self) -> list[_Instance]:
        return [i for i in self.instances.values() if i.state != "stopped"]

    def fill(self, inst: _Instance, now: float) -> None:
        """A running agent leases queued tasks up to slots + prefetch and starts what its slots allow."""
        held = inst.cand.slots + (inst.cand.slots if self.settings.prefetch is None else self.settings.prefetch)
        while self.queue and len(inst.leases) < held:
            task = self.queue.popleft()
            self.lease_serial[task] += 1
            inst.leases.add(task)
            inst.ready.append(task)
            self.leased += 1
        self.start_ready(inst, now)

    def start_ready(self, inst: _Instance, now: float) -> None:
        while inst.ready and inst.running < inst.cand.slots:
            task = inst.ready.popleft()
            inst.running += 1
            self.push(now + self.durations_s[task], _DONE, inst.id, task, self.lease_serial[task])

    def launch(self, cand: Candidate, now: float) -> _Instance | None:
        """None: refused for capacity (nothing is started or billed)."""
        sim_offer = self.catalog[cand.offer.key]
        full = sim_offer.capacity is not None and self.live_by_offer[cand.offer.key] >= sim_offer.capacity
        full = full or (cand.offer.spot and now < self.settings.spot_outage_s)
        if full or (sim_offer.stockout_p > 0 and self.rng.random() < sim_offer.stockout_p):
            self.launch_failures += 1
            return None
        self._next_id += 1
        inst = _Instance(f"{cand.offer.provider}-{self._next_id}", cand, now)
        self.instances[inst.id] = inst
        self.live_by_offer[cand.offer.key] += 1
        self.push(now + self.rng.uniform(*sim_offer.boot_s), _BOOTED, inst.id)
        rate = self.settings.interruption_rate_per_h
        if cand.offer.spot and rate > 0:
            # Exponential lifetimes: interruptions form a Poisson process per instance-hour.
            self.push(now + self.rng.expovariate(rate / 3600.0), _INTERRUPTED, inst.id)
        return inst

    def hand_back_ready(self, inst: _Instance) -> None:
        """A draining agent gives back at once what it has not started (as agent/connection.py does)."""
        back = list(inst.ready)
        inst.ready.clear()
        inst.leases.difference_update(back)
        self.leased -= len(back)
        self.queue.extendleft(reversed(back))

    def interrupt(self, inst: _Instance, now: float) -> None:
        """The cloud takes a spot instance back: what it ran goes back to the queue, no attempt counted."""
        self.interruptions[inst.cand.offer.key] += 1
        back = sorted(inst.leases)
        self.requeued += len(back)
        self.leased -= len(back)
        inst.leases.clear()
        inst.ready.clear()
        inst.running = 0
        self.queue.extendleft(reversed(back))  # requeued at once, ahead of the rest as they were
        self.stop(inst, now)
        for other in self.instances.values():
            if other.state == "running" and self.queue:
                self.fill(other, now)

    def stop(self, inst: _Instance, now: float) -> None:
        inst.state = "stopped"
        inst.stopped_at = now
        self.live_by_offer[inst.cand.offer.key] -= 1

    def instance_hours(self, key: str, now: float) -> float:
        return sum(((i.stopped_at if i.stopped_at is not None else now) - i.launched_at) / 3600.0
                   for i in self.instances.values() if i.cand.offer.key == key)

    # ---- figures ----

    def result(self, name: str) -> Result:
        cost_by_offer: dict[str, float] = defaultdict(float)
        for i in self.instances.values():
            assert i.stopped_at is not None, f"{i.id} still running at the end"
            hours = (i.stopped_at - i.launched_at) / 3600.0  # billed from the request, boot included
            cost_by_offer[i.cand.offer.key] += (i.cand.offer.price_per_hour or 0.0) * hours
        best = cheapest(self.offers, self.settings)
        work_s = sum(self.durations_s)
        return Result(
            policy=name,
            tasks=len(self.durations_s),
            work_slot_h=work_s / 3600.0,
            makespan_s=self.makespan_s,
            cost=sum(cost_by_offer.values()),
            lower_bound_cost=work_s / 3600.0 * best.cost_per_slot_hour,
            ideal_makespan_s=work_s / (self.settings.max_instances * best.slots),
            lost=sum(1 for c in self.completions if c != 1),
            interruptions=sum(self.interruptions.values()),
            launched=len(self.instances),
            launch_failures=self.launch_failures,
            requeued=self.requeued,
            cost_by_offer=dict(sorted(cost_by_offer.items(), key=lambda kv: -kv[1])),
        )


def cheapest(offers: Sequence[Offer], settings: Settings) -> Candidate:
    """The allowed offer with the cheapest slot-hour at list price (no interruption weighting)."""
    ranked = rank(offers, settings.needs, settings.policy, rates={o.key: 0.0 for o in offers})
    if not ranked:
        raise SystemExit("no allowed offer fits a task")
    return ranked[0]


class Autoscaler:
    """The reconciler's tick on simulated state: sync, PoolView, the real decide, apply."""

    name = "autoscale"

    def __init__(self) -> None:
        self._idle_since: dict[str, float] = {}
        self._last_work = 0.0
        self._waiting_since: float | None = None
        self.backoff = OfferBackoff()

    def tick(self, sim: Sim, now: float) -> None:
        s = sim.settings
        # Sync, as the reconciler: a draining instance holding nothing is terminated (its agent has
        # handed back or finished everything and left).
        for inst in sim.live():
            if inst.state == "draining" and not inst.leases:
                sim.stop(inst, now)
                self._idle_since.pop(inst.id, None)
        decision = decide(self.pool_view(sim, now), now, Targets(s.idle_timeout_s, s.target_s, s.scale_up_after_s))
        self.apply(sim, decision, now)

    def pool_view(self, sim: Sim, now: float) -> PoolView:
        s = sim.settings
        live = sim.live()
        views = []
        spend = 0.0
        per_provider: dict[str, int] = defaultdict(int)
        for inst in live:
            per_provider[inst.cand.offer.provider] += 1
            spend += inst.cand.offer.price_per_hour or 0.0
            n = len(inst.leases)
            if n:
                self._idle_since.pop(inst.id, None)
            elif inst.state == "running":
                self._idle_since.setdefault(inst.id, now)
            idle_since = None if n else self._idle_since.get(inst.id)
            views.append(InstanceView(inst.id, inst.state, inst.cand.slots, n, idle_since,
                                      inst.cand.offer.price_per_hour or 0.0, provider=inst.cand.offer.provider))
        global_room = s.max_instances - len(live)
        providers = {o.provider for o in sim.offers}
        # No per-provider limits are simulated: each provider may take the whole global limit.
        spare = {p: max(0, s.max_instances - per_provider[p]) for p in providers}
        room = {p: min(spare[p], max(0, global_room)) for p in providers}
        outstanding = len(sim.queue) + sim.leased
        if outstanding:
            self._last_work = now
        booting = any(i.state == "starting" for i in live)
        if sim.queue and not booting:
            self._waiting_since = now if self._waiting_since is None else self._waiting_since
        else:
            self._waiting_since = None
        return PoolView(
            pool_id=1,
            outstanding=outstanding,
            max_instances=s.max_instances,
            candidates=self.candidates(sim, now),
            provider_room=room,
            provider_spare=spare,
            instances=views,
            last_work_at=self._last_work,
            mean_task_s=statistics.fmean(sim.recent_s) if sim.recent_s else None,
            waiting_s=now - (self._waiting_since if self._waiting_since is not None else now),
            budget_per_hour=s.max_cost_per_hour - spend if s.max_cost_per_hour > 0 else math.inf,
        )

    def candidates(self, sim: Sim, now: float) -> list[Candidate]:
        """Ranked with the interruption rates observed so far; backed-off offers left out."""
        rates = {o.key: interruption_rate(sim.interruptions[o.key], sim.instance_hours(o.key, now), spot=True)
                 for o in sim.offers if o.spot}
        ranked = rank(sim.offers, sim.settings.needs, sim.settings.policy, rates=rates)
        return [c for c in ranked if not self.backoff.blocked(c.offer.key, now)]

    def apply(self, sim: Sim, decision: Decision, now: float) -> None:
        for inst_id in decision.drain:
            inst = sim.instances[inst_id]
            if inst.state == "running":
                inst.state = "draining"
                inst.drained_at = now
                sim.hand_back_ready(inst)
        for cand in decision.launch:
            if sim.launch(cand, now) is None:
                self.backoff.refused(cand.offer.key, now)  # the reconciler's own back-off
            else:
                self.backoff.succeeded(cand.offer.key)

    def all_done(self, sim: Sim, now: float) -> None:
        pass  # idle instances drain through decide, as in the daemon


class FixedFleet:
    """The naive policy: max_instances of the cheapest on-demand type from t=0 until the last task ends."""

    name = "naive"

    def __init__(self, sim: Sim) -> None:
        od = replace(sim.settings.policy, spot=False, on_demand=True)
        ranked = rank(sim.offers, sim.settings.needs, od)
        if not ranked:
            raise SystemExit("naive policy: no on-demand offer fits a task")
        self.cand = ranked[0]

    def tick(self, sim: Sim, now: float) -> None:
        if sim.completed == len(sim.durations_s):
            return
        for _ in range(sim.settings.max_instances - len(sim.live())):
            sim.launch(self.cand, now)  # refused ones are tried again next tick

    def all_done(self, sim: Sim, now: float) -> None:
        for inst in sim.live():
            sim.stop(inst, now)


def simulate(catalog: Sequence[SimOffer], durations_s: Sequence[float], settings: Settings, seed: int,
             *, naive: bool = False) -> Result:
    sim = Sim(catalog, durations_s, settings, random.Random(seed))
    controller: Controller = FixedFleet(sim) if naive else Autoscaler()
    sim.run(controller)
    return sim.result(controller.name)


# ---- command line ----

def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _row(seed: int | str, r: Result) -> str:
    return (f"{seed!s:>5} {r.policy:<9} {r.makespan_s:>8.0f} s {r.ideal_makespan_s:>7.0f} s"
            f" {_pct(r.makespan_over_ideal):>8}"
            f" {r.cost:>8.2f} $ {r.lower_bound_cost:>6.2f} $ {_pct(r.cost_over_lb):>8} {r.lost:>5}"
            f" {r.interruptions:>6} {r.requeued:>8} {r.launched:>8} {r.launch_failures:>8}")


HEADER = (f"{'seed':>5} {'policy':<9} {'makespan':>10} {'ideal':>9} {'vs ideal':>8} {'cost':>10} {'LB':>8}"
          f" {'vs LB':>8} {'lost':>5} {'intr':>6} {'requeued':>8} {'launched':>8} {'cap.fail':>8}")


def summary(results: dict[int, tuple[Result, Result]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for idx, name in enumerate(("autoscale", "naive")):
        rs = [pair[idx] for pair in results.values()]
        out[name] = {
            "cost_over_lb_mean": statistics.fmean(r.cost_over_lb for r in rs),
            "cost_over_lb_worst": max(r.cost_over_lb for r in rs),
            "makespan_over_ideal_mean": statistics.fmean(r.makespan_over_ideal for r in rs),
            "makespan_over_ideal_worst": max(r.makespan_over_ideal for r in rs),
            "lost": sum(r.lost for r in rs),
            "interruptions": sum(r.interruptions for r in rs),
            "launch_failures": sum(r.launch_failures for r in rs),
        }
    auto = out["autoscale"]
    out["targets"] = {
        "cost_within_15pct_of_lb": auto["cost_over_lb_worst"] <= TARGET_COST_OVER_LB,
        "makespan_within_20pct_of_ideal": auto["makespan_over_ideal_worst"] <= TARGET_MAKESPAN_OVER_IDEAL,
        "no_task_lost": auto["lost"] == 0 and out["naive"]["lost"] == 0,
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds")
    ap.add_argument("--tasks", type=int, default=DEFAULT_TASKS)
    ap.add_argument("--duration-dist", choices=("lognormal", "uniform", "fixed"), default="lognormal")
    ap.add_argument("--mean-task-s", type=float, default=DEFAULT_MEAN_TASK_S)
    ap.add_argument("--duration-sigma", type=float, default=DEFAULT_LOGNORMAL_SIGMA, help="lognormal shape")
    ap.add_argument("--cpus-per-task", type=float, default=1.0)
    ap.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES)
    ap.add_argument("--tick-s", type=float, default=DEFAULT_TICK_S)
    ap.add_argument("--idle-timeout-s", type=float, default=_DEFAULTS.idle_timeout_s)
    ap.add_argument("--target-s", type=float, default=_DEFAULTS.target_s)
    ap.add_argument("--scale-up-after-s", type=float, default=_DEFAULTS.scale_up_after_s)
    ap.add_argument("--max-cost-per-hour", type=float, default=0.0, help="0: no limit")
    ap.add_argument("--interruption-rate", type=float, default=DEFAULT_INTERRUPTION_RATE_PER_H,
                    help="spot interruptions per instance-hour")
    ap.add_argument("--no-spot", action="store_true", help="the job allows on-demand only")
    ap.add_argument("--spot-outage-s", type=float, default=0.0,
                    help="no spot capacity anywhere until this time: the fleet falls back to on-demand")
    ap.add_argument("--catalog", type=Path, help="JSON list of offers (see the docstring)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    catalog = load_catalog(args.catalog) if args.catalog else DEFAULT_CATALOG
    settings = Settings(
        max_instances=args.max_instances, tick_s=args.tick_s, idle_timeout_s=args.idle_timeout_s,
        target_s=args.target_s, scale_up_after_s=args.scale_up_after_s, max_cost_per_hour=args.max_cost_per_hour,
        interruption_rate_per_h=args.interruption_rate, needs=Needs(cpus_per_task=args.cpus_per_task),
        policy=Policy(spot=not args.no_spot), spot_outage_s=args.spot_outage_s,
    )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    best = cheapest([s.offer for s in catalog], settings)
    if not args.json:
        print(f"fleet_sim: {args.tasks} tasks ({args.duration_dist}, mean {args.mean_task_s:g} s), "
              f"{args.cpus_per_task:g} cpu/task, max {args.max_instances} instances, "
              f"{args.interruption_rate:g} interruptions/spot instance-h, tick {args.tick_s:g} s")
        print(f"lower bound price: {best.offer.key} at {best.cost_per_slot_hour:.4f} $/slot-h; "
              f"ideal makespan: work / ({args.max_instances} x {best.slots} slots)")
        print(HEADER)
    results: dict[int, tuple[Result, Result]] = {}
    for seed in seeds:
        durations = task_durations(args.tasks, args.duration_dist, args.mean_task_s, random.Random(seed),
                                   args.duration_sigma)
        pair = (simulate(catalog, durations, settings, seed), simulate(catalog, durations, settings, seed, naive=True))
        results[seed] = pair
        if not args.json:
            for r in pair:
                print(_row(seed, r))
    summ = summary(results)
    if args.json:
        print(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                          "seeds": {str(k): [r.to_dict() for r in v] for k, v in results.items()},
                          "summary": summ}, indent=2))
    else:
        print(f"\noverall ({len(seeds)} seeds):")
        for name in ("autoscale", "naive"):
            s = summ[name]
            print(f"  {name:<9} cost vs LB mean {_pct(s['cost_over_lb_mean'])} worst {_pct(s['cost_over_lb_worst'])};"
                  f" makespan vs ideal mean {_pct(s['makespan_over_ideal_mean'])}"
                  f" worst {_pct(s['makespan_over_ideal_worst'])}; lost {s['lost']};"
                  f" interruptions {s['interruptions']}; capacity refusals {s['launch_failures']}")
        spend: dict[str, float] = defaultdict(float)
        for auto, _ in results.values():
            for key, cost in auto.cost_by_offer.items():
                spend[key] += cost
        total = sum(spend.values()) or 1.0
        print("  autoscale spend by offer: " + ", ".join(
            f"{k} {v / total * 100:.0f}%" for k, v in sorted(spend.items(), key=lambda kv: -kv[1])))
        t = summ["targets"]
        verdict = {k: "PASS" if v else "FAIL" for k, v in t.items()}
        print(f"targets (autoscale, worst seed): cost <= +{TARGET_COST_OVER_LB:.0%} of LB:"
              f" {verdict['cost_within_15pct_of_lb']}; makespan <= +{TARGET_MAKESPAN_OVER_IDEAL:.0%} of ideal:"
              f" {verdict['makespan_within_20pct_of_ideal']}; no task lost: {verdict['no_task_lost']}")
    return 0 if summ["targets"]["no_task_lost"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
