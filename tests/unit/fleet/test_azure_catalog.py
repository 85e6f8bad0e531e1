"""The Azure catalog: sizes and zones from the Resource SKUs API (the real async compute client
against the ARM stand-in), prices from a Retail Prices API stand-in (the real aiohttp client)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from cloudtaskd.errors import ProviderAuthError, ProviderError, TransientProviderError
from cloudtaskd.fleet.catalog.azure import fetch_offers
from cloudtaskd.fleet.providers.azure import AzureDriver
from tests.fakes.azure_standin import ArmStandin
from tests.fakes.serving import serve, serving
from tests.procs import free_port
from tests.unit.fleet.test_azure import LOCATION
from tests.unit.fleet.test_azure import driver as driver  # a fixture: imported, it is this module's too

PRICES_PATH = "/api/retail/prices"


def vm_sku(name: str, cpus: int, memory_gb: float, zones: list[str], *, gpus: int = 0,
           extra: dict[str, str] | None = None, restrictions: list[dict[str, Any]] | None = None,
           locations: tuple[str, ...] = (LOCATION, "westus")) -> dict[str, Any]:
    """One VM size as the Resource SKUs API lists it (every location it is sold in)."""
    caps = {"vCPUs": str(cpus), "MemoryGB": f"{memory_gb:g}", "LowPriorityCapable": "True",
            "CpuArchitectureType": "x64", **(extra or {})}
    if gpus:
        caps["GPUs"] = str(gpus)
    return {"resourceType": "virtualMachines", "name": name, "tier": "Standard", "size": name.split("_", 1)[1],
            "locations": list(locations),
            "locationInfo": [{"location": loc, "zones": zones, "zoneDetails": []} for loc in locations],
            "capabilities": [{"name": k, "value": v} for k, v in caps.items()],
            "restrictions": restrictions or []}


def restriction(kind: str, zones: list[str] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"locations": [LOCATION]}
    if zones:
        info["zones"] = zones
    return {"type": kind, "values": [LOCATION], "restrictionInfo": info, "reasonCode": "NotAvailableForSubscription"}


SKUS = [
    vm_sku("Standard_D2s_v5", 2, 8, ["1", "2", "3"]),
    vm_sku("Standard_D4s_v5", 4, 16, ["1", "2", "3"], restrictions=[restriction("Zone", ["3"])]),
    vm_sku("Standard_NC6s_v3", 6, 112, ["2"], gpus=1),
    # Constrained cores: billed for 4 vCPUs, runs 2; and not sold as spot.
    vm_sku("Standard_E4-2s_v5", 4, 32, ["1", "2", "3"], extra={"vCPUsAvailable": "2", "LowPriorityCapable": "False"}),
    vm_sku("Standard_B2s", 2, 4, []),  # no zones here, and no price line at all
    vm_sku("Standard_F2s_v2", 2, 4, ["1", "2", "3"], restrictions=[restriction("Location")]),
    vm_sku("Standard_D8s_v5", 8, 32, ["1"], locations=("westus",)),  # not sold in our location
    vm_sku("Standard_D2ps_v5", 2, 8, ["1"], extra={"CpuArchitectureType": "Arm64"}),  # Ampere Altra
    {"resourceType": "disks", "name": "Standard_D2s_v5", "locations": [LOCATION],  # same name, not a VM
     "locationInfo": [{"location": LOCATION, "zones": ["1", "2", "3"]}],
     "capabilities": [{"name": "vCPUs", "value": "64"}], "restrictions": []},
]


def line(sku: str, meter: str, price: float, *, windows: bool = False, region: str = LOCATION,
         price_type: str = "Consumption") -> dict[str, Any]:
    """One Retail Prices API item."""
    series = "Virtual Machines Dsv5 Series" + (" Windows" if windows else "")
    return {"currencyCode": "USD", "retailPrice": price, "unitPrice": price, "armRegionName": region,
            "location": "US East", "meterName": meter, "productName": series, "skuName": meter,
            "serviceName": "Virtual Machines", "armSkuName": sku, "unitOfMeasure": "1 Hour", "type": price_type,
            "isPrimaryMeterRegion": True}


# Lines that must be ignored are cheaper than the Linux ones they sit beside, so that counting any
# of them would change the answer.
PRICE_LINES = [
    line("Standard_D2s_v5", "D2s v5", 0.096),
    line("Standard_D2s_v5", "D2s v5 Spot", 0.0192),
    line("Standard_D2s_v5", "D2s v5", 0.05, windows=True),
    # --- page 2 of the D2s_v5 answer (PAGE_SIZE lines a page) ---
    line("Standard_D2s_v5", "D2s v5 Spot", 0.0180),  # a second spot line: the lowest wins
    line("Standard_D2s_v5", "D2s v5 Low Priority", 0.0100),
    line("Standard_D2s_v5", "D2s v5 Spot", 0.0090, windows=True),
    line("Standard_D2s_v5", "D2s v5", 0.0400, price_type="Reservation"),  # filtered out by priceType
    line("Standard_D2s_v5", "D2s v5", 0.0010, region="westus"),  # filtered out by armRegionName
    line("Standard_D4s_v5", "D4s v5", 0.192),
    line("Standard_D4s_v5", "D4s v5 Spot", 0.0384),
    line("Standard_NC6s_v3", "NC6s v3", 3.06),
    line("Standard_E4-2s_v5", "E4-2s v5", 0.252),
    line("Standard_E4-2s_v5", "E4-2s v5 Spot", 0.0504),
    line("Standard_F2s_v2", "F2s v2", 0.0846),
]
PAGE_SIZE = 3
FIELDS = {"serviceName": "serviceName", "armRegionName": "armRegionName", "armSkuName": "armSkuName",
          "priceType": "type"}


class RetailPricesStandin:
    """The Azure Retail Prices API: `GET /api/retail/prices?$filter=a eq 'x' and b eq 'y'`, the
    matching items PAGE_SIZE at a time, linked by an absolute `NextPageLink` with `$skip`."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = list(PRICE_LINES)
        self.filters: list[dict[str, str]] = []  # each first-page request's filter, parsed
        self.pages: list[tuple[str, int]] = []  # (armSkuName, $skip) of every request
        self.status = 200
        self.raw_body: bytes | None = None  # answered as is (200) instead of the items
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(PRICES_PATH, self._handle)
        self._runner, base_url = await serve(app)
        self.url = f"{base_url}{PRICES_PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.json_response({"Error": {"Code": "ServiceUnavailable"}}, status=self.status)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        query = request.query.get("$filter", "")
        clauses = re.findall(r"(\w+) eq '([^']*)'", query)
        if " and ".join(f"{k} eq '{v}'" for k, v in clauses) != query or any(k not in FIELDS for k, _ in clauses):
            return web.json_response({"Error": {"Code": "BadRequest", "Message": f"bad $filter {query!r}"}},
                                     status=400)
        wanted = dict(clauses)
        skip = int(request.query.get("$skip", "0"))
        self.pages.append((wanted.get("armSkuName", ""), skip))
        if not skip:
            self.filters.append(wanted)
        found = [i for i in self.items if all(i[FIELDS[k]] == v for k, v in wanted.items())]
        page = found[skip:skip + PAGE_SIZE]
        next_link = None
        if skip + PAGE_SIZE < len(found):
            next_link = str(request.url.with_query({"$filter": query, "$skip": str(skip + PAGE_SIZE)}))
        return web.json_response({"BillingCurrency": "USD", "CustomerEntityId": "Default",
                                  "CustomerEntityType": "Retail", "Items": page, "NextPageLink": next_link,
                                  "Count": len(page)})


