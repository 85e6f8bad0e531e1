"""GCP offers from Google's own APIs: sizes and CPU architecture from Compute Engine
`machineTypes.get` (per allowed type and zone, through the driver's endpoint, credentials and thread
pool), prices from the Cloud Billing Catalog API (`GET {billing_endpoint}/v1/services/6F81-5844-456A/skus`,
every page, USD).

Pricing rule. Compute Engine bills a predefined machine type as its vCPUs times a per-vCPU-hour
price plus its memory (GiB) times a per-GiB-hour price, both per machine series and region, and
the catalog publishes exactly those two SKUs per (series, region, on-demand or spot):

    price(type, region, market) = guestCpus x Core + memoryMb / 1024 x Ram

A SKU counts when `category.resourceFamily` is "Compute", `category.resourceGroup` is "CPU" or
"RAM" ("N1Standard" for N1, whose Core and Ram SKUs share that group), `category.usageType` is
"OnDemand" or "Preemptible" (spot), `serviceRegions` holds the zone's region, its unit is "h"
(Core) or "GiBy.h" (Ram), and its description names one series: "[Spot Preemptible ]<series>
Core|Ram running in <place>", where <series> is "E2 Instance", "N2D AMD Instance", "T2A Arm
Instance", "N1 Predefined Instance" (a letter-digit series name, an optional vendor, "Instance"),
or one of the older names in SERIES_ALIASES ("Compute optimized" is C2). Anything else in the
series text (Custom, Extended, Sole Tenancy, Premium, Reserved, Commitment) does not parse, so those
SKUs are left out; so are licences (resourceFamily "License"), GPUs and disks. The price is the last
tier's `unitPrice` (`units` + `nanos` / 1e9) of the first `pricingInfo`.

Limits: a price is None, with a warning, for shared-core types (e2-micro/small/medium, f1, g1:
billed as a fraction of a core), custom types (their own SKUs, and the extended-memory premium),
types with bundled GPUs (A2, A3, G2: the GPUs are separate SKUs not added here), and a series the
catalog has no Core and Ram SKU for in that region (M2's premium SKUs, a new series named in a way
the rule does not know). List prices only: no sustained-use or committed-use discounts, no
negotiated pricing (that is the Cloud Billing Pricing API, per billing account), no OS licences.

Credentials: the driver's, re-scoped to `cloud-billing.readonly` when they carry scopes (a
service-account key loaded for Compute Engine otherwise gets a token the Billing API refuses). The
bearer token is obtained in the driver's thread pool; AnonymousCredentials (tests) send none. The
Catalog API needs no IAM role, but the Cloud Billing API (cloudbilling.googleapis.com) must be
enabled in the project the credentials bill their API use to.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from cloudtaskd.errors import ProviderAuthError, ProviderError, TransientProviderError
from cloudtaskd.fleet.providers.base import ARM64, X86_64, Offer
from cloudtaskd.fleet.providers.gcp import CALL_TIMEOUT_S, PROVIDER, READ_RETRY_S, GcpDriver, classify

log = structlog.get_logger("cloudtaskd.fleet.catalog.gcp")

BILLING_ENDPOINT = "https://cloudbilling.googleapis.com"
COMPUTE_SERVICE_ID = "6F81-5844-456A"  # Compute Engine in the Cloud Billing catalog
BILLING_SCOPE = "https://www.googleapis.com/auth/cloud-billing.readonly"
BILLING_TIMEOUT_S = 60.0
BILLING_PAGE_SIZE = 5000  # the API's maximum; Compute Engine has a few tens of thousands of SKUs
BILLING_MAX_PAGES = 100  # more means the page token is not moving on
CURRENCY = "USD"
CORE, RAM = "Core", "Ram"
ON_DEMAND, PREEMPTIBLE = "OnDemand", "Preemptible"
UNITS = {CORE: "h", RAM: "GiBy.h"}
RESOURCE_GROUPS = {"CPU", "RAM", "N1Standard"}  # N1 files both Core and Ram under N1Standard
DESCRIPTION = re.compile(r"^(?:Spot Preemptible |Preemptible )?(?P<series>.+?) (?P<kind>Core|Ram) running in \S.*$")
SERIES = re.compile(r"^(?P<family>[A-Z][0-9][A-Z0-9]*)(?: AMD| Arm| Intel)?(?: Predefined)? Instance$")
SERIES_ALIASES = {"Compute optimized": "c2", "Memory-optimized Instance": "m1", "M3 Memory-optimized Instance": "m3"}
SHARED_CORE_FAMILIES = {"f1", "g1"}
# machineTypes' `architecture` (ARCHITECTURE_UNSPECIFIED | ARM64 | X86_64). When a type leaves it
# unset, its series decides: T2A (Ampere Altra), C4A and N4A (Axion) are Arm; every other series is x86.
ARCHES = {"ARM64": ARM64, "X86_64": X86_64}
ARM_FAMILIES = {"t2a", "c4a", "n4a"}
AUTH_HINT = ("enable the Cloud Billing API (cloudbilling.googleapis.com) in the project the credentials "
             "belong to (a user's quota project for gcloud credentials), and give them the scope cloud-platform "
             "or cloud-billing.readonly (on a GCE VM: its access scopes); no IAM role is needed to read list prices")

PriceKey = tuple[str, str, bool, str]  # family, region, spot, Core or Ram


@dataclass(frozen=True, slots=True)
class MachineType:
    name: str
    cpus: int
    memory_gb: float
    gpus: int
    shared_core: bool
    arch: str = X86_64


def region_of(zone: str) -> str:
    """us-central1-a -> us-central1."""
    return zone.rsplit("-", 1)[0]


def family_of(machine_type: str) -> str:
    """e2-standard-4 -> e2 (the series, lower case as in the type's name)."""
    return machine_type.split("-", 1)[0].lower()


def arch_of(machine_type: str, architecture: str) -> str:
    """X86_64 or ARM64: the machine type's `architecture` when set, else by its series."""
    return ARCHES.get(architecture) or (ARM64 if family_of(machine_type) in ARM_FAMILIES else X86_64)


async def fetch_offers(driver: GcpDriver, machine_types: Sequence[str], *, billing_endpoint: str = BILLING_ENDPOINT,
                       zones: Sequence[str] = ()) -> list[Offer]:
    """Every (type, zone, market) of the allowed types in the driver's zone and `zones`: one
    on-demand (STANDARD) and one spot offer each, priced by the rule above, None when unknown."""
    types = sorted(set(machine_types))
    if not types:
        return []
    places = list(dict.fromkeys((driver.zone, *zones)))
    credentials = await _credentials(driver)
    sizes = await _sizes(driver, credentials, types, places)
    prices = await _prices(driver, credentials, billing_endpoint, {family_of(t) for t in sizes},
                           {region_of(z) for z in places})
    offers: list[Offer] = []
    for t in types:
        if t not in sizes:
            log.warning("catalog_unknown_type", provider=PROVIDER, machine_type=t, zones=places)
            continue
        for zone, size in sizes[t].items():
            region = region_of(zone)
            for spot in (False, True):
                price = _price(size, prices, region, spot)
                offers.append(Offer(PROVIDER, t, zone, spot, size.cpus, size.memory_gb, price, region, size.gpus,
                                    arch=size.arch))
        _warn_unpriced(t, sizes[t], prices)
    return offers


def _price(size: MachineType, prices: Mapping[PriceKey, float], region: str, spot: bool) -> float | None:
    if _unpriced_reason(size):
        return None
    family = family_of(size.name)
    core, ram = prices.get((family, region, spot, CORE)), prices.get((family, region, spot, RAM))
    if core is None or ram is None:
        return None
    return size.cpus * core + size.memory_gb * ram


def _unpriced_reason(size: MachineType) -> str:
    if size.shared_core or family_of(size.name) in SHARED_CORE_FAMILIES:
        return "shared-core: billed as a fraction of a vCPU, which the machine type does not state"
    if "custom" in size.name:
        return "custom machine type: priced by its own SKUs, which are not read"
    if size.gpus:
        return "its GPUs are billed by separate SKUs, which are not added"
    return ""


def _warn_unpriced(machine_type: str, sizes: Mapping[str, MachineType], prices: Mapping[PriceKey, float]) -> None:
    size = next(iter(sizes.values()))
    if reason := _unpriced_reason(size):
        log.warning("catalog_unpriced_type", provider=PROVIDER, machine_type=machine_type, reason=reason)
        return
    family = family_of(machine_type)
    for region in sorted({region_of(z) for z in sizes}):
        for spot in (False, True):
            if any((family, region, spot, kind) not in prices for kind in (CORE, RAM)):
                log.warning("catalog_unpriced_type", provider=PROVIDER, machine_type=machine_type, region=region,
                            spot=spot, reason=f"no {family.upper()} Core and Ram price in the catalog for {region}")


# ---- credentials ----

async def _credentials(driver: GcpDriver) -> Any:
    """The driver's credentials (loaded in its pool: reading a key or asking ADC blocks)."""
    try:
        return await driver._call(_load_credentials, driver)
    except Exception as exc:
        raise classify(exc, "catalog") from exc


def _load_credentials(driver: GcpDriver) -> Any:
    return driver._credentials if driver._credentials is not None else driver._load_credentials("catalog")


async def _auth_headers(driver: GcpDriver, credentials: Any, url: str) -> dict[str, str]:
    """Headers carrying a bearer token for the Billing API (none for AnonymousCredentials)."""

    def apply() -> dict[str, str]:
        import requests
        from google.auth import compute_engine
        from google.auth.credentials import Scoped
        from google.auth.transport.requests import Request

        creds = credentials
        # A GCE VM's token carries the VM's access scopes whatever is asked for: leave those as they are.
        if isinstance(creds, Scoped) and not isinstance(creds, compute_engine.Credentials):
            creds = creds.with_scopes([BILLING_SCOPE])  # type: ignore[no-untyped-call]  # google-auth: unannotated
        headers: dict[str, str] = {}
        with requests.Session() as session:
            creds.before_request(Request(session), "GET", url, headers)
        return headers

    try:
        return await driver._call(apply)
    except Exception as exc:
        raise classify(exc, "catalog") from exc


# ---- sizes: Compute Engine machineTypes ----

async def _sizes(driver: GcpDriver, credentials: Any, types: Sequence[str],
                 zones: Sequence[str]) -> dict[str, dict[str, MachineType]]:
    """type -> zone -> size, for each allowed type in each zone that sells it."""

    def build() -> Any:
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        options = ClientOptions(api_endpoint=driver.api_endpoint) if driver.api_endpoint else None
        return compute_v1.MachineTypesClient(credentials=credentials, client_options=options)

    def in_zone(client: Any, zone: str) -> list[MachineType]:
        from google.api_core import exceptions as api
        from google.api_core import retry as retries

        retry = retries.Retry(initial=0.2, maximum=5.0, multiplier=2.0, timeout=READ_RETRY_S,
                              predicate=retries.if_exception_type(api.ServiceUnavailable, api.DeadlineExceeded))
        found = []
        for t in types:
            try:
                mt = client.get(project=driver.project_id, zone=zone, machine_type=t, retry=retry,
                                timeout=CALL_TIMEOUT_S)
            except api.NotFound as exc:
                # The message starts with the request's URL, which names the type whatever was not found.
                if f"machineTypes/{t}' was not found" not in str(exc.message):
                    raise  # the project or the zone is unknown, not the type
                continue  # not sold in this zone (or at all)
            gpus = sum(int(a.guest_accelerator_count) for a in mt.accelerators)
            found.append(MachineType(t, int(mt.guest_cpus), int(mt.memory_mb) / 1024, gpus, bool(mt.is_shared_cpu),
                                     arch_of(t, str(mt.architecture))))
        return found

    client: Any = None
    try:
        client = await driver._call(build)
        # Every zone's calls end before the client closes, even when one fails.
        per_zone = await asyncio.gather(*(driver._call(in_zone, client, z) for z in zones), return_exceptions=True)
        failed = next((r for r in per_zone if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
    except Exception as exc:
        raise classify(exc, "catalog") from exc
    finally:
        if client is not None:
            await driver._call(client.transport.close)
    sizes: dict[str, dict[str, MachineType]] = {}
    for zone, found in zip(zones, per_zone, strict=True):
        assert not isinstance(found, BaseException)
        for size in found:
            sizes.setdefault(size.name, {})[zone] = size
    return sizes


# ---- prices: the Cloud Billing Catalog API ----

async def _prices(driver: GcpDriver, credentials: Any, endpoint: str, families: set[str],
                  regions: set[str]) -> dict[PriceKey, float]:
    """USD per vCPU-hour and per GiB-hour for these families and regions, on-demand and spot."""
    url = f"{endpoint.rstrip('/')}/v1/services/{COMPUTE_SERVICE_ID}/skus"
    if not families:
        return {}
    # One token for the whole listing: google-auth hands out one valid for minutes at least, and
    # the listing takes seconds.
    headers = await _auth_headers(driver, credentials, url)
    prices: dict[PriceKey, float] = {}
    timeout = aiohttp.ClientTimeout(total=BILLING_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        token = ""
        for _ in range(BILLING_MAX_PAGES):
            params = {"currencyCode": CURRENCY, "pageSize": str(BILLING_PAGE_SIZE)}
            if token:
                params["pageToken"] = token
            body = await _get_json(session, url, params, headers)
            skus = body.get("skus")
            if not isinstance(skus, list) or not all(isinstance(s, Mapping) for s in skus):
                raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered without "
                                    "a `skus` list of objects: is billing_endpoint the Cloud Billing API?")
            for sku in skus:
                _add(prices, sku, url, families, regions)
            next_token = body.get("nextPageToken") or ""
            if not isinstance(next_token, str):
                raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered a "
                                    f"non-string nextPageToken: {next_token!r}")
            if not next_token:
                return prices
            token = next_token
    raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} kept paging past "
                        f"{BILLING_MAX_PAGES} pages: is billing_endpoint the Cloud Billing API?")


