"""GCP as the daemon sees it: its section (sections/gcp.py), and how to build its driver
(providers/gcp.py), catalog (catalog/gcp.py) and checks. google-cloud-compute is imported only when
one of them runs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from cloudtaskd.fleet.providers.descriptors import cloud
from cloudtaskd.fleet.providers.sections.gcp import GcpProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.fleet.catalog import Fetcher
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.cloud import CloudDriver


def _driver(c: GcpProviderConfig, daemon_id: str) -> CloudDriver:
    from cloudtaskd.fleet.providers.gcp import GcpDriver

    return GcpDriver(c.project_id, c.zone, daemon_id, credentials_file=c.credentials_file or None,
                     api_endpoint=c.api_endpoint or None, image=c.image or None, network=c.network,
                     subnetwork=c.subnetwork or None, disk_type=c.disk_type or None)


def _catalog(c: GcpProviderConfig, driver: CloudDriver, machine_types: Sequence[str]) -> Fetcher:
    from cloudtaskd.fleet.catalog.gcp import fetch_offers
    from cloudtaskd.fleet.providers.gcp import GcpDriver

    assert isinstance(driver, GcpDriver)
    return partial(fetch_offers, driver, machine_types, billing_endpoint=c.billing_endpoint, zones=c.zones)


async def _check(c: GcpProviderConfig, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.errors import ProviderError
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.gcp import GcpDriver

    try:
        driver = GcpDriver(c.project_id, c.zone, "check", credentials_file=c.credentials_file or None,
                           api_endpoint=c.api_endpoint or None, image=c.image or None, network=c.network,
                           subnetwork=c.subnetwork or None, disk_type=c.disk_type or None)
    except ProviderError as err:
        return [CheckResult("gcp", "config", "FAIL", str(err))]
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), zones=c.zones,
                                  max_instances=c.max_instances, cpus=c.cpus, spot=c.spot, cheap=cheap)
    finally:
        await driver.close()


DESCRIPTOR = cloud("gcp", GcpProviderConfig, driver=_driver, check=_check, catalog=_catalog,
                   required=("project_id", "zone", "machine_type"))
