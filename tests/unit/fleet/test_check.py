"""`cloudtaskctl check` against the stand-ins: moto's EC2 as a real HTTP server for AWS (a good
config; a bad instance type and a missing image), the Compute Engine and ARM stand-ins for GCP and
Azure (a good config; a missing machine type, image, network, an exceeded quota), a real TCP port
for an ssh host, and the local provider. Run as a user runs it: the real command, no daemon (in a
thread where a stand-in serves on the test's event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from io import StringIO
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials

from cloudtaskd.ctl.main import main as ctl_main
from tests.fakes.azure_standin import ArmStandin
from tests.fakes.gcp_standin import ComputeStandin, quota
from tests.fakes.moto_ec2 import MotoEc2
from tests.fakes.serving import serving
from tests.procs import free_port
from tests.unit.fleet.test_azure import DaemonAzureDriver


def check(tmp_path: Path, config: dict[str, object]) -> tuple[int, list[str]]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **config}))
    out, err = StringIO(), StringIO()
    rc = ctl_main(["check", "--config", str(path)], out=out, err=err)
    return rc, out.getvalue().splitlines() + err.getvalue().splitlines()


def aws(moto: MotoEc2, **over: object) -> dict[str, object]:
    return {"providers": {"local": {"enabled": False}, "aws": {
        "enabled": True, "region": "us-east-1", "endpoint_url": moto.url, "access_key": "testing",
        "secret_key": "testing", "machine_type": "t3.small", **over}},
        "agents": {"public_url": "wss://control.example:8443/v1/agent"}}


def test_a_good_aws_config_passes(tmp_path: Path, moto: MotoEc2, creds: None) -> None:
    moto.reset()
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]  # one of moto's own
    rc, lines = check(tmp_path, aws(moto, image=image))
    assert rc == 0, lines
    text = "\n".join(lines)
    for what in ("aws: credentials", "aws: instance type t3.small", f"aws: image {image}", "aws: ssh rule",
                 "agents: address"):
        assert f"ok    {what}" in text, text
    assert "warn  aws: quota" in text  # moto has no Service Quotas: said, not hidden


def test_a_bad_instance_type_and_a_missing_image_fail_with_what_to_fix(tmp_path: Path, moto: MotoEc2,
                                                                       creds: None) -> None:
    moto.reset()
    rc, lines = check(tmp_path, aws(moto, machine_type="t3.nonesuch", image="ami-0123456789abcdef0"))
    assert rc == 1, lines
    bad_type = next(line for line in lines if "instance type t3.nonesuch" in line)
    assert bad_type.startswith("FAIL") and "machine_type" in bad_type
    bad_image = next(line for line in lines if "image ami-0123456789abcdef0" in line)
    assert bad_image.startswith("FAIL") and "providers.aws.image" in bad_image


def test_ssh_hosts_and_the_agents_address(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("not really a key, but readable\n")
    rc, lines = check(tmp_path, {"providers": {"ssh": {"hosts": [
        {"address": "127.0.0.1", "port": free_port(), "key_file": str(key)},
        {"address": "127.0.0.1", "port": 22, "key_file": str(tmp_path / "missing")}]}}})
    assert rc == 1, lines
    text = "\n".join(lines)
    assert "ok    local: this host" in text
    assert "FAIL  ssh: host 127.0.0.1:" in text and "no answer on port" in text
    assert "key_file" in text and "is not readable" in text
    # Without agents.public_url, remote agents come through the SSH tunnels: nothing to open here.
    assert "ok    agents: address: ssh instances' agents come through the daemon's SSH connections" in text


def test_local_only_passes(tmp_path: Path) -> None:
    rc, lines = check(tmp_path, {})
    assert rc == 0, lines
    assert any(line.startswith("ok    local") for line in lines)


# ---- GCP: the Compute Engine stand-in ----

@pytest.fixture
async def gce(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ComputeStandin]:
    import cloudtaskd.fleet.providers.gcp as gcp_module

    class AnonymousGcpDriver(gcp_module.GcpDriver):
        """The driver check builds, with anonymous credentials (the stand-in checks none)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, credentials=AnonymousCredentials())

    monkeypatch.setattr(gcp_module, "GcpDriver", AnonymousGcpDriver)
    async with serving(ComputeStandin()) as server:
        yield server


