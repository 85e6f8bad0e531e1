"""The GCP driver through the real google-cloud-compute client against a local Compute Engine stand-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as api
from google.auth import exceptions as auth
from google.auth.credentials import AnonymousCredentials

from cloudtaskd.errors import (
    CapacityError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    QuotaExceeded,
    TransientProviderError,
)
from cloudtaskd.fleet.providers.base import ARM64, X86_64
from cloudtaskd.fleet.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CreateRequest
from cloudtaskd.fleet.providers.gcp import (
    DEFAULT_IMAGE,
    META_INSTANCES,
    NETWORK_TAG,
    GcpDriver,
    OperationError,
    boot_disk_type,
    classify,
    vm_name,
)
from tests.cloud_e2e import cloud_daemon, needs_sshd, reconcile_after_crash
from tests.conftest import wait_for
from tests.fakes.gcp_standin import ComputeStandin
from tests.procs import free_port

PROJECT, ZONE = "test-project", "us-central1-a"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd5pjkWPRG2g1DCrDL2qVdUwq0eGnWxSOZ6fzfJ2pYk test"
NO_CREDS = ("providers.gcp.credentials_file", "GOOGLE_APPLICATION_CREDENTIALS", "gcloud auth application-default login")


def make_driver(gce: ComputeStandin, daemon_id: str = "daemon1", **kwargs: Any) -> GcpDriver:
    return GcpDriver(PROJECT, ZONE, daemon_id, api_endpoint=gce.url, credentials=AnonymousCredentials(),
                     polling_interval_s=0.01, **kwargs)


@pytest.fixture
async def driver(gce: ComputeStandin) -> AsyncIterator[GcpDriver]:
    d = make_driver(gce)
    yield d
    await d.close()


def req(instance_id: str, *, spot: bool = False, machine_type: str = "e2-standard-2",
        daemon_id: str = "daemon1", arch: str = X86_64) -> CreateRequest:
    return CreateRequest(instance_id, daemon_id, machine_type, ZONE, spot, "ubuntu", PUBKEY, arch=arch)


def metadata(inst: dict[str, Any]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in inst["metadata"]["items"]}


def created(gce: ComputeStandin, instance_id: str) -> dict[str, Any]:
    inst = gce.instance(vm_name(instance_id))
    assert inst is not None, f"no VM for {instance_id}"
    return inst


async def test_create_spot_and_on_demand_with_labels_and_key(driver: GcpDriver, gce: ComputeStandin) -> None:
    spot = await driver.create(req("gcp-a1", spot=True))
    standard = await driver.create(req("gcp-a2", machine_type="n2-standard-4"))
    assert spot.instance_id == "gcp-a1" and spot.spot and not standard.spot
    assert spot.state in ("pending", "running") and spot.zone == ZONE
    assert spot.public_ip and spot.public_ip.startswith("198.51.100.")
    assert spot.cloud_id == f"projects/{PROJECT}/zones/{ZONE}/instances/ct-gcp-a1"

    a, b = created(gce, "gcp-a1"), created(gce, "gcp-a2")
    assert a["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                               "automaticRestart": False, "onHostMaintenance": "TERMINATE"}
    assert b["scheduling"] == {"provisioningModel": "STANDARD"}
    assert a["labels"] == {TAG_DAEMON: "daemon1", TAG_INSTANCE: "gcp-a1"}
    meta = metadata(a)
    assert meta["ssh-keys"] == f"ubuntu:{PUBKEY}" and meta["enable-guest-attributes"] == "TRUE"
    assert json.loads(meta[META_INSTANCES]) == {"ct-gcp-a1": "gcp-a1"}
    [disk] = a["disks"]
    assert disk["boot"] and disk["autoDelete"] and disk["initializeParams"]["sourceImage"] == DEFAULT_IMAGE
    [nic] = a["networkInterfaces"]
    assert nic["network"] == "global/networks/default"
    assert [ac["type"] for ac in nic["accessConfigs"]] == ["ONE_TO_ONE_NAT"]
    assert b["machineType"].endswith(f"/zones/{ZONE}/machineTypes/n2-standard-4")
    # One plain insert each; operations polled with short gets through our own endpoint, never `wait`.
    assert len(gce.calls_of("instances.insert")) == 2 and not gce.calls_of("instances.bulkInsert")
    assert gce.calls_of("zoneOperations.get") and not gce.calls_of("zoneOperations.wait")

    got = await driver.get("gcp-a1")
    assert got is not None and got.state == "running" and got.public_ip == spot.public_ip


async def test_os_login_off_network_tag_and_a_boot_disk_each_series_takes(driver: GcpDriver,
                                                                           gce: ComputeStandin) -> None:
    """OS Login would ignore the ssh-keys item; GCE's default pd-standard boot disk is refused by
    C3, C4 and N4 (the stand-in refuses it as GCE does), so the type is set per series."""
    await driver.create(req("gcp-o1", machine_type="e2-standard-2"))
    await driver.create(req("gcp-o2", machine_type="c4-standard-4", spot=True))
    await asyncio.gather(driver.create(req("gcp-o3", machine_type="n4-standard-2")),
                         driver.create(req("gcp-o4", machine_type="n4-standard-2")))
    e2, c4, n4 = created(gce, "gcp-o1"), created(gce, "gcp-o2"), created(gce, "gcp-o3")
    for inst in (e2, c4, n4):
        assert metadata(inst)["enable-oslogin"] == "FALSE"
        assert inst["tags"]["items"] == [NETWORK_TAG]
    assert e2["disks"][0]["initializeParams"]["diskType"] == f"zones/{ZONE}/diskTypes/pd-balanced"
    assert c4["disks"][0]["initializeParams"]["diskType"] == f"zones/{ZONE}/diskTypes/hyperdisk-balanced"
    [bulk] = gce.calls_of("instances.bulkInsert")  # an instance template's form: the type's name
    assert bulk.body["instanceProperties"]["disks"][0]["initializeParams"]["diskType"] == "hyperdisk-balanced"
    assert n4["disks"][0]["initializeParams"]["diskType"] == "hyperdisk-balanced"


def test_boot_disk_type_per_series() -> None:
    for machine_type in ("e2-medium", "n1-standard-1", "n2d-highmem-2", "t2a-standard-1", "c2-standard-4",
                         "a2-highgpu-1g", "custom-4-8192", "e2-custom-4-8192"):
        assert boot_disk_type(machine_type) == "pd-balanced", machine_type
    for machine_type in ("c3-standard-4", "c3d-highcpu-4", "c4-standard-2", "c4a-standard-1", "n4-highmem-2",
                         "h3-standard-88", "z3-highmem-88", "x4-960-16t", "a3-highgpu-8g"):
        assert boot_disk_type(machine_type) == "hyperdisk-balanced", machine_type


async def test_disk_type_from_config_overrides_the_series(gce: ComputeStandin) -> None:
    d = make_driver(gce, disk_type="pd-ssd")
    try:
        await d.create(req("gcp-p1"))
    finally:
        await d.close()
    assert created(gce, "gcp-p1")["disks"][0]["initializeParams"]["diskType"] == f"zones/{ZONE}/diskTypes/pd-ssd"


async def test_a_missing_network_names_the_key(driver: GcpDriver, gce: ComputeStandin) -> None:
    """A project with no `default` network (an organisation's policy): the create fails before any
    insert with an error that names providers.gcp.network."""
    with gce.lock:
        del gce.networks["default"]
    with pytest.raises(InvalidRequest) as info:
        await driver.create(req("gcp-m1"))
    text = str(info.value)
    assert text.startswith("gcp: prepare:") and "providers.gcp.network" in text and "'default'" in text
    assert isinstance(info.value.__cause__, api.NotFound)
    assert not gce.calls_of("instances.insert")


async def test_a_network_gone_after_the_check_is_classified_from_the_insert(driver: GcpDriver,
                                                                            gce: ComputeStandin) -> None:
    await driver.create(req("gcp-m2"))  # the network was checked, once
    with gce.lock:
        del gce.networks["default"]
    with pytest.raises(InvalidRequest) as info:
        await driver.create(req("gcp-m3"))
    text = str(info.value)
    assert "providers.gcp.network" in text and "The referenced network resource cannot be found" in text
    assert gce.instance(vm_name("gcp-m3")) is None


async def test_a_custom_network_and_subnetwork_get_a_tagged_ssh_rule_once(gce: ComputeStandin) -> None:
    """A custom-mode network with no rule that admits SSH: one rule is made, for our tag only, and
    a second driver finds it instead of making another."""
    gce.add_network("corp", auto=False, subnetworks={"us-central1": {"corp-a"}})
    # Rules that do not count: SSH to another tag, SSH on another network, disabled, another port.
    gce.add_firewall(PROJECT, {"name": "ssh-bastion", "network": "global/networks/corp", "targetTags": ["bastion"],
                               "sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}]})
    gce.add_firewall(PROJECT, {"name": "ssh-off", "network": "global/networks/corp", "disabled": True,
                               "sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}]})
    gce.add_firewall(PROJECT, {"name": "https", "network": "global/networks/corp", "sourceRanges": ["0.0.0.0/0"],
                               "allowed": [{"IPProtocol": "tcp", "ports": ["443", "8000-8080"]}]})
    for round_ in range(2):
        d = make_driver(gce, network="corp", subnetwork="corp-a")
        try:
            await d.create(req(f"gcp-n{round_}"))
        finally:
            await d.close()
    [insert] = gce.calls_of("firewalls.insert")
    rule = insert.body
    assert rule["name"] == "cloudtask-ssh-corp" and rule["targetTags"] == [NETWORK_TAG]
    assert rule["sourceRanges"] == ["0.0.0.0/0"] and rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}]
    assert rule["network"].endswith(f"/projects/{PROJECT}/global/networks/corp")
    assert gce.calls_of("globalOperations.get")  # its operation polled through our own endpoint
    [nic] = created(gce, "gcp-n0")["networkInterfaces"]
    assert nic["network"] == "global/networks/corp" and nic["subnetwork"] == "regions/us-central1/subnetworks/corp-a"


async def test_an_existing_rule_that_admits_ssh_is_used(gce: ComputeStandin) -> None:
    """The default network's own default-allow-ssh, or a rule for our tag with a port range."""
    d = make_driver(gce)
    try:
        await d.create(req("gcp-f1"))
    finally:
        await d.close()
    gce.add_network("lab")
    gce.add_firewall(PROJECT, {"name": "lab-ssh", "network": "global/networks/lab", "targetTags": [NETWORK_TAG],
                               "sourceRanges": ["10.0.0.0/8", "0.0.0.0/0"],
                               "allowed": [{"IPProtocol": "tcp", "ports": ["20-25"]}]})
    d = make_driver(gce, network="lab")
    try:
        await d.create(req("gcp-f2"))
    finally:
        await d.close()
    assert not gce.calls_of("firewalls.insert")
    assert len(gce.calls_of("firewalls.list")) == 2


async def test_a_custom_network_without_a_subnetwork_is_refused_as_gce_does(gce: ComputeStandin) -> None:
    gce.add_network("corp", auto=False, subnetworks={"us-central1": {"corp-a"}})
    d = make_driver(gce, network="corp")
    try:
        with pytest.raises(InvalidRequest, match=r"Subnetwork should be specified.*providers\.gcp\.subnetwork"):
            await d.create(req("gcp-s1"))
    finally:
        await d.close()


async def test_image_from_the_request_or_the_driver(gce: ComputeStandin) -> None:
    d = make_driver(gce, image="projects/debian-cloud/global/images/family/debian-12")
    try:
        await d.create(req("gcp-i1"))
        await d.create(CreateRequest("gcp-i2", "daemon1", "e2-small", ZONE, False, "u", PUBKEY,
                                     image="projects/p/global/images/mine"))
    finally:
        await d.close()
    assert created(gce, "gcp-i1")["disks"][0]["initializeParams"]["sourceImage"].endswith("family/debian-12")
    assert created(gce, "gcp-i2")["disks"][0]["initializeParams"]["sourceImage"] == "projects/p/global/images/mine"


async def test_concurrent_creates_are_one_bulk_insert_per_offer(driver: GcpDriver, gce: ComputeStandin) -> None:
    ids = [f"gcp-b{i}" for i in range(3)] + ["gcp-s0", "gcp-s1"]
    vms = await asyncio.gather(*(driver.create(req(i, spot=i.startswith("gcp-s"))) for i in ids))
    assert [v.instance_id for v in vms] == ids and len({v.cloud_id for v in vms}) == 5
    bulk = gce.calls_of("instances.bulkInsert")
    assert len(bulk) == 2 and not gce.calls_of("instances.insert")  # one call per (type, zone, market)
    by_count = {int(c.body["count"]): c.body for c in bulk}
    assert sorted(by_count) == [2, 3]
    standard, spot = by_count[3], by_count[2]
    assert int(standard["minCount"]) == 3  # all or nothing
    assert set(standard["perInstanceProperties"]) == {vm_name(i) for i in ids[:3]}
    assert standard["instanceProperties"]["scheduling"]["provisioningModel"] == "STANDARD"
    assert spot["instanceProperties"]["scheduling"]["provisioningModel"] == "SPOT"
    assert standard["instanceProperties"]["labels"] == {TAG_DAEMON: "daemon1"}
    for vm in vms:  # each VM then carries its own instance label, and the map names it exactly
        inst = created(gce, vm.instance_id)
        assert inst["labels"] == {TAG_DAEMON: "daemon1", TAG_INSTANCE: vm.instance_id}
        assert vm.tags[TAG_INSTANCE] == vm.instance_id
        assert json.loads(metadata(inst)[META_INSTANCES])[inst["name"]] == vm.instance_id
    assert {v.instance_id for v in await driver.list()} == set(ids)


async def test_create_is_idempotent_by_instance_id(driver: GcpDriver, gce: ComputeStandin) -> None:
    first = await driver.create(req("gcp-c1"))
    again = await driver.create(req("gcp-c1"))
    assert again.cloud_id == first.cloud_id and again.instance_id == "gcp-c1"
    assert len(gce.calls_of("instances.insert")) == 1

    # The look-up misses it (a stale read): the insert's 409 still returns the VM made before.
    gce.fail_next("instances.get", 404, "notFound")
    third = await driver.create(req("gcp-c1"))
    assert third.cloud_id == first.cloud_id and len(gce.calls_of("instances.insert")) == 2

    # A batch with one name already taken falls back to one insert per VM.
    gce.fail_next("instances.get", 404, "notFound", count=2)
    old, new = await asyncio.gather(driver.create(req("gcp-c1")), driver.create(req("gcp-c2")))
    assert old.cloud_id == first.cloud_id and new.instance_id == "gcp-c2"
    assert len(gce.calls_of("instances.bulkInsert")) == 1 and len(gce.calls_of("instances.insert")) == 4
    assert {v.instance_id for v in await driver.list()} == {"gcp-c1", "gcp-c2"}


async def test_a_batch_vm_whose_label_failed_is_still_known_by_its_id(driver: GcpDriver,
                                                                       gce: ComputeStandin) -> None:
    """As after a crash between bulkInsert and setLabels: the shared metadata map still names each VM."""
    gce.fail_next("instances.setLabels", 503, "backendError")
    vms = await asyncio.gather(driver.create(req("gcp-l1")), driver.create(req("gcp-l2")))
    unlabelled = [v.instance_id for v in vms if TAG_INSTANCE not in v.tags]
    assert len(unlabelled) == 1 and TAG_INSTANCE not in created(gce, unlabelled[0])["labels"]
    fresh = make_driver(gce)
    try:
        assert {v.instance_id for v in await fresh.list()} == {"gcp-l1", "gcp-l2"}
    finally:
        await fresh.close()


async def test_an_unreachable_endpoint_is_transient(gce: ComputeStandin) -> None:
    d = GcpDriver(PROJECT, ZONE, "daemon1", api_endpoint=f"http://127.0.0.1:{free_port()}",
                  credentials=AnonymousCredentials(), polling_interval_s=0.01)
    try:
        with pytest.raises(TransientProviderError, match="gcp: launch: ConnectionError") as info:
            await d.create(req("gcp-u1"))
    finally:
        await d.close()
    assert info.value.retryable


async def test_ids_that_are_not_valid_names_are_kept_exactly(driver: GcpDriver, gce: ComputeStandin) -> None:
    odd = ["GCP_Upper.1", "gcp_upper.1", "x" * 80]
    vms = await asyncio.gather(*(driver.create(req(i)) for i in odd))
    names = {vm_name(i) for i in odd}
    assert len(names) == 3 and all(len(n) <= 63 for n in names)  # the stand-in refuses invalid names
    assert {v.instance_id for v in vms} == set(odd)
    assert {v.instance_id for v in await driver.list()} == set(odd)
    fresh = make_driver(gce)  # no zone learned yet: found by name across zones
    try:
        got = await fresh.get("GCP_Upper.1")
        assert got is not None and got.instance_id == "GCP_Upper.1"
    finally:
        await fresh.close()


async def test_list_is_only_ours_and_delete_is_idempotent(driver: GcpDriver, gce: ComputeStandin) -> None:
    other = make_driver(gce, "daemon2")
    try:
        await other.create(req("gcp-x", daemon_id="daemon2"))
    finally:
        await other.close()
    gce.add_instance(PROJECT, "europe-west1-b", {"name": "unlabelled"})
    gce.add_instance(PROJECT, "europe-west1-b", {"name": "stopped-one", "labels": {TAG_DAEMON: "daemon1"},
                                                 "metadata": {"items": [{"key": META_INSTANCES,
                                                                         "value": '{"stopped-one": "gcp-st"}'}]}},
                     status="TERMINATED")
    mine = [await driver.create(req(f"gcp-d{i}")) for i in range(3)]
    gce.page_size = 2  # the list comes in pages: all of them are read
    listed = {v.instance_id: v for v in await driver.list()}
    assert set(listed) == {"gcp-d0", "gcp-d1", "gcp-d2", "gcp-st"}
    # Stopped (GCE's TERMINATED) still exists and costs its disk: listed, so the reconciler deletes it.
    assert listed["gcp-st"].state == "stopping" and listed["gcp-st"].zone == "europe-west1-b"

    await driver.delete("gcp-d0")
    await driver.delete("gcp-d0")
    await driver.delete("gcp-never-made")
    await driver.delete("gcp-st")  # in another zone, found through the list
    assert await driver.get("gcp-d0") is None
    assert {v.instance_id for v in await driver.list()} == {"gcp-d1", "gcp-d2"}
    assert gce.instance(vm_name("gcp-d0")) is None and gce.instance("stopped-one") is None
    assert gce.instance(vm_name("gcp-x")) is not None  # the other daemon's is untouched
    assert mine[1].instance_id == "gcp-d1"


async def test_stock_out_operation_is_capacity_and_leaves_nothing(driver: GcpDriver, gce: ComputeStandin) -> None:
    gce.fail_operation_next("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED")
    with pytest.raises(CapacityError) as info:
        await driver.create(req("gcp-e1", spot=True))
    assert info.value.retryable and "ZONE_RESOURCE_POOL_EXHAUSTED" in str(info.value)
    assert str(info.value).startswith("gcp: launch:")
    assert isinstance(info.value.__cause__, OperationError)
    assert await driver.list() == []
    # A batch stocks out as a whole (min_count = count): every request hears it.
    gce.fail_operation_next("instances.bulkInsert", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS")
    got = await asyncio.gather(driver.create(req("gcp-e2")), driver.create(req("gcp-e3")), return_exceptions=True)
    assert all(isinstance(g, CapacityError) for g in got), got
    assert await driver.list() == []
    vm = await driver.create(req("gcp-e1", spot=True))  # the next try starts clean
    assert vm.instance_id == "gcp-e1"


async def test_quota_operation_error_is_quota_exceeded(driver: GcpDriver, gce: ComputeStandin) -> None:
    gce.fail_operation_next("instances.insert", "QUOTA_EXCEEDED", 403,
                            "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.")
    with pytest.raises(QuotaExceeded, match="QUOTA_EXCEEDED: Quota 'CPUS' exceeded") as info:
        await driver.create(req("gcp-q1"))
    assert not info.value.retryable


# A 401 is not here: the client first refreshes the credentials, which AnonymousCredentials refuse
# (test_classify covers the Unauthenticated that real credentials end with).
@pytest.mark.parametrize(("status", "reason", "message", "kind"), [
    (403, "quotaExceeded", "Quota exceeded for quota metric 'Instances'", QuotaExceeded),
    (403, "rateLimitExceeded", "Rate Limit Exceeded", TransientProviderError),
    (429, "rateLimitExceeded", "Too many requests", TransientProviderError),
    (403, "forbidden", "Required 'compute.instances.create' permission for 'projects/test-project'",
     ProviderAuthError),
    (400, "invalid", "Invalid value for field 'resource.machineType'", InvalidRequest),
    (404, "notFound", "The resource 'projects/ubuntu-os-cloud/global/images/nope' was not found", InvalidRequest),
    (503, "backendError", "Internal error. Please try again", TransientProviderError),
    (503, "backendError", "ZONE_RESOURCE_POOL_EXHAUSTED: no capacity", CapacityError),
])
async def test_http_errors_map_to_named_types(driver: GcpDriver, gce: ComputeStandin, status: int, reason: str,
                                              message: str, kind: type[ProviderError]) -> None:
    gce.fail_next("instances.insert", status, reason, message)
    with pytest.raises(kind) as info:
        await driver.create(req("gcp-h1"))
    assert type(info.value) is kind and str(info.value).startswith("gcp: launch:")
    assert message in str(info.value)
    assert await driver.list() == []


async def test_permission_denied_on_list_is_auth(driver: GcpDriver, gce: ComputeStandin) -> None:
    gce.fail_next("instances.aggregatedList", 403, "forbidden", "Required 'compute.instances.list' permission")
    with pytest.raises(ProviderAuthError, match=r"gcp: list: 403 forbidden"):
        await driver.list()


async def test_a_503_on_a_read_is_retried(driver: GcpDriver, gce: ComputeStandin) -> None:
    await driver.create(req("gcp-r1"))
    gce.fail_next("instances.aggregatedList", 503, "backendError")
    assert [v.instance_id for v in await driver.list()] == ["gcp-r1"]
    assert len(gce.calls_of("instances.aggregatedList")) == 2


@pytest.mark.parametrize(("exc", "kind"), [
    (OperationError("ZONE_RESOURCE_POOL_EXHAUSTED", "no", 503), CapacityError),
    (OperationError("RESOURCE_POOL_EXHAUSTED", "no", 503), CapacityError),
    (OperationError("UNSUPPORTED_OPERATION", "Spot VMs of this type are currently unavailable", 400),
     CapacityError),
    (OperationError("UNSUPPORTED_OPERATION", "Machine type with name 'x' does not support disks", 400),
     InvalidRequest),
    (OperationError("QUOTA_EXCEEDED", "Quota 'CPUS' exceeded", 403), QuotaExceeded),
    (OperationError("RESOURCE_NOT_FOUND", "image not found", 404), InvalidRequest),
    (OperationError("SOMETHING_NEW", "?", 500), TransientProviderError),
    (api.from_http_status(401, "Request had invalid authentication credentials"), ProviderAuthError),
    (api.from_http_status(403, "q", errors=[{"reason": "quotaExceeded"}]), QuotaExceeded),
    (api.from_http_status(403, "r", errors=[{"reason": "userRateLimitExceeded"}]), TransientProviderError),
    (api.from_http_status(502, "bad gateway"), TransientProviderError),
    (api.ServiceUnavailable("ZONE_RESOURCE_POOL_EXHAUSTED"), CapacityError),
    (api.RetryError("deadline", api.ServiceUnavailable("backend")), TransientProviderError),
    (auth.DefaultCredentialsError("Your default credentials were not found."), ProviderAuthError),
    (auth.RefreshError("invalid_grant: account not found"), ProviderAuthError),
    (auth.TransportError("connection refused"), TransientProviderError),
    (ConnectionRefusedError("refused"), TransientProviderError),
])
def test_classify(exc: Exception, kind: type[ProviderError]) -> None:
    err = classify(exc, "launch")
    assert type(err) is kind and err.provider == "gcp" and err.op == "launch"


async def test_no_application_default_credentials_name_gcp_and_what_to_set(
        gce: ComputeStandin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real google.auth.default() with nothing to find: no variable, no gcloud file, and a
    metadata server that refuses at once (a closed local port instead of 169.254.169.254)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GCE_METADATA_HOST", closed)
    monkeypatch.setenv("GCE_METADATA_IP", closed)
    d = GcpDriver(PROJECT, ZONE, "daemon1", api_endpoint=gce.url)
    try:
        with pytest.raises(ProviderAuthError) as info:
            await d.list()
    finally:
        await d.close()
    text = str(info.value)
    assert text.startswith("gcp: list: no credentials") and all(s in text for s in NO_CREDS), text
    assert not gce.calls  # refused before any call


async def test_missing_google_application_credentials_file(gce: ComputeStandin, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nope.json"))
    d = GcpDriver(PROJECT, ZONE, "daemon1", api_endpoint=gce.url)
    try:
        with pytest.raises(ProviderAuthError) as info:
            await d.create(req("gcp-n1"))
    finally:
        await d.close()
    text = str(info.value)
    assert text.startswith("gcp: launch: no credentials") and all(s in text for s in NO_CREDS), text
    assert "nope.json" in text  # google-auth's own reason is kept


@pytest.mark.parametrize("content", [None, "not json {", '{"type": "service_account", "private_key": "S3CRET-KEY"}'])
async def test_bad_credentials_file_names_the_key_and_the_path(gce: ComputeStandin, tmp_path: Path,
                                                               content: str | None) -> None:
    path = tmp_path / "sa.json"
    if content is not None:
        path.write_text(content)
    d = GcpDriver(PROJECT, ZONE, "daemon1", api_endpoint=gce.url, credentials_file=str(path))
    try:
        with pytest.raises(ProviderAuthError) as info:
            await d.list()
    finally:
        await d.close()
    text = str(info.value)
    assert text.startswith("gcp: list: cannot use providers.gcp.credentials_file") and str(path) in text
    assert "S3CRET" not in text


def test_empty_project_names_the_key() -> None:
    with pytest.raises(ProviderAuthError, match=r"^gcp: configure: .*providers\.gcp\.project_id"):
        GcpDriver("", ZONE, "daemon1")


async def test_host_keys_from_guest_attributes(driver: GcpDriver, gce: ComputeStandin) -> None:
    await driver.create(req("gcp-k1"))
    assert await driver.host_keys("gcp-k1") == []  # the guest has not published them yet
    ed = "AAAAC3NzaC1lZDI1NTE5AAAAIBd5pjkWPRG2g1DCrDL2qVdUwq0eGnWxSOZ6fzfJ2pYk"
    ecdsa = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBE"
    gce.publish_host_keys(vm_name("gcp-k1"), {"ssh-ed25519": ed, "ecdsa-sha2-nistp256": ecdsa})
    fresh = make_driver(gce)  # finds the VM's zone by itself
    try:
        assert sorted(await fresh.host_keys("gcp-k1")) == sorted([f"ssh-ed25519 {ed}", f"ecdsa-sha2-nistp256 {ecdsa}"])
        assert await fresh.host_keys("gcp-nope") == []
    finally:
        await fresh.close()
    [call] = gce.calls_of("instances.getGuestAttributes")[-1:]
    assert call.path.endswith(f"/zones/{ZONE}/instances/ct-gcp-k1/getGuestAttributes")


async def test_calls_do_not_block_the_event_loop(driver: GcpDriver, gce: ComputeStandin) -> None:
    """The stand-in holds the insert until the test releases it: the test can only do that if its
    loop runs while the driver's call is in flight (a blocked loop would leave the gate to time out)."""
    await driver.list()  # the library is imported and the clients are built
    gate = gce.hold("instances.insert")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def arrived() -> bool:
        return gate.arrived.is_set()

    ticking = asyncio.create_task(ticker())
    create = asyncio.create_task(driver.create(req("gcp-t1")))
    try:
        await wait_for(arrived, message="the insert reaching the stand-in")
        at_arrival = ticks

        async def ticked() -> bool:
            return ticks >= at_arrival + 20

        await wait_for(ticked, message="the loop ticking during the insert")
        assert not create.done()
        gate.release()
        vm = await create
    finally:
        ticking.cancel()
        create.cancel()
    assert gate.released_by_test and vm.instance_id == "gcp-t1"


async def test_close_fails_creates_not_sent_yet(gce: ComputeStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudtaskd.fleet.providers.gcp as gcp_module

    monkeypatch.setattr(gcp_module, "BATCH_WINDOW_S", 60.0)  # the batch stays open until close()
    d = make_driver(gce)
    await d.list()
    pending = asyncio.create_task(d.create(req("gcp-z1")))

    async def queued() -> bool:
        return bool(d._batches)

    await wait_for(queued, message="the create waiting in its batch")
    await d.close()
    with pytest.raises(ProviderError, match="closed"):
        await pending
    assert not gce.calls_of("instances.insert")


async def test_reconcile_deletes_orphans_after_a_crash(driver: GcpDriver, gce: ComputeStandin,
                                                       tmp_path: Path) -> None:
    """A VM labelled with our daemon id but with no live row (the daemon died between launch and its
    record) is deleted by the next reconcile; a known one is left alone."""
    gce.gets_to_running = 10**6  # still booting: terminate does not first try SSH to stop an agent
    await reconcile_after_crash(driver, "gcp", "e2-standard-2", ZONE, req("gcp-known"), req("gcp-orphan", spot=True),
                                tmp_path)
    assert gce.instance(vm_name("gcp-orphan")) is None
    assert [c.path.rsplit("/", 1)[-1] for c in gce.calls_of("instances.delete")] == ["ct-gcp-orphan"]


@pytest.mark.timeout(300)  # a VM bootstrap installs aiohttp into a fresh virtualenv
@needs_sshd
async def test_a_job_on_gcp_end_to_end(gce: ComputeStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon creates a spot VM through the Compute Engine stand-in, pins the host key the VM
    publishes in its guest attributes, bootstraps it over SSH (a local OpenSSH reached through
    ssh_address_override), runs the job, then deletes the idle VM."""
    import cloudtaskd.fleet.providers.gcp as gcp_module
    from cloudtaskd.config import GcpProviderConfig
    from tests.fakes.sshd import Sshd

    class DaemonGcpDriver(GcpDriver):
        """The daemon's own driver with anonymous credentials (the stand-in checks none) and fast polling."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, credentials=AnonymousCredentials(), polling_interval_s=0.01)

    monkeypatch.setattr(gcp_module, "GcpDriver", DaemonGcpDriver)
    sshd = Sshd(tmp_path / "sshd")
    sshd.start()
    key_type, blob = sshd.public_host_key().split()[:2]
    gce.default_host_keys = {key_type: blob}
    gcp = GcpProviderConfig(enabled=True, max_instances=1, project_id=PROJECT, zone=ZONE, api_endpoint=gce.url,
                            machine_type="e2-standard-2", cpus=2, spot=True)
    async with cloud_daemon(tmp_path, "gcp", gcp, sshd) as run:
        res = await run.job("d['n'] * 5", 20)
        assert sorted(r["result"] for r in res.values()) == [5 * i for i in range(20)]
        assert {r["instance"].split("-")[0] for r in res.values()} == {"gcp"}
        rows = await run.instance_rows("gcp")
        assert len(rows) == 1 and rows[0]["host_key"] == f"{key_type} {blob}"  # from the guest attributes
        inserts = gce.calls_of("instances.insert")
        assert len(inserts) == 1 and inserts[0].body["scheduling"]["provisioningModel"] == "SPOT"

        async def all_deleted() -> bool:
            with gce.lock:
                return not gce.instances
        await run.until(all_deleted, "the idle VM deleted")


AMD64_2404 = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"
ARM64_2404 = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-arm64"


async def test_each_architecture_boots_its_own_ubuntu_family(driver: GcpDriver, gce: ComputeStandin) -> None:
    """An Arm type (t2a) and an x86 one in the same zone at once: each insert names the Ubuntu 24.04
    family of its type's architecture (the stand-in refuses a mismatch, as GCE does)."""
    arm, x86 = await asyncio.gather(driver.create(req("gcp-arm1", machine_type="t2a-standard-2", arch=ARM64)),
                                    driver.create(req("gcp-x861", machine_type="e2-standard-4", arch=X86_64)))
    assert arm.instance_id == "gcp-arm1" and x86.instance_id == "gcp-x861"
    sent = {c.body["name"]: c.body["disks"][0]["initializeParams"]["sourceImage"]
            for c in gce.calls_of("instances.insert")}
    assert sent == {vm_name("gcp-arm1"): ARM64_2404, vm_name("gcp-x861"): AMD64_2404}
    with pytest.raises(InvalidRequest, match=r"boot disk architecture \(X86_64\) is not compatible"):
        await driver.create(req("gcp-arm2", machine_type="t2a-standard-2", arch=X86_64))


async def test_a_configured_image_is_used_for_every_architecture_on_gcp(gce: ComputeStandin) -> None:
    d = make_driver(gce, image="projects/p/global/images/mine-arm64")
    try:
        await d.create(req("gcp-own1", machine_type="t2a-standard-2", arch=ARM64))
    finally:
        await d.close()
    [disk] = created(gce, "gcp-own1")["disks"]
    assert disk["initializeParams"]["sourceImage"] == "projects/p/global/images/mine-arm64"
