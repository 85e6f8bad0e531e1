"""Scaling decisions on small cases checked by hand (the pure `decide`)."""

from __future__ import annotations

from cloudtaskd.fleet.orchestrator.scaling import Decision, InstanceView, PoolView, Targets, decide, reclaim
from cloudtaskd.fleet.orchestrator.selection import Needs, Policy, rank
from cloudtaskd.fleet.providers.base import Offer

LOCAL = Offer("local", "local", "localhost", False, 2, None, 0.0)
SPOT = Offer("aws", "c5.xlarge", "us-east-1a", True, 4, 8, 0.068, "us-east-1")
ON_DEMAND = Offer("aws", "c5.xlarge", "us-east-1a", False, 4, 8, 0.17, "us-east-1")
GCP = Offer("gcp", "e2-standard-4", "us-central1-a", True, 4, 16, 0.04, "us-central1")
T = Targets(idle_timeout_s=60)


def pool(outstanding: int, offers: list[Offer], room: dict[str, int], *, instances: list[InstanceView] | None = None,
         max_instances: int = 100, **kw: object) -> PoolView:
    return PoolView(1, outstanding, max_instances, rank(offers, Needs(cpus_per_task=1), Policy()), room,
                    instances or [], **kw)  # type: ignore[arg-type]


def launched(d: Decision) -> list[str]:
    return [c.offer.key for c in d.launch]


def test_backlog_is_covered_from_the_cheapest_slot_hour_first() -> None:
    # 18 tasks: local (free, 2 slots, room 1), then gcp spot (0.01/slot-h) x2, then aws spot (0.017) x2.
    d = decide(pool(18, [SPOT, GCP, LOCAL, ON_DEMAND], {"local": 1, "gcp": 2, "aws": 5}), 0.0, T)
    assert launched(d) == [LOCAL.key, GCP.key, GCP.key, SPOT.key, SPOT.key]
    assert sum(c.slots for c in d.launch) == 18  # exactly enough: 2 + 4 + 4 + 4 + 4


def test_limits_instances_and_budget() -> None:
    assert len(decide(pool(100, [SPOT], {"aws": 50}, max_instances=3), 0.0, T).launch) == 3
    assert len(decide(pool(100, [SPOT], {"aws": 2}), 0.0, T).launch) == 2
    # 0.25 $/h of room: three 0.068 spot instances (0.204); a fourth would pass it.
    assert len(decide(pool(100, [SPOT], {"aws": 50}, budget_per_hour=0.25), 0.0, T).launch) == 3
    running = [InstanceView(f"aws-{i}", "running", 4, 4, None, 0.068) for i in range(3)]
    d = decide(pool(100, [SPOT], {"aws": 47}, instances=running, max_instances=5), 0.0, T)
    assert len(d.launch) == 2  # 3 running + 2 = the pool's limit


def test_an_offer_that_is_used_up_falls_through_to_the_next() -> None:
    host_a = Offer("ssh", "host", "10.0.0.1:22", False, 2, None, 0.0, available=1)
    host_b = Offer("ssh", "host", "10.0.0.2:22", False, 2, None, 0.0, available=1)
    d = decide(pool(10, [host_a, host_b, SPOT], {"ssh": 2, "aws": 5}), 0.0, T)
    assert launched(d) == [host_a.key, host_b.key, SPOT.key, SPOT.key]


def test_target_time_sizes_the_fleet_from_the_observed_duration() -> None:
    # 1000 tasks of 2 s to finish in 100 s: 20 slots = 5 instances of 4.
    d = decide(pool(1000, [SPOT], {"aws": 50}, mean_task_s=2.0), 0.0, Targets(60, target_s=100))
    assert len(d.launch) == 5
    # Before any task has finished there is no estimate: a slot per task, within the limits.
    assert len(decide(pool(1000, [SPOT], {"aws": 50}), 0.0, Targets(60, target_s=100)).launch) == 50


def test_waiting_work_adds_one_instance_beyond_the_estimate() -> None:
    running = [InstanceView("aws-1", "running", 4, 4, None, 0.068)]
    targets = Targets(60, target_s=3600, scale_up_after_s=30)
    # Estimate: 40 tasks x 10 s / 3600 s -> 1 slot; the fleet has 4. Waited 10 s: nothing.
    assert decide(pool(40, [SPOT], {"aws": 5}, instances=running, mean_task_s=10, waiting_s=10), 0, targets) \
        == Decision()
    d = decide(pool(40, [SPOT], {"aws": 5}, instances=running, mean_task_s=10, waiting_s=31), 0, targets)
    assert launched(d) == [SPOT.key]