@pytest.fixture
async def arm() -> AsyncIterator[ArmStandin]:
    server = ArmStandin()
    server.skus = list(SKUS)
    server.sku_page_size = 3  # the SDK must follow nextLink to see them all
    async with serving(server):
        yield server


@pytest.fixture
async def prices() -> AsyncIterator[RetailPricesStandin]:
    async with serving(RetailPricesStandin()) as server:
        yield server


ALLOWED = ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_NC6s_v3", "Standard_E4-2s_v5", "Standard_B2s",
           "Standard_F2s_v2", "Standard_D8s_v5", "Standard_Bogus_v9"]


async def test_offers_are_sized_zoned_and_priced_by_azure(driver: AzureDriver, arm: ArmStandin,
                                                          prices: RetailPricesStandin) -> None:
    with capture_logs() as logs:
        offers = await fetch_offers(driver, ALLOWED, prices_url=prices.url, zones=("1", "3"))
    got = {(o.machine_type, o.zone, o.spot): (o.cpus, o.memory_gb, o.gpus, o.price_per_hour) for o in offers}
    assert len(got) == len(offers)  # no offer twice
    assert {o.provider for o in offers} == {"azure"} and {o.region for o in offers} == {LOCATION}
    d2 = (2, 8.0, 0, 0.096)
    d2_spot = (2, 8.0, 0, 0.018)  # the lower of two Linux spot lines, the second on page 2
    d4, d4_spot = (4, 16.0, 0, 0.192), (4, 16.0, 0, 0.0384)
    e4 = (2, 32.0, 0, 0.252)  # vCPUsAvailable, not the billed vCPUs
    assert got == {
        # The location itself, and each asked-for zone the SKU has.
        ("Standard_D2s_v5", LOCATION, False): d2, ("Standard_D2s_v5", LOCATION, True): d2_spot,
        ("Standard_D2s_v5", "1", False): d2, ("Standard_D2s_v5", "1", True): d2_spot,
        ("Standard_D2s_v5", "3", False): d2, ("Standard_D2s_v5", "3", True): d2_spot,
        # Zone 3 is restricted for this subscription: the location-wide offer stays.
        ("Standard_D4s_v5", LOCATION, False): d4, ("Standard_D4s_v5", LOCATION, True): d4_spot,
        ("Standard_D4s_v5", "1", False): d4, ("Standard_D4s_v5", "1", True): d4_spot,
        # Only zone 2 (not asked for); no spot line published.
        ("Standard_NC6s_v3", LOCATION, False): (6, 112.0, 1, 3.06),
        # A spot line exists, but the SKU is not LowPriorityCapable.
        ("Standard_E4-2s_v5", LOCATION, False): e4, ("Standard_E4-2s_v5", "1", False): e4,
        ("Standard_E4-2s_v5", "3", False): e4,
        # Sold here, but no price line: offered with an unknown price.
        ("Standard_B2s", LOCATION, False): (2, 4.0, 0, None),
    }
    # Restricted in the location, sold elsewhere only, unknown: skipped, each with a warning.
    warned = {(e["event"], e["machine_type"]) for e in logs if e["log_level"] == "warning"}
    assert warned == {("catalog_restricted_type", "Standard_F2s_v2"), ("catalog_unknown_type", "Standard_D8s_v5"),
                      ("catalog_unknown_type", "Standard_Bogus_v9")}
    [restricted] = [e for e in logs if e["event"] == "catalog_restricted_type"]
    assert "NotAvailableForSubscription" in restricted["reason"]
    assert "fake-token" not in repr(logs)
    # One SKU listing for the location; one price query per type that exists here, never for the rest.
    assert arm.sku_filters == [f"location eq '{LOCATION}'"]
    assert sorted(f["armSkuName"] for f in prices.filters) == sorted(
        ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_NC6s_v3", "Standard_E4-2s_v5", "Standard_B2s"])
    assert all(f["serviceName"] == "Virtual Machines" and f["armRegionName"] == LOCATION
               and f["priceType"] == "Consumption" for f in prices.filters)
    assert ("Standard_D2s_v5", PAGE_SIZE) in prices.pages  # the second page was followed


async def test_each_size_s_architecture_comes_from_its_sku(driver: AzureDriver, prices: RetailPricesStandin) -> None:
    """The SKU capability `CpuArchitectureType` (x64 | Arm64)."""
    offers = await fetch_offers(driver, ["Standard_D2ps_v5", "Standard_D4s_v5"], prices_url=prices.url)
    assert {(o.machine_type, o.arch) for o in offers} == {("Standard_D2ps_v5", "arm64"), ("Standard_D4s_v5", "x86_64")}


async def test_no_zones_asked_gives_the_location_only(driver: AzureDriver, prices: RetailPricesStandin) -> None:
    offers = await fetch_offers(driver, ["Standard_D2s_v5"], prices_url=prices.url)
    assert sorted((o.zone, o.spot, o.price_per_hour) for o in offers) == [(LOCATION, False, 0.096),
                                                                          (LOCATION, True, 0.018)]
    assert await fetch_offers(driver, [], prices_url=prices.url) == []


@pytest.mark.parametrize("failure", ["unreachable", "http-503"])
async def test_prices_api_down_is_transient_and_names_the_url(driver: AzureDriver, prices: RetailPricesStandin,
                                                              failure: str) -> None:
    url = prices.url
    if failure == "unreachable":
        url = f"http://127.0.0.1:{free_port()}{PRICES_PATH}"  # nothing listens there
    else:
        prices.status = 503
    with pytest.raises(TransientProviderError) as info:
        await fetch_offers(driver, ["Standard_D2s_v5"], prices_url=url)
    err = info.value
    assert err.provider == "azure" and err.op == "catalog" and err.retryable
    assert url in str(err) and str(err).startswith("azure: catalog:")
    if failure == "http-503":
        assert "HTTP 503" in str(err)


@pytest.mark.parametrize(("body", "says"), [
    (b"<html>Service Unavailable</html>", "malformed JSON"),
    (b'{"Items": "nope", "NextPageLink": null}', "without an `Items` list"),
    (b"[1, 2]", "where an object was expected"),
])
async def test_malformed_prices_body_is_a_clear_error(driver: AzureDriver, prices: RetailPricesStandin,
                                                      body: bytes, says: str) -> None:
    prices.raw_body = body
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["Standard_D2s_v5"], prices_url=prices.url)
    err = info.value
    assert type(err) is ProviderError and not err.retryable  # retrying the same answer would not help
    assert says in str(err) and prices.url in str(err) and err.provider == "azure"