def _add(prices: dict[PriceKey, float], sku: Mapping[str, Any], url: str, families: set[str],
         regions: set[str]) -> None:
    """Record one SKU's price if it is a Core or Ram price of a wanted family and region."""
    category = sku.get("category")
    description = str(sku.get("description", ""))
    if not isinstance(category, Mapping) or category.get("resourceFamily") != "Compute":
        return
    usage = category.get("usageType")
    group = str(category.get("resourceGroup", ""))
    m = DESCRIPTION.match(description)
    if usage not in (ON_DEMAND, PREEMPTIBLE) or group not in RESOURCE_GROUPS or m is None:
        return
    kind = m["kind"]
    family = _series_family(m["series"])
    wanted = regions.intersection(str(r) for r in sku.get("serviceRegions") or [])
    if not family or family not in families or not wanted:
        return
    price = _unit_price(sku, url, UNITS[kind])
    if price is None:
        return
    for region in wanted:
        key = (family, region, usage == PREEMPTIBLE, kind)
        if key in prices and prices[key] != price:
            # Two list prices for one thing: keep the dearer, so a cost cap errs on the safe side.
            log.warning("catalog_duplicate_price", provider=PROVIDER, family=family, region=region, kind=kind,
                        spot=key[2], prices=sorted((prices[key], price)))
            price = max(prices[key], price)
        prices[key] = price


