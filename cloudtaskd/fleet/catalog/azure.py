"""Azure offers from Azure's own APIs: sizes, CPU architecture and zones from the Resource SKUs API (through the
driver's compute client), spot and on-demand prices from the public Retail Prices API (no auth).

Only the types the config allows are priced: the Retail Prices API is asked once per type, with a
filter narrow enough that its answer is a page or two.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import structlog

from cloudtaskd.errors import ProviderError, TransientProviderError
from cloudtaskd.fleet.providers.azure import PROVIDER, AzureDriver, Sku, classify, parse_sku
from cloudtaskd.fleet.providers.base import Offer

log = structlog.get_logger("cloudtaskd.fleet.catalog.azure")

PRICES_URL = "https://prices.azure.com/api/retail/prices"
PRICES_TIMEOUT_S = 30.0
PRICES_MAX_PAGES = 20  # a per-type filter answers a handful of lines; more means the filter was ignored
VM_RESOURCE_TYPE = "virtualMachines"
SPOT_SUFFIX = " Spot"
HOURLY = "1 Hour"


async def fetch_offers(driver: AzureDriver, machine_types: Sequence[str], *, prices_url: str = PRICES_URL,
                       zones: Sequence[str] = ()) -> list[Offer]:
    """Every (type, placement, market) of the allowed types in the driver's location, priced.

    A placement is the location itself (Azure picks the zone) and each of `zones` ("1".."3") that
    the SKU offers there. On-demand is always offered; spot only when the Retail Prices API has a
    spot line and the SKU does not say `LowPriorityCapable: False`. A price is None when the API
    has no line for it.

    Restrictions (the SKUs API reports them per subscription): a `Location` restriction naming this
    location means this subscription cannot deploy the size here (`NotAvailableForSubscription`,
    or `QuotaId`: its offer type excludes it), so the type is skipped with a warning; a `Zone`
    restriction removes only the zones it names, and the location-wide offer stays.
    """
    types = sorted(set(machine_types))
    if not types:
        return []
    location = driver.location
    skus = await _skus(driver, types)
    priced = [t for t in types if t in skus]
    prices = await _prices(prices_url, location, priced)
    offers: list[Offer] = []
    for t in priced:
        sku = skus[t]
        on_demand, spot = prices.get(t, (None, None))
        placements = [location] + [z for z in dict.fromkeys(zones) if z in sku.zones]
        markets = [(False, on_demand)] + ([(True, spot)] if spot is not None and sku.spot_capable else [])
        offers.extend(Offer(PROVIDER, t, placement, is_spot, sku.cpus, sku.memory_gb, price, location, sku.gpus,
                            arch=sku.arch)
                      for placement in placements for is_spot, price in markets)
    return offers


# ---- sizes: the Resource SKUs API ----

async def _skus(driver: AzureDriver, types: Sequence[str]) -> dict[str, Sku]:
    """The allowed VM sizes this subscription can deploy in the driver's location, by ARM name."""
    location = driver.location
    wanted = {t.lower(): t for t in types}
    found: dict[str, Sku] = {}
    restricted: dict[str, str] = {}
    compute, _ = await driver._clients()
    try:
        # The API takes only a location filter; the type filter is ours.
        async for raw in compute.resource_skus.list(filter=f"location eq '{location}'"):
            sku = dict(raw)
            name = wanted.get(str(sku.get("name", "")).lower())
            if name is None or str(sku.get("resourceType", "")).lower() != VM_RESOURCE_TYPE.lower():
                continue
            parsed = parse_sku(name, sku, location)
            if isinstance(parsed, str):
                restricted[name] = parsed
            else:
                found[name] = parsed
    except Exception as exc:
        raise classify(exc, "catalog") from exc
    for t in types:
        if t in restricted:
            log.warning("catalog_restricted_type", provider=PROVIDER, machine_type=t, location=location,
                        reason=restricted[t])
        elif t not in found:
            log.warning("catalog_unknown_type", provider=PROVIDER, machine_type=t, location=location)
    return found


