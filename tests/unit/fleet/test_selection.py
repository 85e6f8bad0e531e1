"""Ranking offers by cost per task-slot-hour, on small cases checked by hand."""

from __future__ import annotations

import math

import pytest

from cloudtaskd.fleet.orchestrator.selection import (
    PRIOR_SPOT_RATE_PER_H,
    Needs,
    Policy,
    effective_price,
    interruption_rate,
    rank,
    slots_on,
)
from cloudtaskd.fleet.providers.base import Offer


def offer(provider: str, machine_type: str, cpus: int, mem_gb: float, price: float | None, *, spot: bool = False,
          zone: str = "us-east-1a", region: str = "us-east-1", gpus: int = 0) -> Offer:
    return Offer(provider, machine_type, zone, spot, cpus, mem_gb, price, region, gpus)


def test_slots_are_limited_by_cpu_memory_and_gpu() -> None:
    big = offer("aws", "m5.2xlarge", 8, 32, 0.384)
    assert slots_on(big, Needs(cpus_per_task=1)) == 8
    assert slots_on(big, Needs(cpus_per_task=0.5)) == 16
    assert slots_on(big, Needs(cpus_per_task=1, memory_per_task_mib=6 * 1024)) == 5  # 32 GiB / 6 GiB
    assert slots_on(big, Needs(cpus_per_task=3)) == 2
    assert slots_on(big, Needs(cpus_per_task=16)) == 0  # does not fit
    assert slots_on(big, Needs(gpus_per_task=1)) == 0
    gpu = offer("aws", "g5.12xlarge", 48, 192, 5.672, gpus=4)
    assert slots_on(gpu, Needs(cpus_per_task=1, gpus_per_task=1)) == 4
    assert slots_on(offer("aws", "x", 3, 4, 1.0), Needs(cpus_per_task=0.1)) == 30  # no float truncation to 29


def test_cheapest_slot_hour_wins_not_cheapest_instance() -> None:
    needs = Needs(cpus_per_task=2, memory_per_task_mib=2048)
    small = offer("aws", "c5.large", 2, 4, 0.085)  # 1 slot: 0.085 / slot-h
    large = offer("aws", "c5.4xlarge", 16, 32, 0.68)  # 8 slots: 0.085 / slot-h — a tie, more slots first
    mem_poor = offer("gcp", "e2-highcpu-16", 16, 16, 0.40, zone="us-central1-a", region="us-central1")  # 8: 0.05
    ranked = rank([small, large, mem_poor], needs, Policy())
    assert [c.offer.machine_type for c in ranked] == ["e2-highcpu-16", "c5.4xlarge", "c5.large"]
    assert ranked[0].slots == 8 and ranked[0].cost_per_slot_hour == pytest.approx(0.05)


def test_spot_is_weighed_by_its_interruption_rate() -> None:
    needs = Needs(cpus_per_task=1)
    on_demand = offer("aws", "m5.large", 2, 8, 0.096)
    calm = offer("aws", "m5.large", 2, 8, 0.040, spot=True, zone="us-east-1b")
    stormy = offer("aws", "m5.large", 2, 8, 0.030, spot=True, zone="us-east-1c")
    # Hand check, lost_h = 0.5: calm at the prior 0.05/h -> 0.040 / 0.975 = 0.04103 per instance-hour;
    # stormy at 1.9/h -> 0.030 / 0.05 (floor) = 0.6, far worse than on-demand's 0.096.
    ranked = rank([on_demand, calm, stormy], needs, Policy(), rates={stormy.key: 1.9}, lost_h=0.5)
    assert [c.offer.zone for c in ranked] == ["us-east-1b", "us-east-1a", "us-east-1c"]
    assert ranked[0].effective_per_hour == pytest.approx(0.040 / (1 - 0.05 * 0.5))
    assert ranked[1].effective_per_hour == pytest.approx(0.096)  # on-demand: never weighed
    # Without that history, stormy is simply the cheapest.
    assert rank([on_demand, calm, stormy], needs, Policy(), lost_h=0.5)[0].offer.zone == "us-east-1c"


def test_interruption_rate_starts_at_the_prior_and_follows_observations() -> None:
    assert interruption_rate(0, 0.0, spot=True) == pytest.approx(PRIOR_SPOT_RATE_PER_H)
    assert interruption_rate(5, 0.0, spot=False) == 0.0
    assert interruption_rate(30, 1000.0, spot=True) == pytest.approx((30 + 0.5) / 1010)  # ~3%/h
    assert interruption_rate(0, 990.0, spot=True) == pytest.approx(0.5 / 1000)
    assert effective_price(1.0, 0.0, 0.5) == 1.0


def test_policy_filters_providers_regions_markets_and_price() -> None:
    offers = [offer("aws", "a", 2, 8, 0.10), offer("aws", "b", 2, 8, 0.03, spot=True),
              offer("gcp", "c", 2, 8, 0.05, zone="europe-west1-b", region="europe-west1"),
              offer("azure", "d", 2, 8, 0.50, zone="westeurope", region="westeurope")]
    needs = Needs()

    def names(policy: Policy) -> list[str]:
        return [c.offer.machine_type for c in rank(offers, needs, policy)]

    assert names(Policy()) == ["b", "c", "a", "d"]
    assert names(Policy(providers=("gcp", "azure"))) == ["c", "d"]
    assert names(Policy(regions=("europe-west1", "westeurope"))) == ["c", "d"]
    assert names(Policy(regions=("us-east-1a",))) == ["b", "a"]  # a zone name works too
    assert names(Policy(spot=False)) == ["c", "a", "d"]
    assert names(Policy(on_demand=False)) == ["b"]
    assert names(Policy(max_price_per_hour=0.2)) == ["b", "c", "a"]


def test_unpriced_offers_rank_last_in_the_order_given() -> None:
    offers = [offer("aws", "z-unpriced", 4, 16, None), offer("local", "local", 2, 4, 0.0),
              offer("aws", "a-unpriced", 2, 8, None), offer("gcp", "priced", 2, 8, 0.07)]
    ranked = rank(offers, Needs(), Policy())
    assert [c.offer.machine_type for c in ranked] == ["local", "priced", "z-unpriced", "a-unpriced"]
    assert math.isinf(ranked[-1].cost_per_slot_hour)