@pytest.mark.parametrize(("status", "code", "kind"), [
    (403, "AuthorizationFailed", ProviderAuthError),
    (429, "TooManyRequests", TransientProviderError),
])
async def test_sku_api_errors_are_classified(driver: AzureDriver, arm: ArmStandin, prices: RetailPricesStandin,
                                             status: int, code: str, kind: type[ProviderError]) -> None:
    arm.sku_error = (status, code)
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["Standard_D2s_v5"], prices_url=prices.url)
    assert type(info.value) is kind and info.value.op == "catalog" and code in str(info.value)
    assert info.value.__cause__ is not None
    assert prices.filters == []  # no prices asked for when the sizes are unknown


async def test_the_daemon_refreshes_azure_and_ranks_its_offers(arm: ArmStandin, prices: RetailPricesStandin,
                                                               tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the daemon: `catalog refresh` fetches the allowed Azure types, and the market then
    ranks them by price per slot-hour (spot D2s_v5 at 0.018 / 2 slots first)."""
    from dataclasses import replace

    import cloudtaskd.fleet.providers.azure as azure_module
    from cloudtaskd.config import AzureProviderConfig, LocalProviderConfig, ProvidersConfig
    from cloudtaskd.daemon import Daemon
    from cloudtaskd.fleet.orchestrator.selection import Needs, Policy
    from tests.unit.fleet.test_azure import SUB, DaemonAzureDriver

    monkeypatch.setattr(azure_module, "AzureDriver", DaemonAzureDriver)
    from tests.conftest import make_config

    azure = AzureProviderConfig(enabled=True, subscription_id=SUB, location=LOCATION, base_url=arm.url,
                                machine_type="Standard_D2s_v5", machine_types=("Standard_D4s_v5",), cpus=2,
                                retail_prices_url=prices.url, ssh_user="root")
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(enabled=False),
                                                                      azure=azure))
    daemon = Daemon(config)
    await daemon.start()
    try:
        done = await daemon.market.refresh()
        assert [(r.provider, r.error) for r in done] == [("azure", None)] and done[0].offers >= 4
        ranked = daemon.market.rank(Needs(cpus_per_task=1), Policy())
        top = ranked[0]
        assert (top.offer.machine_type, top.offer.spot, top.offer.price_per_hour, top.slots) == (
            "Standard_D2s_v5", True, 0.018, 2)
        assert {c.offer.machine_type for c in ranked} == {"Standard_D2s_v5", "Standard_D4s_v5"}  # only allowed
        assert all(c.offer.zone == LOCATION for c in ranked)  # no zones configured: the location
    finally:
        await daemon.stop()