def _series_family(series: str) -> str | None:
    """"E2 Instance" -> e2, "N2D AMD Instance" -> n2d, "Compute optimized" -> c2; None for anything else
    (custom, extended, sole tenancy, premium, reserved)."""
    if series in SERIES_ALIASES:
        return SERIES_ALIASES[series]
    m = SERIES.match(series)
    return m["family"].lower() if m else None


def _unit_price(sku: Mapping[str, Any], url: str, unit: str) -> float | None:
    """USD per unit from the last tier of the first pricingInfo; None (with a warning) for another unit."""
    description = sku.get("description")
    try:
        expression = sku["pricingInfo"][0]["pricingExpression"]
        usage_unit = expression["usageUnit"]
        rate = expression["tieredRates"][-1]["unitPrice"]
        currency = rate.get("currencyCode", CURRENCY)
        price = int(rate.get("units") or 0) + int(rate.get("nanos") or 0) / 1e9
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} lists SKU "
                            f"{sku.get('skuId')} ({description}) without a readable price "
                            f"(pricingInfo[0].pricingExpression.tieredRates[-1].unitPrice): {exc!r}") from exc
    if usage_unit != unit or currency != CURRENCY:
        log.warning("catalog_sku_unexpected_unit", provider=PROVIDER, sku=sku.get("skuId"), description=description,
                    unit=usage_unit, currency=currency, expected=f"{unit} {CURRENCY}")
        return None
    return price


