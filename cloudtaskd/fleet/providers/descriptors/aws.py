"""AWS as the daemon sees it: its section (sections/aws.py) checked, and how to build its driver
(providers/aws.py), catalog (catalog/aws.py) and checks. boto is imported only when one of them runs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from cloudtaskd.configtypes import ConfigWarning, together
from cloudtaskd.errors import ConfigError
from cloudtaskd.fleet.providers.descriptors import Section, cloud
from cloudtaskd.fleet.providers.sections.aws import AwsProviderConfig

if TYPE_CHECKING:
    from cloudtaskd.fleet.catalog import Fetcher
    from cloudtaskd.fleet.providers.checks import CheckResult
    from cloudtaskd.fleet.providers.cloud import CloudDriver


def _validate(c: AwsProviderConfig, where: Section) -> list[ConfigWarning]:
    together(where.source, where.at, True, {"access_key": c.access_key, "secret_key": c.secret_key},
             ", or neither for the standard AWS credential chain")
    for key, prefix, what in (("subnet_id", "subnet-", "a subnet id"), ("security_group_id", "sg-",
                                                                       "a security group id")):
        value = getattr(c, key)
        if value and not value.startswith(prefix):
            # A name or a VPC id here would only fail at the first launch, as a bad request.
            raise ConfigError(where.source, f"{where.at}.{key}", f"expected {what} ({prefix}...), got {value!r}")
    if c.subnet_id and c.zones:
        raise ConfigError(where.source, f"{where.at}.zones", f"a subnet lies in one zone: with {where.at}.subnet_id, "
                          "leave zones empty (and zone empty, or the subnet's zone)")
    return []


def _driver(c: AwsProviderConfig, daemon_id: str) -> CloudDriver:
    from cloudtaskd.fleet.providers.aws import AwsDriver

    return AwsDriver(c.region, daemon_id, access_key=c.access_key or None, secret_key=c.secret_key or None,
                     endpoint_url=c.endpoint_url or None, image=c.image or None,
                     subnet_id=c.subnet_id or None, security_group_id=c.security_group_id or None)


def _catalog(c: AwsProviderConfig, driver: CloudDriver, machine_types: Sequence[str]) -> Fetcher:
    from cloudtaskd.fleet.catalog.aws import fetch_offers
    from cloudtaskd.fleet.providers.aws import AwsDriver

    assert isinstance(driver, AwsDriver)
    return partial(fetch_offers, driver, machine_types, pricing_endpoint_url=c.pricing_endpoint_url or None)


async def _check(c: AwsProviderConfig, cheap: bool) -> list[CheckResult]:
    from cloudtaskd.fleet.providers.aws import AwsDriver

    driver = AwsDriver(c.region, "check", access_key=c.access_key or None, secret_key=c.secret_key or None,
                       endpoint_url=c.endpoint_url or None, image=c.image or None, max_attempts=2)
    try:
        return await driver.check(machine_types=(c.machine_type, *c.machine_types), zones=c.zones or (
            (c.zone,) if c.zone else ()), max_instances=c.max_instances, cpus=c.cpus, cheap=cheap)
    finally:
        await driver.close()


DESCRIPTOR = cloud("aws", AwsProviderConfig, driver=_driver, check=_check, catalog=_catalog,
                   required=("region", "machine_type"), validate=_validate)