def gcp(gce: ComputeStandin, **over: object) -> dict[str, object]:
    return {"providers": {"local": {"enabled": False}, "gcp": {
        "enabled": True, "project_id": "test-project", "zone": "us-central1-a", "api_endpoint": gce.url,
        "machine_type": "e2-standard-4", "cpus": 4, "max_instances": 4, **over}},
        "agents": {"public_url": "wss://control.example:8443/v1/agent"}}


async def test_a_good_gcp_config_passes(tmp_path: Path, gce: ComputeStandin) -> None:
    from cloudtaskd.fleet.providers.gcp import DEFAULT_IMAGE

    rc, lines = await asyncio.to_thread(check, tmp_path, gcp(gce, machine_types=["n2-standard-2"],
                                                             zones=["us-central1-b"]))
    assert rc == 0, lines
    text = "\n".join(lines)
    for what in ("gcp: credentials: project test-project", "gcp: machine type e2-standard-4: 4 vCPUs, 16 GB",
                 "gcp: machine type n2-standard-2: 2 vCPUs, 8 GB; not in us-central1-b", f"gcp: image {DEFAULT_IMAGE}",
                 "gcp: network default", "gcp: ssh rule: firewall rule default-allow-ssh admits tcp:22",
                 "gcp: quota CPUS in us-central1: 24 of 24 free, 16 needed at most",
                 "gcp: quota N2_CPUS in us-central1: 24 of 24 free", "agents: address"):
        assert f"ok    {what}" in text, text
    assert not any(c.http_method != "GET" for c in gce.calls), gce.calls  # reads only


async def test_gcp_missing_type_image_network_and_quota_fail_with_what_to_fix(tmp_path: Path,
                                                                               gce: ComputeStandin) -> None:
    gce.quotas["us-central1"][0] = quota("CPUS", 24.0, usage=20.0)
    family = "projects/ubuntu-os-cloud/global/images/family/ubuntu-1404-lts"
    rc, lines = await asyncio.to_thread(check, tmp_path, gcp(gce, machine_type="e2-nonesuch-4", image=family))
    assert rc == 1, lines
    text = "\n".join(lines)
    assert "ok    gcp: credentials" in text, text
    assert ("FAIL  gcp: machine type e2-nonesuch-4: not offered in us-central1-a: fix providers.gcp.machine_type"
            in text), text
    assert (f"FAIL  gcp: image {family}: no image family ubuntu-1404-lts in project ubuntu-os-cloud: set "
            "providers.gcp.image" in text), text
    assert ("FAIL  gcp: quota CPUS in us-central1: 4 of 24 free (20 in use), below the 16 vCPUs max_instances x cpus "
            "may use" in text and "lower providers.gcp.max_instances" in text), text

    # No network of that name; and with the default network but no rule admitting SSH, the check
    # says what the first launch will make, and makes nothing itself.
    del gce.firewalls["default-allow-ssh"]
    gce.quotas["us-central1"][0] = quota("CPUS", 24.0)
    rc, lines = await asyncio.to_thread(check, tmp_path, gcp(gce, network="nonesuch"))
    text = "\n".join(lines)
    assert rc == 1 and "FAIL  gcp: network nonesuch: gcp: check: the VPC network 'nonesuch' does not exist" in text
    assert "set providers.gcp.network" in text, text
    rc, lines = await asyncio.to_thread(check, tmp_path, gcp(gce))
    assert rc == 0, lines
    assert ("ok    gcp: ssh rule: no rule on default admits tcp:22 yet: the first launch creates cloudtask-ssh-default"
            in "\n".join(lines)), lines
    assert not gce.calls_of("firewalls.insert")