def test_idle_surplus_is_drained_dearest_first_and_never_a_busy_one() -> None:
    idle_od = InstanceView("od", "running", 4, 0, 0.0, 0.17)
    idle_spot = InstanceView("spot", "running", 4, 0, 0.0, 0.068)
    busy = InstanceView("busy", "running", 4, 3, None, 0.17)
    d = decide(pool(5, [SPOT], {"aws": 0}, instances=[idle_spot, busy, idle_od]), 100.0, T)
    # Need 5 slots; 12 present: one idle instance may go — the on-demand one (dearer per slot).
    assert d == Decision(drain=("od",))
    # Not idle long enough yet: nothing.
    assert decide(pool(5, [SPOT], {"aws": 0}, instances=[idle_spot, busy, idle_od]), 30.0, T) == Decision()
    # No work left and idle past the timeout: every idle instance drains, the busy one stays.
    d = decide(pool(0, [SPOT], {"aws": 0}, instances=[idle_spot, busy, idle_od], last_work_at=0.0), 100.0, T)
    assert set(d.drain) == {"spot", "od"}


def test_an_at_risk_instance_is_replaced_then_drained() -> None:
    at_risk = InstanceView("risky", "running", 4, 4, None, 0.068, at_risk=True)
    d = decide(pool(4, [SPOT], {"aws": 5}, instances=[at_risk]), 0.0, T)
    assert launched(d) == [SPOT.key] and d.drain == ()  # its slots no longer count: replace first
    booting = InstanceView("new", "starting", 4, 0, None, 0.068)
    assert decide(pool(4, [SPOT], {"aws": 5}, instances=[at_risk, booting]), 0.0, T) == Decision()
    up = InstanceView("new", "running", 4, 0, None, 0.068)
    assert decide(pool(4, [SPOT], {"aws": 5}, instances=[at_risk, up]), 0.0, T).drain == ("risky",)


def test_when_the_instance_limit_binds_bigger_instances_nearly_as_cheap_win() -> None:
    small = Offer("gcp", "e2-standard-4", "us-central1-a", False, 4, 16, 0.040, "us-central1")  # 0.0100/slot-h
    big = Offer("gcp", "e2-standard-8", "us-central1-a", False, 8, 32, 0.084, "us-central1")  # 0.0105: +5%
    pricey = Offer("aws", "c5.4xlarge", "us-east-1a", False, 16, 32, 0.68, "us-east-1")  # 0.0425: far dearer
    # 100 tasks, at most 5 instances: 5 x 4 = 20 slots cannot cover it; 8-slot ones get closer.
    d = decide(pool(100, [small, big, pricey], {"gcp": 10, "aws": 10}, max_instances=5), 0.0, T)
    assert launched(d) == [big.key] * 5
    # 12 tasks, limit 5: 3 small instances cover it; the cheapest slot-hour wins.
    d = decide(pool(12, [small, big, pricey], {"gcp": 10, "aws": 10}, max_instances=5), 0.0, T)
    assert launched(d) == [small.key] * 3


def test_a_fleet_that_fell_back_to_on_demand_returns_to_spot_when_it_is_back() -> None:
    od = [InstanceView(f"od{i}", "running", 4, 4, None, 0.17, provider="aws") for i in range(4)]
    # 1000 tasks of 60 s on 16 slots: an hour of work left. Spot is on sale again at 0.017/slot-h,
    # the on-demand fallback costs 0.0425: replacements start first ...
    d = decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 4}, instances=od, max_instances=8, mean_task_s=60), 0.0, T)
    assert launched(d) == [SPOT.key] * 4 and d.drain == ()
    # ... the on-demand ones keep working while they boot, and drain once they are up.
    booting = [InstanceView(f"s{i}", "starting", 4, 0, None, 0.068, provider="aws") for i in range(4)]
    assert decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=od + booting, max_instances=8,
                       mean_task_s=60), 0.0, T) == Decision()
    up = [InstanceView(f"s{i}", "running", 4, 4, None, 0.068, provider="aws") for i in range(4)]
    d = decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=od + up, max_instances=8, mean_task_s=60), 0.0, T)
    assert set(d.drain) == {"od0", "od1", "od2", "od3"} and d.launch == ()
    # At the instance limit no replacement can start first, and an offer off its back-off may still
    # be out of stock: one drains as a probe; as spot instances come up, more go at a time.
    d = decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=od, max_instances=4, mean_task_s=60), 0.0, T)
    assert d == Decision(drain=("od0",))
    two_up = od[1:] + up[:1]
    d = decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=two_up, max_instances=4, mean_task_s=60), 0.0, T)
    assert d == Decision(drain=("od1",))  # one spot instance runs: one more goes
    assert decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=od[2:] + up[:2], max_instances=4,
                       mean_task_s=60), 0.0, T) == Decision(drain=("od2", "od3"))


