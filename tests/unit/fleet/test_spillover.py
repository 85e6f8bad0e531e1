"""Spill-over on the emulator: the cheapest offer has no capacity, the next-best takes the work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud_e2e import cloud_daemon, needs_sshd
from tests.fakes.moto_ec2 import MotoEc2, PricingStandin
from tests.unit.fleet.test_aws import REGION, console_with_keys, moto_image

pytestmark = needs_sshd


@pytest.mark.timeout(300)  # a VM bootstrap installs aiohttp into a fresh virtualenv
async def test_a_stocked_out_zone_spills_to_the_next_best(moto: MotoEc2, creds: None, tmp_path: Path) -> None:
    from cloudtaskd.config import AwsProviderConfig
    from tests.fakes.sshd import Sshd

    moto.reset()
    # us-east-1a is the cheapest spot slot-hour, but it is out of capacity.
    moto.spot_prices = [("c5.large", "us-east-1a", 0.020, "2026-11-23T09:00:00.000Z"),
                        ("c5.large", "us-east-1b", 0.031, "2026-11-23T09:00:00.000Z")]

    def stock_out(action: str, params: dict[str, list[str]]) -> tuple[str, int, str] | None:
        if action == "RunInstances" and params.get("Placement.AvailabilityZone") == ["us-east-1a"]:
            return ("InsufficientInstanceCapacity", 500, "There is no Spot capacity available in us-east-1a")
        return None

    moto.fail_if = stock_out
    pricing = PricingStandin()
    await pricing.start()
    pricing.prices = {("c5.large", REGION): 0.085}
    sshd = Sshd(tmp_path / "sshd")
    sshd.start()
    moto.console = console_with_keys(sshd.public_host_key())
    aws = AwsProviderConfig(enabled=True, max_instances=1, machine_type="c5.large", zone="us-east-1a",
                            zones=("us-east-1b",), cpus=2, spot=True, on_demand_fallback=False,
                            image=await moto_image(moto), endpoint_url=moto.url, pricing_endpoint_url=pricing.url)
    try:
        async with cloud_daemon(tmp_path, "aws", aws, sshd) as run:
            refreshed = await run.daemon.market.refresh()
            assert [r.error for r in refreshed] == [None]
            res = await run.job("d['n'] - 1", 10)
            assert sorted(r["result"] for r in res.values()) == [i - 1 for i in range(10)]
            zones = [p.get("Placement.AvailabilityZone", [""])[0] for a, p in moto.params if a == "RunInstances"]
            assert zones[0] == "us-east-1a" and zones[-1] == "us-east-1b"  # tried the cheapest, then spilled
            rows = await run.instance_rows("aws")
            failed = [r for r in rows if r["last_error"] and "InsufficientInstanceCapacity" in r["last_error"]]
            assert failed and all('"us-east-1a"' in r["offer"] for r in failed)
            offers = {r["id"]: r["offer"] for r in rows}
            assert all('"zone": "us-east-1b"' in offers[r["instance"]] for r in res.values())
    finally:
        await pricing.stop()
