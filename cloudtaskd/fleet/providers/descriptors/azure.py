"""Azure as the daemon sees it: its section (sections/azure.py) checked, and how to build its driver
(providers/azure.py), catalog (catalog/azure.py) and checks. The Azure SDK is imported only when one
of them runs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from cloudtaskd.configtypes import ConfigWarning, together
from cloudtaskd.fleet.providers.descriptors import Section, cloud
from cloudtaskd.fleet.providers.sections.azure import AzureProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.fleet.catalog import Fetcher
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.cloud import CloudDriver


def _validate(c: AzureProviderConfig, where: Section) -> list[ConfigWarning]:
    together(where.source, where.at, True,
             {"tenant_id": c.tenant_id, "client_id": c.client_id, "client_secret": c.client_secret},
             " (a service principal), or none for DefaultAzureCredential")
    return []


def _driver(c: AzureProviderConfig, daemon_id: str) -> CloudDriver:
    from cloudtaskd.fleet.providers.azure import AzureDriver

    return AzureDriver(c.subscription_id, c.resource_group, c.location, daemon_id,
                       tenant_id=c.tenant_id or None, client_id=c.client_id or None,
                       client_secret=c.client_secret or None, base_url=c.base_url or None)


def _catalog(c: AzureProviderConfig, driver: CloudDriver, machine_types: Sequence[str]) -> Fetcher:
    from cloudtaskd.fleet.catalog.azure import fetch_offers
    from cloudtaskd.fleet.providers.azure import AzureDriver

    assert isinstance(driver, AzureDriver)
    return partial(fetch_offers, driver, machine_types, prices_url=c.retail_prices_url, zones=c.zones)


async def _check(c: AzureProviderConfig, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.errors import ProviderError
    from cloudtaskd.fleet.providers.azure import AzureDriver
    from cloudtaskd.fleet.providers.checks import CheckResult

    try:
        driver = AzureDriver(c.subscription_id, c.resource_group, c.location, "check", tenant_id=c.tenant_id or None,
                             client_id=c.client_id or None, client_secret=c.client_secret or None,
                             base_url=c.base_url or None)
    except ProviderError as err:
        return [CheckResult("azure", "config", "FAIL", str(err))]
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), max_instances=c.max_instances,
                                  cpus=c.cpus, spot=c.spot, image=c.image or None, cheap=cheap)
    finally:
        await driver.close()


DESCRIPTOR = cloud("azure", AzureProviderConfig, driver=_driver, check=_check, catalog=_catalog,
                   required=("subscription_id", "resource_group", "location", "machine_type"), validate=_validate)