async def _get_json(session: aiohttp.ClientSession, url: str, params: Mapping[str, str],
                    headers: Mapping[str, str]) -> Mapping[str, Any]:
    try:
        async with session.get(url, params=params, headers=headers) as resp:
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransientProviderError(PROVIDER, "catalog", f"cannot reach the Cloud Billing Catalog API at {url}: "
                                     f"{type(exc).__name__}: {exc}") from exc
    if status in (401, 403):
        raise ProviderAuthError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} refused the "
                                f"credentials (HTTP {status}: {_google_message(text)}): {AUTH_HINT}")
    if status == 429 or status >= 500:
        raise TransientProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered HTTP "
                                     f"{status}: {_google_message(text)}")
    if status != 200:
        raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered HTTP {status}: "
                            f"{_google_message(text)} (is billing_endpoint the Cloud Billing API?)")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered malformed JSON "
                            f"({exc}): {text[:200]!r}") from exc
    if not isinstance(body, Mapping):
        raise ProviderError(PROVIDER, "catalog", f"the Cloud Billing Catalog API at {url} answered "
                            f"{type(body).__name__} where an object was expected")
    return body


def _google_message(text: str) -> str:
    """`error.message` of a Google error body, else the body's start."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200].strip()
    return str(message)[:300]
