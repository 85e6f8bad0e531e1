"""The GCP catalog: sizes from Compute Engine machineTypes (the real google-cloud-compute client
against the Compute Engine stand-in), prices from a Cloud Billing Catalog API stand-in (the real
aiohttp client), both with the driver's credentials."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from google.auth.credentials import AnonymousCredentials, Credentials, Scoped
from structlog.testing import capture_logs

from cloudtaskd.errors import InvalidRequest, ProviderAuthError, ProviderError, TransientProviderError
from cloudtaskd.fleet.catalog.gcp import BILLING_SCOPE, COMPUTE_SERVICE_ID, fetch_offers
from cloudtaskd.fleet.providers.gcp import GcpDriver
from tests.fakes.gcp_standin import ComputeStandin
from tests.fakes.serving import serve, serving
from tests.procs import free_port
from tests.unit.fleet.test_gcp import PROJECT, ZONE
from tests.unit.fleet.test_gcp import driver as driver  # a fixture: imported, it is this module's too

SKUS_PATH = f"/v1/services/{COMPUTE_SERVICE_ID}/skus"
AMERICAS = ["us-central1", "us-east1", "us-west1"]
BELGIUM = ["europe-west1"]


def sku(description: str, group: str, usage: str, regions: list[str], price: float, *,
        family: str = "Compute", unit: str | None = None, tiers: tuple[float, ...] = ()) -> dict[str, Any]:
    """One Compute Engine SKU as services.skus.list answers it (USD)."""
    unit = unit or ("GiBy.h" if " Ram " in description else "h")
    sku_id = hashlib.sha256(f"{description}/{usage}".encode()).hexdigest()[:12].upper()
    sku_id = f"{sku_id[:4]}-{sku_id[4:8]}-{sku_id[8:]}"

    def rate(start: int, usd: float) -> dict[str, Any]:
        units, nanos = divmod(round(usd * 1e9), 10**9)
        return {"startUsageAmount": start, "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos}}

    rates = [rate(i * 100, p) for i, p in enumerate((*tiers, price))]
    return {"name": f"services/{COMPUTE_SERVICE_ID}/skus/{sku_id}", "skuId": sku_id, "description": description,
            "category": {"serviceDisplayName": "Compute Engine", "resourceFamily": family, "resourceGroup": group,
                         "usageType": usage},
            "serviceRegions": regions,
            "pricingInfo": [{"summary": "", "pricingExpression": {
                "usageUnit": unit, "displayQuantity": 1, "tieredRates": rates,
                "usageUnitDescription": "hour" if unit == "h" else "gibibyte hour",
                "baseUnit": "s" if unit == "h" else "By.s", "baseUnitConversionFactor": 3600},
                "currencyConversionRate": 1, "effectiveTime": "2024-05-01T00:00:00Z"}],
            "serviceProviderName": "Google", "geoTaxonomy": {"type": "MULTI_REGIONAL", "regions": regions}}


# Hand-checked prices (USD per vCPU-hour, per GiB-hour).
E2_CORE, E2_RAM, E2_SPOT_CORE, E2_SPOT_RAM = 0.021811, 0.002923, 0.006543, 0.000877
E2_EU_CORE, E2_EU_RAM, E2_EU_SPOT_CORE, E2_EU_SPOT_RAM = 0.023997, 0.003216, 0.007199, 0.000965
N2_CORE, N2_RAM, N2_SPOT_CORE, N2_SPOT_RAM = 0.031611, 0.004237, 0.007650, 0.001025
N1_CORE, N1_RAM, N1_SPOT_CORE, N1_SPOT_RAM = 0.031611, 0.004237, 0.006655, 0.000892

# The decoys are dearer than the prices they sit beside (and a duplicate price keeps the dearer), so
# that counting any of them would change an answer; they are spread over both pages.
PAGE_1 = [
    sku("E2 Instance Core running in Americas", "CPU", "OnDemand", AMERICAS, E2_CORE),
    sku("Commitment v1: E2 Cpu in Americas for 1 Year", "CPU", "Commit1Yr", AMERICAS, 0.5),
    sku("E2 Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, E2_RAM),
    sku("Spot Preemptible E2 Instance Core running in Americas", "CPU", "Preemptible", AMERICAS, E2_SPOT_CORE),
    sku("Spot Preemptible E2 Instance Ram running in Americas", "RAM", "Preemptible", AMERICAS, E2_SPOT_RAM),
    sku("E2 Sole Tenancy Instance Core running in Americas", "CPU", "OnDemand", AMERICAS, 0.6),
    sku("N2 Instance Core running in Americas", "CPU", "OnDemand", AMERICAS, N2_CORE),
    sku("N2 Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, N2_RAM),
    sku("N2 Custom Instance Core running in Americas", "CPU", "OnDemand", AMERICAS, 0.7),
    sku("Licensing Fee for Windows Server 2022 Datacenter Edition (CPU cost)", "Windows", "OnDemand", AMERICAS,
        1.1, family="License"),
    sku("Nvidia Tesla A100 GPU running in Americas", "GPU", "OnDemand", AMERICAS, 2.933908),
]
PAGE_2 = [
    sku("Spot Preemptible N2 Instance Core running in Americas", "CPU", "Preemptible", AMERICAS, N2_SPOT_CORE),
    sku("Spot Preemptible N2 Instance Ram running in Americas", "RAM", "Preemptible", AMERICAS, N2_SPOT_RAM),
    sku("N2 Custom Extended Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, 0.8),
    sku("E2 Instance Core running in Belgium", "CPU", "OnDemand", BELGIUM, E2_EU_CORE),
    sku("E2 Instance Ram running in Belgium", "RAM", "OnDemand", BELGIUM, E2_EU_RAM),
    sku("Spot Preemptible E2 Instance Core running in Belgium", "CPU", "Preemptible", BELGIUM, E2_EU_SPOT_CORE),
    sku("Spot Preemptible E2 Instance Ram running in Belgium", "RAM", "Preemptible", BELGIUM, E2_EU_SPOT_RAM),
    sku("E2 Instance Core running in Sydney", "CPU", "OnDemand", ["australia-southeast1"], 0.9),
    # N1's Core and Ram share the group N1Standard; a free first tier must not be taken for the price.
    sku("N1 Predefined Instance Core running in Americas", "N1Standard", "OnDemand", AMERICAS, N1_CORE, tiers=(0.0,)),
    sku("N1 Predefined Instance Ram running in Americas", "N1Standard", "OnDemand", AMERICAS, N1_RAM),
    sku("Spot Preemptible N1 Predefined Instance Core running in Americas", "N1Standard", "Preemptible", AMERICAS,
        N1_SPOT_CORE),
    sku("Spot Preemptible N1 Predefined Instance Ram running in Americas", "N1Standard", "Preemptible", AMERICAS,
        N1_SPOT_RAM),
    # Impostors: the real E2 description under another usage type, family or group: the category decides.
    sku("E2 Instance Core running in Americas", "CPU", "Commit3Yr", AMERICAS, 1.2),
    sku("E2 Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, 1.3, family="License"),
    sku("Spot Preemptible E2 Instance Core running in Americas", "GPU", "Preemptible", AMERICAS, 1.4),
    sku("Storage PD Capacity", "PDStandard", "OnDemand", AMERICAS, 0.04, family="Storage", unit="GiBy.mo"),
]
NEXT_PAGE = "page-2-token"


class BillingStandin:
    """The Cloud Billing Catalog API's `services.skus.list` for Compute Engine: PAGE_1, then PAGE_2
    behind `nextPageToken` (an empty token on the last page, as Google sends it)."""

    def __init__(self) -> None:
        self.pages: list[list[dict[str, Any]]] = [list(PAGE_1), list(PAGE_2)]
        self.requests: list[dict[str, str]] = []  # each request's query, plus its Authorization header
        self.status = 200
        self.error_body: dict[str, Any] = {}
        self.raw_body: bytes | None = None  # answered as is (200) instead of a page
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(SKUS_PATH, self._handle)
        self._runner, self.url = await serve(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append({**request.query, "authorization": request.headers.get("Authorization", "")})
        if self.status != 200:
            return web.json_response(self.error_body, status=self.status)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        token = request.query.get("pageToken", "")
        index = {"": 0, NEXT_PAGE: 1}.get(token)
        if index is None:
            return web.json_response({"error": {"code": 400, "message": f"bad pageToken {token!r}",
                                                "status": "INVALID_ARGUMENT"}}, status=400)
        return web.json_response({"skus": self.pages[index], "nextPageToken": NEXT_PAGE if index == 0 else ""})


@pytest.fixture
async def billing() -> AsyncIterator[BillingStandin]:
    async with serving(BillingStandin()) as server:
        yield server


def hourly(cpus: float, memory_gib: float, core: float, ram: float) -> float:
    return cpus * core + memory_gib * ram


ALLOWED = ["e2-standard-4", "n2-standard-2", "n1-standard-1", "e2-medium", "a2-highgpu-1g", "e2-custom-4-8192",
           "zz-bogus-1"]


async def test_offers_are_sized_and_priced_per_zone(driver: GcpDriver, gce: ComputeStandin,
                                                    billing: BillingStandin) -> None:
    with capture_logs() as logs:
        offers = await fetch_offers(driver, ALLOWED, billing_endpoint=billing.url,
                                    zones=("us-central1-b", "europe-west1-b", ZONE))
    got = {(o.machine_type, o.zone, o.spot): (o.cpus, o.memory_gb, o.gpus, o.price_per_hour) for o in offers}
    assert len(got) == len(offers)  # no offer twice
    assert {o.provider for o in offers} == {"gcp"}
    assert all(o.region == o.zone.rsplit("-", 1)[0] for o in offers)

    # Hand-checked: e2-standard-4 = 4 x core + 16 GiB x ram, per region and market.
    e2_us, e2_us_spot = hourly(4, 16, E2_CORE, E2_RAM), hourly(4, 16, E2_SPOT_CORE, E2_SPOT_RAM)
    e2_eu, e2_eu_spot = hourly(4, 16, E2_EU_CORE, E2_EU_RAM), hourly(4, 16, E2_EU_SPOT_CORE, E2_EU_SPOT_RAM)
    assert (e2_us, e2_us_spot) == (pytest.approx(0.134012), pytest.approx(0.040204))
    assert (e2_eu, e2_eu_spot) == (pytest.approx(0.147444), pytest.approx(0.044236))
    n2, n2_spot = hourly(2, 8, N2_CORE, N2_RAM), hourly(2, 8, N2_SPOT_CORE, N2_SPOT_RAM)
    n1, n1_spot = hourly(1, 3.75, N1_CORE, N1_RAM), hourly(1, 3.75, N1_SPOT_CORE, N1_SPOT_RAM)
    assert n1 == pytest.approx(0.04749975)  # n1-standard-1's list price in us-central1
    expected = {
        ("e2-standard-4", ZONE, False): (4, 16.0, 0, e2_us), ("e2-standard-4", ZONE, True): (4, 16.0, 0, e2_us_spot),
        ("e2-standard-4", "us-central1-b", False): (4, 16.0, 0, e2_us),
        ("e2-standard-4", "us-central1-b", True): (4, 16.0, 0, e2_us_spot),
        ("e2-standard-4", "europe-west1-b", False): (4, 16.0, 0, e2_eu),
        ("e2-standard-4", "europe-west1-b", True): (4, 16.0, 0, e2_eu_spot),
        # Not sold in us-central1-b; sold in europe-west1-b, where the catalog has no N2 price.
        ("n2-standard-2", ZONE, False): (2, 8.0, 0, n2), ("n2-standard-2", ZONE, True): (2, 8.0, 0, n2_spot),
        ("n2-standard-2", "europe-west1-b", False): (2, 8.0, 0, None),
        ("n2-standard-2", "europe-west1-b", True): (2, 8.0, 0, None),
        ("n1-standard-1", ZONE, False): (1, 3.75, 0, n1), ("n1-standard-1", ZONE, True): (1, 3.75, 0, n1_spot),
        # Shared-core, GPUs billed apart, custom: sized, offered, unpriced.
        **{("e2-medium", z, s): (2, 4.0, 0, None) for z in (ZONE, "us-central1-b", "europe-west1-b")
           for s in (False, True)},
        ("a2-highgpu-1g", ZONE, False): (12, 85.0, 1, None), ("a2-highgpu-1g", ZONE, True): (12, 85.0, 1, None),
        **{("e2-custom-4-8192", z, s): (4, 8.0, 0, None) for z in (ZONE, "us-central1-b") for s in (False, True)},
    }
    assert got.keys() == expected.keys()
    for key, (cpus, memory_gb, gpus, price) in expected.items():
        assert got[key][:3] == (cpus, memory_gb, gpus), key
        assert got[key][3] == (None if price is None else pytest.approx(price)), key

    warned = {(e["event"], e.get("machine_type"), e.get("region")) for e in logs if e["log_level"] == "warning"}
    assert warned == {
        ("catalog_unknown_type", "zz-bogus-1", None),
        ("catalog_unpriced_type", "e2-medium", None), ("catalog_unpriced_type", "a2-highgpu-1g", None),
        ("catalog_unpriced_type", "e2-custom-4-8192", None),
        ("catalog_unpriced_type", "n2-standard-2", "europe-west1"),
    }
    [shared] = [e for e in logs if e["event"] == "catalog_unpriced_type" and e["machine_type"] == "e2-medium"]
    assert "shared-core" in shared["reason"]

    # Sizes: one get per (type, zone) through the driver's endpoint; prices: both pages, in USD.
    gets = gce.calls_of("machineTypes.get")
    assert len(gets) == len(ALLOWED) * 3
    assert {c.path.rsplit("/", 1)[-1] for c in gets} == set(ALLOWED)
    assert all(c.path.startswith(f"/compute/v1/projects/{PROJECT}/zones/") for c in gets)
    assert [r.get("pageToken", "") for r in billing.requests] == ["", NEXT_PAGE]
    assert all(r["currencyCode"] == "USD" and r["authorization"] == "" for r in billing.requests)  # anonymous


async def test_the_driver_zone_alone_and_no_types(driver: GcpDriver, billing: BillingStandin) -> None:
    offers = await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    assert sorted((o.zone, o.spot, o.price_per_hour) for o in offers) == [
        (ZONE, False, pytest.approx(hourly(4, 16, E2_CORE, E2_RAM))),
        (ZONE, True, pytest.approx(hourly(4, 16, E2_SPOT_CORE, E2_SPOT_RAM)))]
    assert await fetch_offers(driver, [], billing_endpoint=billing.url) == []
    assert len(billing.requests) == 2  # the empty fetch asked nothing


async def test_each_type_s_architecture_comes_from_compute_engine(driver: GcpDriver, gce: ComputeStandin,
                                                                 billing: BillingStandin) -> None:
    """machineTypes' `architecture` when it is set (t2a: ARM64); a type without it is x86 unless its
    series is an Arm one (C4A here, served without the field)."""
    from tests.fakes.gcp_standin import machine_type

    gce.machine_types[ZONE].append(machine_type("c4a-standard-4", 4, 16384))
    offers = await fetch_offers(driver, ["t2a-standard-2", "e2-standard-4", "c4a-standard-4"],
                                billing_endpoint=billing.url)
    assert {(o.machine_type, o.arch) for o in offers} == {
        ("t2a-standard-2", "arm64"), ("e2-standard-4", "x86_64"), ("c4a-standard-4", "arm64")}


class TokenCredentials(Credentials, Scoped):  # type: ignore[misc]  # google-auth's classes are untyped
    """Credentials whose token names the scopes they were given (as a service-account key's would)."""

    def __init__(self, scopes: list[str] | None = None) -> None:
        super().__init__()
        self._scopes = scopes

    @property
    def requires_scopes(self) -> bool:
        return False

    def with_scopes(self, scopes: list[str], default_scopes: list[str] | None = None) -> TokenCredentials:
        return TokenCredentials(list(scopes))

    def refresh(self, request: Any) -> None:
        self.token = f"secret-token-for-{','.join(self._scopes or ['compute'])}"


async def test_a_bearer_token_scoped_for_billing_is_sent_and_never_logged(gce: ComputeStandin,
                                                                         billing: BillingStandin) -> None:
    d = GcpDriver(PROJECT, ZONE, "daemon1", api_endpoint=gce.url, credentials=TokenCredentials(),
                  polling_interval_s=0.01)
    try:
        with capture_logs() as logs:
            offers = await fetch_offers(d, ["e2-standard-4"], billing_endpoint=billing.url)
    finally:
        await d.close()
    assert len(offers) == 2
    assert {r["authorization"] for r in billing.requests} == {f"Bearer secret-token-for-{BILLING_SCOPE}"}
    assert "secret-token" not in repr(logs)


@pytest.mark.parametrize("failure", ["unreachable", "http-503"])
async def test_billing_api_down_is_transient_and_names_the_url(driver: GcpDriver, billing: BillingStandin,
                                                               failure: str) -> None:
    endpoint = billing.url
    if failure == "unreachable":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    else:
        billing.status = 503
        billing.error_body = {"error": {"code": 503, "message": "The service is currently unavailable.",
                                        "status": "UNAVAILABLE"}}
    with pytest.raises(TransientProviderError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=endpoint)
    err = info.value
    assert err.provider == "gcp" and err.op == "catalog" and err.retryable
    assert f"{endpoint}{SKUS_PATH}" in str(err) and str(err).startswith("gcp: catalog:")
    if failure == "http-503":
        assert "HTTP 503" in str(err) and "currently unavailable" in str(err)


@pytest.mark.parametrize("status", [401, 403])
async def test_billing_api_refusal_says_what_to_enable(driver: GcpDriver, billing: BillingStandin,
                                                       status: int) -> None:
    billing.status = status
    message = ("Cloud Billing API has not been used in project 123456789012 before or it is disabled. Enable it by "
               "visiting https://console.developers.google.com/apis/api/cloudbilling.googleapis.com/overview?"
               "project=123456789012 then retry.")
    billing.error_body = {"error": {"code": status, "message": message, "status": "PERMISSION_DENIED"}}
    with pytest.raises(ProviderAuthError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    text = str(info.value)
    assert info.value.provider == "gcp" and info.value.op == "catalog" and not info.value.retryable
    assert f"HTTP {status}" in text and "project 123456789012" in text  # Google's own words
    assert "cloudbilling.googleapis.com" in text and "cloud-billing.readonly" in text and billing.url in text


@pytest.mark.parametrize(("body", "says"), [
    (b"<html>Service Unavailable</html>", "malformed JSON"),
    (b'{"skus": "nope", "nextPageToken": ""}', "without a `skus` list"),
    (b'{"nextPageToken": ""}', "without a `skus` list"),
    (b"[1, 2]", "where an object was expected"),
])
async def test_malformed_billing_body_is_a_clear_error(driver: GcpDriver, billing: BillingStandin,
                                                       body: bytes, says: str) -> None:
    billing.raw_body = body
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    err = info.value
    assert type(err) is ProviderError and not err.retryable  # retrying the same answer would not help
    assert says in str(err) and billing.url in str(err) and err.provider == "gcp"


async def test_a_wanted_sku_without_a_price_is_a_clear_error(driver: GcpDriver, billing: BillingStandin) -> None:
    broken = sku("E2 Instance Ram running in Americas", "RAM", "OnDemand", AMERICAS, E2_RAM)
    broken["pricingInfo"][0]["pricingExpression"]["tieredRates"] = []
    billing.pages[0] = [s for s in PAGE_1 if s["description"] != broken["description"]] + [broken]
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    assert "E2 Instance Ram running in Americas" in str(info.value) and broken["skuId"] in str(info.value)
    assert "tieredRates" in str(info.value)


async def test_a_page_token_that_never_ends_is_refused(driver: GcpDriver, billing: BillingStandin) -> None:
    billing.raw_body = b'{"skus": [], "nextPageToken": "again"}'
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    assert "kept paging" in str(info.value)


@pytest.mark.parametrize(("status", "message", "kind"), [
    (403, "Required 'compute.machineTypes.get' permission for 'projects/test-project'", ProviderAuthError),
    (429, "Rate Limit Exceeded", TransientProviderError),
    (404, "The resource 'projects/test-project' was not found", InvalidRequest),  # the project, not the type
])
async def test_compute_api_errors_are_classified(driver: GcpDriver, gce: ComputeStandin, billing: BillingStandin,
                                                 status: int, message: str, kind: type[ProviderError]) -> None:
    gce.fail_next("machineTypes.get", status, message=message)
    with pytest.raises(ProviderError) as info:
        await fetch_offers(driver, ["e2-standard-4"], billing_endpoint=billing.url)
    assert type(info.value) is kind and info.value.op == "catalog" and message in str(info.value)
    assert info.value.__cause__ is not None
    assert billing.requests == []  # no prices asked for when the sizes are unknown


async def test_the_daemon_refreshes_gcp_and_ranks_its_offers(gce: ComputeStandin, billing: BillingStandin,
                                                             tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the daemon: `catalog refresh` fetches the allowed GCP types in the configured zones,
    and the market then ranks them by price per slot-hour (spot e2-standard-4 at 0.040204 / 4 slots
    first, before spot n2-standard-2 at 0.0235 / 2)."""
    from dataclasses import replace

    import cloudtaskd.fleet.providers.gcp as gcp_module
    from cloudtaskd.config import GcpProviderConfig, LocalProviderConfig, ProvidersConfig
    from cloudtaskd.daemon import Daemon
    from cloudtaskd.fleet.orchestrator.selection import Needs, Policy
    from tests.conftest import make_config

    class DaemonGcpDriver(GcpDriver):
        """The daemon's own driver with anonymous credentials (the stand-ins check none) and fast polling."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, credentials=AnonymousCredentials(), polling_interval_s=0.01)

    monkeypatch.setattr(gcp_module, "GcpDriver", DaemonGcpDriver)
    gcp = GcpProviderConfig(enabled=True, project_id=PROJECT, zone=ZONE, api_endpoint=gce.url,
                            billing_endpoint=billing.url, machine_type="e2-standard-4",
                            machine_types=("n2-standard-2",), zones=("us-central1-b",), cpus=4, ssh_user="root")
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(enabled=False),
                                                                      gcp=gcp))
    daemon = Daemon(config)
    await daemon.start()
    try:
        done = await daemon.market.refresh()
        # e2-standard-4 in both zones, n2-standard-2 in us-central1-a only; each on-demand and spot.
        assert [(r.provider, r.error, r.offers) for r in done] == [("gcp", None, 6)]
        ranked = daemon.market.rank(Needs(cpus_per_task=1), Policy())
        top = ranked[0]
        assert (top.offer.machine_type, top.offer.spot, top.slots) == ("e2-standard-4", True, 4)
        assert top.offer.price_per_hour == pytest.approx(hourly(4, 16, E2_SPOT_CORE, E2_SPOT_RAM))
        assert {(c.offer.machine_type, c.offer.zone) for c in ranked} == {
            ("e2-standard-4", ZONE), ("e2-standard-4", "us-central1-b"), ("n2-standard-2", ZONE)}
        assert all(c.offer.price_per_hour is not None for c in ranked)
        n2_spot = next(c for c in ranked if c.offer.machine_type == "n2-standard-2" and c.offer.spot)
        assert n2_spot.offer.price_per_hour == pytest.approx(hourly(2, 8, N2_SPOT_CORE, N2_SPOT_RAM))
    finally:
        await daemon.stop()