# ---- prices: the Retail Prices API ----

async def _prices(url: str, location: str, types: Sequence[str]) -> dict[str, tuple[float | None, float | None]]:
    """(on-demand, spot) USD per hour for each type with a Linux price line in `location`."""
    prices: dict[str, tuple[float | None, float | None]] = {}
    timeout = aiohttp.ClientTimeout(total=PRICES_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for t in types:
            query = (f"serviceName eq 'Virtual Machines' and armRegionName eq '{location}'"
                     f" and armSkuName eq '{t}' and priceType eq 'Consumption'")
            items = await _items(session, url, query)
            prices[t] = _cheapest(items, t, location)
    return prices


async def _items(session: aiohttp.ClientSession, url: str, query: str) -> list[Mapping[str, Any]]:
    """Every item of one filtered query, following `NextPageLink`."""
    items: list[Mapping[str, Any]] = []
    page_url: str | None = url
    params: dict[str, str] | None = {"$filter": query}
    for _ in range(PRICES_MAX_PAGES):
        if page_url is None:
            return items
        body = await _get_json(session, url, page_url, params)
        page = body.get("Items")
        if not isinstance(page, list) or not all(isinstance(i, Mapping) for i in page):
            raise ProviderError(PROVIDER, "catalog", f"the Retail Prices API at {url} answered without an "
                                "`Items` list of objects: is prices_url the Retail Prices API?")
        items.extend(page)
        # The next link carries the filter and the skip token itself.
        next_link = body.get("NextPageLink")
        page_url, params = (str(next_link) if next_link else None), None
    raise ProviderError(PROVIDER, "catalog", f"the Retail Prices API at {url} kept paging past {PRICES_MAX_PAGES} "
                        f"pages for one type ({query}): is prices_url the Retail Prices API?")


async def _get_json(session: aiohttp.ClientSession, url: str, page_url: str,
                    params: dict[str, str] | None) -> Mapping[str, Any]:
    try:
        async with session.get(page_url, params=params) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise TransientProviderError(PROVIDER, "catalog", f"the Retail Prices API at {url} answered HTTP "
                                             f"{resp.status}: {text[:200]}")
    except ProviderError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransientProviderError(PROVIDER, "catalog", f"cannot reach the Retail Prices API at {url}: "
                                     f"{type(exc).__name__}: {exc}") from exc
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ProviderError(PROVIDER, "catalog", f"the Retail Prices API at {url} answered malformed JSON "
                            f"({exc}): {text[:200]!r}") from exc
    if not isinstance(body, Mapping):
        raise ProviderError(PROVIDER, "catalog", f"the Retail Prices API at {url} answered {type(body).__name__} "
                            "where an object was expected")
    return body


def _cheapest(items: Sequence[Mapping[str, Any]], machine_type: str,
              location: str) -> tuple[float | None, float | None]:
    """(on-demand, spot): the lowest Linux hourly line of each; Windows and Low Priority lines ignored."""
    on_demand: list[float] = []
    spot: list[float] = []
    for item in items:
        meter = str(item.get("meterName", ""))
        if (str(item.get("armSkuName", "")).lower() != machine_type.lower()
                or str(item.get("armRegionName", "")).lower() != location.lower()
                or "Windows" in str(item.get("productName", ""))
                or "Low Priority" in meter
                or item.get("unitOfMeasure", HOURLY) != HOURLY):
            continue
        try:
            price = float(item["retailPrice"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderError(PROVIDER, "catalog", f"a Retail Prices line for {machine_type} in {location} has "
                                f"no numeric retailPrice: {dict(item)!r}") from exc
        (spot if meter.endswith(SPOT_SUFFIX) else on_demand).append(price)
    return (min(on_demand) if on_demand else None), (min(spot) if spot else None)
