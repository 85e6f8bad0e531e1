"""Every provider says what it can sell: the offers the orchestrator ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cloudtaskd.config import LocalProviderConfig, SshHostConfig, SshProviderConfig
from cloudtaskd.fleet.providers.base import Offer
from cloudtaskd.fleet.providers.cloud import CloudProvider, CloudSettings, CloudVm, CreateRequest
from cloudtaskd.fleet.providers.local import LocalProvider
from cloudtaskd.fleet.providers.ssh import SshProvider
from cloudtaskd.fleet.runtime import RuntimeBuilder


class NoCloud:
    """A driver that is never called: offers() needs none."""

    name = "aws"

    async def create(self, req: CreateRequest) -> CloudVm:
        raise AssertionError("not called")

    async def get(self, instance_id: str) -> CloudVm | None:
        raise AssertionError("not called")

    async def delete(self, instance_id: str) -> None:
        raise AssertionError("not called")

    async def list(self) -> list[CloudVm]:
        raise AssertionError("not called")

    async def close(self) -> None:
        pass


class NoPins:
    async def get(self, instance_id: str) -> str | None:
        return None

    async def set(self, instance_id: str, key: str) -> None:
        raise AssertionError("not called")


def test_local_offers_this_host_for_free(tmp_path: Path) -> None:
    assert LocalProvider(LocalProviderConfig(cpus=3), tmp_path).offers() == [
        Offer("local", "local", "localhost", False, 3, price_per_hour=0.0)]


def test_ssh_offers_each_configured_host(tmp_path: Path) -> None:
    async def no_pin(address: str, port: int) -> str | None:
        return None

    async def set_pin(address: str, port: int, key: str) -> None:
        raise AssertionError("not called")

    hosts = (SshHostConfig(address="10.0.0.5", cpus=8, key_file="k"),
             SshHostConfig(address="10.0.0.6", port=2222, cpus=2, key_file="k"))
    offers = SshProvider(SshProviderConfig(hosts=hosts), tmp_path, no_pin, set_pin, RuntimeBuilder(tmp_path)).offers()
    assert [(o.provider, o.zone, o.cpus, o.spot, o.price_per_hour) for o in offers] == [
        ("ssh", "10.0.0.5:22", 8, False, 0.0), ("ssh", "10.0.0.6:2222", 2, False, 0.0)]


def test_cloud_offers_its_configured_type_and_market(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = CloudSettings("c7g.large", "us-west-2b", True, 2, "ubuntu", key, on_demand_fallback=False)
    offers = CloudProvider(NoCloud(), settings, "d1", tmp_path, NoPins(), RuntimeBuilder(tmp_path)).offers()
    assert offers == [Offer("aws", "c7g.large", "us-west-2b", True, 2)]
    assert offers[0].price_per_hour is None  # unknown until the catalog prices it


def test_cloud_offers_come_from_the_catalog_for_every_allowed_type_zone_and_market(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = CloudSettings("c5.large", "us-east-1a", True, 2, "ubuntu", key, machine_types=("c5.xlarge", "x9.huge"),
                             zones=("us-east-1b",))
    provider = CloudProvider(NoCloud(), settings, "d1", tmp_path, NoPins(), RuntimeBuilder(tmp_path))
    priced = {(t, z, spot): Offer("aws", t, z, spot, cpus, cpus * 2.0, price, "us-east-1")
              for t, cpus in (("c5.large", 2), ("c5.xlarge", 4), ("m5.large", 2))
              for z in ("us-east-1a", "us-east-1b", "us-east-1c")
              for spot, price in ((True, 0.03 * cpus), (False, 0.085 * cpus))}
    # No catalog yet: the configured type alone, in each zone, spot then on-demand (the fallback).
    assert [(o.machine_type, o.zone, o.spot, o.price_per_hour) for o in provider.offers()] == [
        ("c5.large", "us-east-1a", True, None), ("c5.large", "us-east-1b", True, None),
        ("c5.large", "us-east-1a", False, None), ("c5.large", "us-east-1b", False, None)]
    provider.catalog = list(priced.values())
    offers = provider.offers()
    # Only the allowed types and zones; a type the catalog does not know (x9.huge) is not guessed.
    assert {(o.machine_type, o.zone, o.spot) for o in offers} == {
        (t, z, spot) for t in ("c5.large", "c5.xlarge") for z in ("us-east-1a", "us-east-1b") for spot in (True, False)}
    assert all(o == priced[(o.machine_type, o.zone, o.spot)] for o in offers)
