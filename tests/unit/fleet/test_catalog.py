"""The catalog: AWS offers from moto (sizes, zones, spot prices) and a Pricing API stand-in
(on-demand prices); cached whole per provider; ranked by `cloudtaskctl prices`."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloudtaskd.core.store import Store
from cloudtaskd.fleet import catalog
from cloudtaskd.fleet.catalog.aws import fetch_offers, on_demand_price
from cloudtaskd.fleet.providers.aws import AwsDriver
from cloudtaskd.fleet.providers.base import Offer
from tests.fakes.moto_ec2 import MotoEc2, PricingStandin

REGION = "us-east-1"


@pytest.fixture
async def pricing() -> AsyncIterator[PricingStandin]:
    server = PricingStandin()
    await server.start()
    server.prices = {("c5.large", REGION): 0.085, ("c5.xlarge", REGION): 0.17, ("c5.large", "eu-west-1"): 0.096}
    yield server
    await server.stop()


def market(moto: MotoEc2) -> None:
    moto.reset()
    moto.spot_prices = [
        ("c5.large", "us-east-1a", 0.0400, "2026-11-22T10:00:00.000Z"),
        ("c5.large", "us-east-1a", 0.0350, "2026-11-23T10:00:00.000Z"),  # the latest wins
        ("c5.large", "us-east-1b", 0.0310, "2026-11-23T09:00:00.000Z"),
        ("c5.xlarge", "us-east-1a", 0.0700, "2026-11-23T09:00:00.000Z"),
    ]


async def test_aws_offers_are_sized_zoned_and_priced_by_aws(moto: MotoEc2, creds: None,
                                                           pricing: PricingStandin) -> None:
    market(moto)
    driver = AwsDriver(REGION, "d1", endpoint_url=moto.url, max_attempts=1)
    try:
        offers = await fetch_offers(driver, ["c5.large", "c5.xlarge"], pricing_endpoint_url=pricing.url)
    finally:
        await driver.close()
    by = {(o.machine_type, o.zone, o.spot): o for o in offers}
    large_a = by[("c5.large", "us-east-1a", True)]
    assert (large_a.cpus, large_a.memory_gb, large_a.region, large_a.price_per_hour) == (2, 4.0, REGION, 0.035)
    assert by[("c5.large", "us-east-1b", True)].price_per_hour == 0.031
    assert by[("c5.large", "us-east-1a", False)].price_per_hour == 0.085
    assert by[("c5.xlarge", "us-east-1a", False)].cpus == 4
    assert by[("c5.xlarge", "us-east-1a", False)].price_per_hour == 0.17
    # On-demand in every zone that sells the type; spot only where a spot price was published.
    assert {z for t, z, s in by if t == "c5.large" and not s} >= {"us-east-1a", "us-east-1b", "us-east-1c"}
    assert ("c5.large", "us-east-1c", True) not in by
    assert {r["Filters"][0]["Value"] for r in pricing.requests} == {"c5.large", "c5.xlarge"}  # one call per type


def test_on_demand_price_reads_the_hourly_dimension() -> None:
    item = {"terms": {"OnDemand": {"A": {"priceDimensions": {"B": {"unit": "Hrs", "pricePerUnit": {"USD": "0.192"}}}}}}}
    assert on_demand_price(json.dumps(item)) == 0.192
    assert on_demand_price({"terms": {}}) is None


async def test_refresh_stores_each_provider_whole_and_keeps_the_old_on_failure(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        first = [Offer("aws", "c5.large", "us-east-1a", True, 2, 4.0, 0.035, REGION)]

        async def good() -> list[Offer]:
            return first

        async def broken() -> list[Offer]:
            raise RuntimeError("aws: catalog: RequestLimitExceeded")

        done = await catalog.refresh(store, {"aws": good})
        assert [(r.provider, r.offers, r.error) for r in done] == [("aws", 1, None)]
        assert await store.read(catalog.load) == {"aws": first}
        done = await catalog.refresh(store, {"aws": broken})
        assert done[0].error is not None and "RequestLimitExceeded" in done[0].error
        assert await store.read(catalog.load) == {"aws": first}  # the previous catalog stays
        ages = await store.read(catalog.ages)
        assert set(ages) == {"aws"} and ages["aws"] >= 0
    finally:
        await store.close()


async def test_prices_through_cloudtaskctl_rank_local_then_aws_spot(moto: MotoEc2, creds: None,
                                                                      pricing: PricingStandin, tmp_path: Path) -> None:
    """`cloudtaskctl catalog refresh` fetches AWS's offers; `cloudtaskctl prices` shows the daemon's
    own ranking: the free local host first, then the cheapest AWS spot slot-hour."""
    from dataclasses import replace

    from cloudtaskd.config import AwsProviderConfig, LocalProviderConfig, ProvidersConfig
    from cloudtaskd.ctl.main import main
    from cloudtaskd.daemon import Daemon
    from tests.conftest import make_config

    market(moto)
    aws = AwsProviderConfig(enabled=True, max_instances=2, machine_type="c5.large", machine_types=("c5.xlarge",),
                            zones=("us-east-1b",), zone="us-east-1a", cpus=2, endpoint_url=moto.url,
                            pricing_endpoint_url=pricing.url)
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(cpus=2), aws=aws))
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"state_dir: {config.state_dir}\n")
    daemon = Daemon(config)
    await daemon.start()

    def ctl(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = main(["--config", str(cfg_file), *argv], out=out, err=io.StringIO())
        return code, out.getvalue()

    try:
        code, text = await asyncio.to_thread(ctl, "catalog", "refresh")
        assert code == 0 and "aws:" in text and "offers" in text
        code, text = await asyncio.to_thread(ctl, "prices", "--cpus-per-task", "1", "--json")
        assert code == 0
        rows = json.loads(text)["candidates"]
        keys = [(r["provider"], r["machine_type"], r["zone"], r["spot"]) for r in rows]
        assert keys[0] == ("local", "local", "localhost", False)
        # Then by $/slot-h: us-east-1b spot c5.large (0.031/2), us-east-1a spot c5.xlarge (0.07/4),
        # us-east-1a spot c5.large (0.035/2), then on-demand (0.085/2 both sizes: more slots first).
        assert keys[1:5] == [("aws", "c5.large", "us-east-1b", True), ("aws", "c5.xlarge", "us-east-1a", True),
                             ("aws", "c5.large", "us-east-1a", True), ("aws", "c5.xlarge", "us-east-1a", False)]
        assert all(r["zone"] in ("us-east-1a", "us-east-1b") for r in rows[1:])  # only the allowed zones
        assert rows[1]["cost_per_slot_hour"] == pytest.approx(0.0155 / (1 - 0.05 * 0.1))
        code, text = await asyncio.to_thread(ctl, "prices", "--cpus-per-task", "1", "--on-demand")
        assert code == 0 and "spot " not in text and "on-demand" in text and "$/SLOT-H" in text
        code, text = await asyncio.to_thread(ctl, "prices", "--cpus-per-task", "8")
        assert code == 0 and "no offer has room for one task" in text
        code, text = await asyncio.to_thread(ctl, "cost", "--json")
        assert code == 0 and json.loads(text)["fleet"] == {"spent": 0, "rate_per_hour": 0, "providers": {}}
        code, text = await asyncio.to_thread(ctl, "cost", "42")
        assert code != 0  # no such job: refused, not an empty answer
    finally:
        await daemon.stop()
