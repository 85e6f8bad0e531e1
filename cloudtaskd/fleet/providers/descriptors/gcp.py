"""GCP as the daemon sees it: the `providers.gcp` section, and how to build its driver (providers/gcp.py),
catalog (catalog/gcp.py) and checks. google-cloud-compute is imported only when one of them runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from cloudtaskd.fleet.providers.descriptors import CloudProviderConfig, cloud

if TYPE_CHECKING:
    from cloudtaskd.fleet.catalog import Fetcher
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.cloud import CloudDriver


@dataclass(frozen=True)
class GcpProviderConfig(CloudProviderConfig):
    project_id: str = ""
    zone: str = "us-central1-a"
    # Service-account JSON. Empty: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
    # the gcloud user file, the metadata server).
    credentials_file: str = ""
    api_endpoint: str = ""  # an emulator, scheme included (http://127.0.0.1:PORT)
    # The Cloud Billing Catalog API (list prices; needs the Cloud Billing API enabled); an emulator in tests.
    billing_endpoint: str = "https://cloudbilling.googleapis.com"
    machine_type: str = "e2-standard-2"
    # The VPC network for the VMs (a name in project_id, or `projects/HOST/global/networks/NAME`), and
    # its subnetwork (a name in the zone's region, or a path); custom-mode networks need one.
    network: str = "default"
    subnetwork: str = ""
    disk_type: str = ""  # the boot disk's type; empty: chosen per machine series (pd-/hyperdisk-balanced)

    @property
    def placement(self) -> str:
        return self.zone


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
