"""AWS offers from AWS's own APIs: sizes and CPU architecture from DescribeInstanceTypes, zones from
DescribeInstanceTypeOfferings, spot prices from DescribeSpotPriceHistory (the latest per zone),
on-demand prices from the Pricing API (Linux, shared tenancy, no pre-installed software).

Only the types the config allows are asked for: a region has ~800 types and the Pricing API
answers one product at a time.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import structlog

from cloudtaskd.errors import ProviderError
from cloudtaskd.fleet.providers.aws import AwsDriver, arch_of, classify
from cloudtaskd.fleet.providers.base import Offer

log = structlog.get_logger("cloudtaskd.fleet.catalog.aws")

PRICING_REGION = "us-east-1"  # the Pricing API lives in a few regions; prices cover every region
LINUX = "Linux/UNIX"


def on_demand_price(price_list_item: str | dict[str, Any]) -> float | None:
    """USD per hour from one Pricing API product (its PriceList entries are JSON strings)."""
    item = json.loads(price_list_item) if isinstance(price_list_item, str) else price_list_item
    for term in (item.get("terms", {}).get("OnDemand") or {}).values():
        for dim in (term.get("priceDimensions") or {}).values():
            usd = (dim.get("pricePerUnit") or {}).get("USD")
            if usd is not None and str(dim.get("unit", "Hrs")).lower().startswith("hr"):
                return float(usd)
    return None


async def fetch_offers(driver: AwsDriver, machine_types: Sequence[str], *,
                       pricing_endpoint_url: str | None = None) -> list[Offer]:
    """Every (type, zone, market) of the allowed types in the driver's region, priced."""
    types = sorted(set(machine_types))
    if not types:
        return []
    ec2 = await driver._client()
    try:
        described = await ec2.describe_instance_types(InstanceTypes=types)
        sizes = {t["InstanceType"]: t for t in described.get("InstanceTypes", [])}
        zones: dict[str, list[str]] = {}
        paginator = ec2.get_paginator("describe_instance_type_offerings")
        async for page in paginator.paginate(LocationType="availability-zone",
                                             Filters=[{"Name": "instance-type", "Values": types}]):
            for o in page.get("InstanceTypeOfferings", []):
                zones.setdefault(o["InstanceType"], []).append(o["Location"])
        spot: dict[tuple[str, str], float] = {}
        history = await ec2.describe_spot_price_history(
            InstanceTypes=types, ProductDescriptions=[LINUX], StartTime=dt.datetime.now(dt.UTC))
        for h in sorted(history.get("SpotPriceHistory", []), key=lambda h: h.get("Timestamp") or 0):
            spot[(h["InstanceType"], h["AvailabilityZone"])] = float(h["SpotPrice"])  # the latest wins
    except Exception as exc:
        raise classify(exc, "catalog") from exc
    on_demand = await _on_demand_prices(driver, types, pricing_endpoint_url)
    offers: list[Offer] = []
    for t in types:
        size = sizes.get(t)
        if size is None:
            log.warning("catalog_unknown_type", provider="aws", machine_type=t)
            continue
        cpus = int(size.get("VCpuInfo", {}).get("DefaultVCpus", 0))
        memory_gb = float(size.get("MemoryInfo", {}).get("SizeInMiB", 0)) / 1024
        gpus = sum(int(g.get("Count", 0)) for g in size.get("GpuInfo", {}).get("Gpus", []))
        arch = arch_of(size)
        for zone in sorted(zones.get(t, [])):
            markets = [(False, on_demand.get(t))] + ([(True, spot[(t, zone)])] if (t, zone) in spot else [])
            offers.extend(Offer("aws", t, zone, is_spot, cpus, memory_gb, price, driver.region, gpus, arch=arch)
                          for is_spot, price in markets)
    return offers


async def _on_demand_prices(driver: AwsDriver, types: Sequence[str], endpoint_url: str | None) -> dict[str, float]:
    prices: dict[str, float] = {}
    try:
        async with driver.session(PRICING_REGION).client("pricing", endpoint_url=endpoint_url,
                                                         config=driver.client_config()) as pricing:
            for t in types:
                filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in (
                    ("instanceType", t), ("regionCode", driver.region), ("operatingSystem", "Linux"),
                    ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"))]
                out = await pricing.get_products(ServiceCode="AmazonEC2", Filters=filters, MaxResults=10)
                found = [p for p in (on_demand_price(item) for item in out.get("PriceList", [])) if p]
                if found:
                    prices[t] = min(found)
    except ProviderError:
        raise
    except Exception as exc:
        raise classify(exc, "catalog") from exc
    return prices