async def test_a_bad_gcp_zone_fails_and_the_credentials_still_pass(tmp_path: Path, gce: ComputeStandin) -> None:
    rc, lines = await asyncio.to_thread(check, tmp_path, gcp(gce, zones=["us-central1-z"]))
    assert rc == 1, lines
    text = "\n".join(lines)
    assert "ok    gcp: credentials" in text and "ok    gcp: machine type e2-standard-4" in text, text
    assert "FAIL  gcp: zone us-central1-z: no such zone in project test-project: fix providers.gcp.zone" in text


# ---- Azure: the ARM stand-in ----

def azure_sku(name: str, cpus: int, memory_gb: int, family: str) -> dict[str, Any]:
    """A VM size as the Resource SKUs API lists it."""
    return {"resourceType": "virtualMachines", "name": name, "tier": "Standard", "size": name.split("_", 1)[1],
            "family": family, "locations": ["eastus"], "locationInfo": [{"location": "eastus", "zones": ["1", "2"]}],
            "capabilities": [{"name": "vCPUs", "value": str(cpus)}, {"name": "MemoryGB", "value": str(memory_gb)}],
            "restrictions": []}


@pytest.fixture
async def arm(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ArmStandin]:
    import cloudtaskd.fleet.providers.azure as azure_module

    monkeypatch.setattr(azure_module, "AzureDriver", DaemonAzureDriver)  # its test credential over plain http
    server = ArmStandin()
    server.skus = [azure_sku("Standard_D2s_v5", 2, 8, "standardDSv5Family"),
                   azure_sku("Standard_F4s_v2", 4, 8, "standardFSv2Family")]
    async with serving(server):
        yield server


def azure(arm: ArmStandin, **over: object) -> dict[str, object]:
    return {"providers": {"local": {"enabled": False}, "azure": {
        "enabled": True, "subscription_id": "00000000-0000-0000-0000-000000000001", "resource_group": "ct-test",
        "location": "eastus", "base_url": arm.url, "machine_type": "Standard_D2s_v5", "cpus": 2, "max_instances": 3,
        **over}}, "agents": {"public_url": "wss://control.example:8443/v1/agent"}}


async def test_a_good_azure_config_passes(tmp_path: Path, arm: ArmStandin) -> None:
    rc, lines = await asyncio.to_thread(check, tmp_path, azure(arm, spot=False))
    assert rc == 0, lines
    text = "\n".join(lines)
    for what in ("azure: credentials: subscription 00000000-0000-0000-0000-000000000001; resource group ct-test is "
                 "made at the first launch", "azure: location eastus: 2 VM sizes",
                 "azure: machine type Standard_D2s_v5: 2 vCPUs, 8 GB",
                 "azure: image Canonical:",  # the default Ubuntu LTS (its newest version)
                 "azure: quota cores: 16 of 20 free, 6 needed at most",
                 "azure: quota standardDSv5Family: 6 of 10 free, 6 needed at most", "agents: address"):
        assert f"ok    {what}" in text, text
    assert {m for m, _ in arm.requests} == {"GET"}, arm.requests  # reads only


async def test_azure_missing_size_image_and_quota_fail_with_what_to_fix(tmp_path: Path, arm: ArmStandin) -> None:
    image = "Canonical:ubuntu-24_04-lts:server-nonesuch:latest"
    rc, lines = await asyncio.to_thread(check, tmp_path, azure(
        arm, machine_types=["Standard_F4s_v2", "Standard_Z9s_v9"], image=image, max_instances=11, spot=True))
    assert rc == 1, lines
    text = "\n".join(lines)
    assert "ok    azure: credentials" in text and "ok    azure: machine type Standard_F4s_v2" in text, text
    assert ("FAIL  azure: machine type Standard_Z9s_v9: not offered in eastus: fix providers.azure.machine_type"
            in text), text
    assert f"FAIL  azure: image {image}: no such image in eastus: set providers.azure.image" in text, text
    # Spot VMs count against the low-priority quota only: 20 free, 22 wanted.
    assert ("FAIL  azure: quota lowPriorityCores: 20 of 20 free in eastus (0 in use), below the 22 vCPUs "
            "max_instances x cpus may use" in text and "lower providers.azure.max_instances" in text), text
    assert "quota cores" not in text, text
