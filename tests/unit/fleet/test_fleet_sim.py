"""The fleet simulator itself, on tiny worlds whose figures are worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from types import ModuleType

import pytest

from cloudtaskd.fleet.orchestrator.selection import Needs
from cloudtaskd.fleet.providers.base import Offer
from tests import paths


def _load() -> ModuleType:
    path = paths.ROOT / "benchmarks" / "fleet_sim.py"
    spec = importlib.util.spec_from_file_location("fleet_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fs = _load()

# 2 slots at 3.6 $/h: one instance-second costs 0.001 $, a slot-hour 1.8 $.
OD = Offer("test", "box", "z1", False, 2, 4, 3.6, "r1")
SPOT = Offer("test", "box", "z1", True, 2, 4, 1.8, "r1")
SPOT_DEAR = Offer("test", "bigger", "z1", True, 4, 8, 4.0, "r1")  # 1.0 $/slot-h against 0.9


def world(*offers: tuple[Offer, float, float]) -> tuple[object, ...]:
    """(offer, capacity or -1 for none, stock-out chance) -> a catalog with a fixed 100 s boot."""
    return tuple(fs.SimOffer(o, (100.0, 100.0), None if cap < 0 else int(cap), p) for o, cap, p in offers)


def settings(**kw: object) -> object:
    base: dict[str, object] = {"max_instances": 2, "tick_s": 10.0, "idle_timeout_s": 30.0, "target_s": 0.0,
                               "scale_up_after_s": 60.0, "interruption_rate_per_h": 0.0}
    base.update(kw)
    return fs.Settings(**base)


def test_one_offer_fixed_durations_match_the_hand_computed_run() -> None:
    # 8 tasks of 50 s, two 2-slot instances launched at the first tick (t=0), up at t=100: two
    # rounds of 4 tasks, the last done at t=200. The pool last had work at the t=190 tick, so the
    # t=220 tick drains both (idle 30 s); holding nothing, the next tick's sync (t=230) terminates
    # them. Billed 2 x 230 s.
    r = fs.simulate(world((OD, -1, 0.0)), [50.0] * 8, settings(), seed=1)
    assert r.makespan_s == pytest.approx(200.0)
    assert r.cost == pytest.approx(2 * 230 * 0.001)
    assert r.lower_bound_cost == pytest.approx(400 / 3600 * 1.8)  # 400 slot-s at 1.8 $/slot-h
    assert r.ideal_makespan_s == pytest.approx(100.0)  # 400 slot-s over 2 instances x 2 slots
    assert (r.lost, r.interruptions, r.launched, r.launch_failures) == (0, 0, 2, 0)

    # The naive fleet: the same two instances, stopped the moment the last task ends.
    n = fs.simulate(world((OD, -1, 0.0)), [50.0] * 8, settings(), seed=1, naive=True)
    assert n.makespan_s == pytest.approx(200.0)
    assert n.cost == pytest.approx(2 * 200 * 0.001)


def test_the_hourly_budget_holds_the_fleet_to_what_it_pays_for() -> None:
    # 5 $/h buys one 3.6 $/h instance: 8 tasks x 50 s on 2 slots after a 100 s boot end at 300 s.
    r = fs.simulate(world((OD, -1, 0.0)), [50.0] * 8, settings(max_cost_per_hour=5.0), seed=1)
    assert r.launched == 1
    assert r.makespan_s == pytest.approx(300.0)


def test_with_interruptions_every_task_still_completes_exactly_once() -> None:
    durations = fs.task_durations(400, "lognormal", 120.0, random.Random(7))
    catalog = world((SPOT, -1, 0.0), (OD, -1, 0.0))
    sim = fs.Sim(catalog, durations, settings(max_instances=6, interruption_rate_per_h=20.0), random.Random(3))
    sim.run(fs.Autoscaler())
    assert sim.completions == [1] * 400
    assert sum(sim.interruptions.values()) > 0
    assert sim.requeued > 0
    r = sim.result("autoscale")
    assert r.lost == 0
    assert r.cost_by_offer  # every instance ended and was billed


def test_a_stock_out_on_the_cheapest_offer_spills_to_the_next() -> None:
    catalog = world((SPOT, -1, 1.0), (SPOT_DEAR, -1, 0.0))
    r = fs.simulate(catalog, [30.0] * 40, settings(max_instances=3), seed=1)
    assert r.launch_failures > 0
    assert r.lost == 0
    assert list(r.cost_by_offer) == [SPOT_DEAR.key]  # the refused offer never billed a second


def test_a_capacity_limit_fills_the_cheapest_offer_then_the_next() -> None:
    catalog = world((SPOT, 1, 0.0), (SPOT_DEAR, -1, 0.0))
    r = fs.simulate(catalog, [30.0] * 40, settings(max_instances=3), seed=1)
    # The first tick asks for 3 of the cheapest: one starts, two are refused; the offer backs off
    # and the next tick buys the shortfall from the dearer one.
    assert r.launch_failures == 2
    assert set(r.cost_by_offer) == {SPOT.key, SPOT_DEAR.key}
    assert r.launched == 3
    assert r.lost == 0


def test_observed_interruptions_steer_the_ranking() -> None:
    catalog = world((SPOT, -1, 0.0), (SPOT_DEAR, -1, 0.0))
    sim = fs.Sim(catalog, [10.0], settings(), random.Random(1))
    scaler = fs.Autoscaler()
    assert [c.offer.key for c in scaler.candidates(sim, 0.0)] == [SPOT.key, SPOT_DEAR.key]
    sim.interruptions[SPOT.key] = 40  # 40 in no time: rate (40 + 0.5) / 10 h -> useful fraction 0.6
    assert [c.offer.key for c in scaler.candidates(sim, 0.0)] == [SPOT_DEAR.key, SPOT.key]


def test_lower_bound_uses_the_cheapest_allowed_slot_hour_at_list_price() -> None:
    best = fs.cheapest([OD, SPOT, SPOT_DEAR], settings(needs=Needs(cpus_per_task=1)))
    assert best.offer == SPOT
    assert best.cost_per_slot_hour == pytest.approx(0.9)


def test_command_line_reports_both_policies_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert fs.main(["--seeds", "1,2", "--tasks", "300", "--max-instances", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["seeds"]) == {"1", "2"}
    for pair in out["seeds"].values():
        assert [r["policy"] for r in pair] == ["autoscale", "naive"]
        assert all(r["lost"] == 0 for r in pair)
    assert out["summary"]["targets"]["no_task_lost"] is True