def test_on_demand_stays_when_spot_is_not_on_sale_or_would_not_pay_back() -> None:
    od = [InstanceView(f"od{i}", "running", 4, 4, None, 0.17, provider="aws") for i in range(4)]
    # Spot backed off (only on-demand on sale): nothing to return to.
    assert decide(pool(1000, [ON_DEMAND], {"aws": 4}, instances=od, max_instances=4, mean_task_s=60), 0.0, T) \
        == Decision()
    # 100 tasks x 60 s on 16 slots: about 6 minutes of work left, less than a replacement is worth.
    assert decide(pool(100, [SPOT, ON_DEMAND], {"aws": 4}, instances=od, max_instances=4, mean_task_s=60), 0.0, T) \
        == Decision()
    # No task has finished yet: no estimate of the work left, no replacement.
    assert decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 4}, instances=od, max_instances=4), 0.0, T) == Decision()
    # The cheap offer is another cloud's with no room: draining these would only bring them back.
    d = decide(pool(1000, [GCP, ON_DEMAND], {"aws": 0, "gcp": 0}, instances=od, max_instances=4, mean_task_s=60),
               0.0, T)
    assert d == Decision()


def test_one_switch_at_a_time_and_never_to_fewer_slots_when_the_limit_binds() -> None:
    od = [InstanceView(f"od{i}", "running", 4, 4, None, 0.17, provider="aws") for i in range(3)]
    probe = InstanceView("od3", "draining", 4, 2, None, 0.17, provider="aws")
    # A probe still draining holds its place under the limit: nothing more goes until it has stopped.
    assert decide(pool(1000, [SPOT, ON_DEMAND], {"aws": 0}, instances=[*od, probe], max_instances=4,
                       mean_task_s=60), 0.0, T) == Decision()
    # Big on-demand instances at the limit: a cheaper but smaller spot offer would slow the job down.
    big_od = [InstanceView(f"big{i}", "running", 16, 16, None, 0.68, provider="aws") for i in range(4)]
    assert decide(pool(10_000, [SPOT, ON_DEMAND], {"aws": 0}, instances=big_od, max_instances=4,
                       mean_task_s=60), 0.0, T) == Decision()


def test_a_rebalanced_instance_is_replaced_from_another_offer_and_kept_when_it_cannot_be() -> None:
    other_zone = Offer("aws", "c5.xlarge", "us-east-1b", True, 4, 8, 0.070, "us-east-1")
    at_risk = InstanceView("risky", "running", 4, 4, None, 0.068, at_risk=True, provider="aws", offer_key=SPOT.key)
    # The rebalance says capacity in 1a is going: the replacement comes from 1b, though 1a is cheaper.
    d = decide(pool(4, [SPOT, other_zone], {"aws": 5}, instances=[at_risk]), 0.0, T)
    assert launched(d) == [other_zone.key]
    # Nothing else on sale: the same offer is still better than nothing.
    assert launched(decide(pool(4, [SPOT], {"aws": 5}, instances=[at_risk]), 0.0, T)) == [SPOT.key]
    # At the provider's limit no replacement can start: the at-risk instance keeps working (it
    # is drained only once others cover the work; the cloud's own notice drains it otherwise).
    assert decide(pool(4, [SPOT, other_zone], {"aws": 0}, instances=[at_risk]), 0.0, T) == Decision()
    busy = InstanceView("busy", "running", 4, 4, None, 0.068, provider="aws")
    assert decide(pool(8, [SPOT], {"aws": 0}, instances=[at_risk, busy], max_instances=2), 0.0, T) == Decision()
    assert decide(pool(4, [SPOT], {"aws": 0}, instances=[at_risk, busy], max_instances=2), 0.0, T).drain == ("risky",)


def test_the_place_a_displaced_instance_frees_goes_to_the_cheap_offer_only() -> None:
    pricey_gcp = Offer("gcp", "n2-standard-4", "us-central1-a", False, 4, 16, 0.19, "us-central1")  # 0.0475/slot-h
    od = [InstanceView(f"od{i}", "running", 4, 4, None, 0.17, provider="aws") for i in range(3)]
    probe = InstanceView("od3", "draining", 4, 2, None, 0.17, provider="aws")
    # AWS is at its own limit while the probe drains; GCP has room but only a dear offer. The probe
    # was drained to make room for AWS spot: the freed place must not go to GCP on-demand.
    d = decide(pool(1000, [SPOT, ON_DEMAND, pricey_gcp], {"aws": 0, "gcp": 4}, instances=[*od, probe],
                    max_instances=8, mean_task_s=60), 0.0, T)
    assert d.launch == ()
    # Before the drain: the backlog beyond what the kept instances and the displaced one's place
    # cover may still be bought from GCP, but not the displaced one's place itself.
    running = InstanceView("od3", "running", 4, 4, None, 0.17, provider="aws")
    d = decide(pool(20, [SPOT, ON_DEMAND, pricey_gcp], {"aws": 0, "gcp": 4}, instances=[*od, running],
                    max_instances=8, mean_task_s=60_000), 0.0, T)
    assert launched(d) == [pricey_gcp.key]  # 20 tasks: 12 kept + 4 (od3's place, for spot) + 4 from GCP


# ---- reclaim: an idle instance of another worker gives its place when a limit binds ----

def _other(*instances: InstanceView, outstanding: int = 0) -> PoolView:
    """Another worker's pool: its instances, and its outstanding work (queued + leased)."""
    return PoolView(2, outstanding, 1, [], {}, list(instances), last_work_at=99.0)


IDLE_LOCAL = InstanceView("local-x", "running", 2, 0, 99.0, provider="local")


def test_at_the_instance_limit_an_idle_instance_of_another_worker_is_drained_at_once() -> None:
    # Local allows one instance and job X's worker holds it, idle for 1 s (idle_timeout_s is 60).
    waiting = pool(4, [LOCAL], {"local": 0}, provider_spare={"local": 0})
    assert decide(waiting, 100.0, T) == Decision()  # on its own the waiting pool can buy nothing
    assert reclaim([waiting], [waiting, _other(IDLE_LOCAL)], 5, 100.0, T) == {1: ("local-x",)}
    # The fleet-wide limit binds instead (local itself would allow more): the same.
    waiting = pool(4, [LOCAL], {"local": 0}, provider_spare={"local": 3})
    assert reclaim([waiting], [waiting, _other(IDLE_LOCAL)], 0, 100.0, T) == {1: ("local-x",)}


def test_an_instance_whose_worker_still_has_work_waiting_is_not_taken() -> None:
    waiting = pool(4, [LOCAL], {"local": 0}, provider_spare={"local": 0})
    # Its worker has a task queued (or retrying): the instance is about to be busy again.
    assert reclaim([waiting], [waiting, _other(IDLE_LOCAL, outstanding=1)], 5, 100.0, T) == {}
    # Busy: it holds a lease.
    busy = InstanceView("local-x", "running", 2, 1, None, provider="local")
    assert reclaim([waiting], [waiting, _other(busy, outstanding=1)], 5, 100.0, T) == {}


def test_without_a_binding_limit_an_idle_instance_waits_out_its_idle_timeout() -> None:
    # Two tasks, one 2-slot instance covers them and there is room for it: it buys its own.
    waiting = pool(2, [LOCAL], {"local": 1}, provider_spare={"local": 1})
    assert launched(decide(waiting, 100.0, T)) == [LOCAL.key]
    assert reclaim([waiting], [waiting, _other(IDLE_LOCAL)], 5, 100.0, T) == {}
    # ... and the other worker's pool drains it only after idle_timeout_s (60 s) without work.
    other = _other(IDLE_LOCAL)
    assert decide(other, 100.0, T) == Decision()
    assert decide(other, 160.0, T) == Decision(drain=("local-x",))


def test_the_jobs_own_limit_or_a_place_already_freeing_takes_nothing_more() -> None:
    mine = InstanceView("local-a", "running", 2, 2, None, provider="local")
    # The waiting job allows one instance and has it: another worker's place would not help it.
    capped = pool(8, [LOCAL], {"local": 0}, instances=[mine], max_instances=1, provider_spare={"local": 0})
    assert reclaim([capped], [capped, _other(IDLE_LOCAL)], 5, 100.0, T) == {}
    # One instance of another worker is already draining: its place is on its way, one need, one drain.
    draining = InstanceView("local-y", "draining", 2, 0, None, provider="local")
    waiting = pool(2, [LOCAL], {"local": 0}, provider_spare={"local": 0})
    assert reclaim([waiting], [waiting, _other(draining, IDLE_LOCAL)], 5, 100.0, T) == {}
    # Three places wanted, two idle instances: both go (the longest idle first).
    older = InstanceView("local-z", "running", 2, 0, 50.0, provider="local")
    waiting = pool(6, [LOCAL], {"local": 0}, provider_spare={"local": 0})
    assert reclaim([waiting], [waiting, _other(IDLE_LOCAL, older)], 5, 100.0, T) == {1: ("local-z", "local-x")}
