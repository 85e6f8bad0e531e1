"""The Azure driver through the real async azure-mgmt clients against a local ARM stand-in."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ODataV4Format, ServiceRequestError
from azure.mgmt.core.policies import AsyncARMChallengeAuthenticationPolicy

from cloudtaskd.errors import (
    CapacityError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    QuotaExceeded,
    TransientProviderError,
)
from cloudtaskd.fleet.providers.azure import AzureDriver, classify
from cloudtaskd.fleet.providers.base import ARM64, X86_64
from cloudtaskd.fleet.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CreateRequest
from tests.cloud_e2e import cloud_daemon, needs_sshd, reconcile_after_crash
from tests.fakes.azure_standin import ArmStandin
from tests.procs import free_port

SUB, RG, LOCATION = "00000000-0000-0000-0000-000000000001", "ct-test", "eastus"
RG_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}"
COMPUTE = f"{RG_PATH}/providers/Microsoft.Compute/virtualMachines"
NETWORK = f"{RG_PATH}/providers/Microsoft.Network"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd5pjkWPRG2g1DCrDL2qVdUwq0eGnWxSOZ6fzfJ2pYk test"


class FakeCredential:
    async def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                        enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        return AccessToken("fake-token", int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FakeCredential:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class PlainHttpAuth(AsyncARMChallengeAuthenticationPolicy):
    """Tests only: lets the bearer token go to the stand-in over http."""

    async def on_request(self, request: Any) -> None:
        request.context["enforce_https"] = False
        await super().on_request(request)


def make_driver(arm: ArmStandin, daemon_id: str = "daemon1", **kwargs: Any) -> AzureDriver:
    cred = FakeCredential()
    return AzureDriver(SUB, RG, LOCATION, daemon_id, base_url=arm.url, credential=cred, client_kwargs={
        "authentication_policy": PlainHttpAuth(cred, "https://management.azure.com/.default"),
        "polling_interval": 0.01, "retry_total": 0}, **kwargs)


@pytest.fixture
async def driver(arm: ArmStandin) -> AsyncIterator[AzureDriver]:
    d = make_driver(arm)
    yield d
    await d.close()


def req(instance_id: str, *, spot: bool = False, machine_type: str = "Standard_D2s_v5", arch: str = X86_64,
        image: str | None = None) -> CreateRequest:
    return CreateRequest(instance_id, "daemon1", machine_type, LOCATION, spot, "ubuntu", PUBKEY, image, arch)


DISKS = f"{RG_PATH}/providers/Microsoft.Compute/disks"


def names(instance_id: str) -> tuple[str, str, str, str]:
    """(VM, NIC, public IP, OS disk) paths."""
    vm, nic, ip = AzureDriver.names(instance_id)
    return (f"{COMPUTE}/{vm}", f"{NETWORK}/networkInterfaces/{nic}", f"{NETWORK}/publicIPAddresses/{ip}",
            f"{DISKS}/{AzureDriver.disk_name(instance_id)}")


def left_behind(arm: ArmStandin, instance_id: str) -> list[str]:
    return [p for p in names(instance_id) if arm.get(p) is not None]


async def test_create_spot_and_on_demand_with_tags_and_key(driver: AzureDriver, arm: ArmStandin) -> None:
    spot = await driver.create(req("az-a1", spot=True))
    regular = await driver.create(req("az-a2", machine_type="Standard_F4s_v2"))
    # The create's own answer has no instance view yet; get() reads the power state.
    assert spot.instance_id == "az-a1" and spot.spot and spot.state in ("pending", "running")
    assert spot.public_ip and spot.public_ip.startswith("203.0.113.")
    assert not regular.spot

    vm_path, nic_path, ip_path, disk_path = names("az-a1")
    vm = arm.get(vm_path)
    assert vm is not None
    props = vm["properties"]
    assert props["priority"] == "Spot" and props["evictionPolicy"] == "Delete"
    assert props["billingProfile"]["maxPrice"] == -1
    assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    assert props["storageProfile"]["imageReference"]["offer"] == "ubuntu-24_04-lts"
    linux = props["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"] == [{"path": "/home/ubuntu/.ssh/authorized_keys", "keyData": PUBKEY}]
    # Azure does not pass the VM's tags on to its OS disk: the driver tags the disk itself.
    for path in (vm_path, nic_path, ip_path, disk_path):
        resource = arm.get(path)
        assert resource is not None, path
        assert resource["tags"] == {TAG_DAEMON: "daemon1", TAG_INSTANCE: "az-a1"}, path
    ip = arm.get(ip_path)
    assert ip is not None and ip["sku"]["name"] == "Standard"
    assert ip["properties"]["publicIPAllocationMethod"] == "Static"

    other = arm.get(names("az-a2")[0])
    assert other is not None
    assert other["properties"]["priority"] == "Regular" and "evictionPolicy" not in other["properties"]
    assert other["properties"]["hardwareProfile"]["vmSize"] == "Standard_F4s_v2"
    # The shared network is made once and carries the daemon's tag.
    assert arm.get(RG_PATH) is not None
    vnets = arm.of_type("virtualNetworks")
    assert len(vnets) == 1 and vnets[0]["tags"] == {TAG_DAEMON: "daemon1"}


async def test_create_is_idempotent_by_instance_id(driver: AzureDriver, arm: ArmStandin) -> None:
    first = await driver.create(req("az-b1"))
    puts = sum(1 for m, p in arm.requests if m == "PUT")
    again = await driver.create(req("az-b1"))
    assert again.cloud_id == first.cloud_id and again.instance_id == "az-b1"
    assert sum(1 for m, p in arm.requests if m == "PUT") == puts  # nothing made twice
    assert len(arm.of_type("virtualMachines")) == 1


async def test_get_and_list_only_our_daemon(driver: AzureDriver, arm: ArmStandin) -> None:
    await driver.create(req("az-c1", spot=True))
    await driver.create(req("az-c2"))
    arm.put(f"{COMPUTE}/foreign-vm", {"location": LOCATION, "tags": {TAG_DAEMON: "daemon2", TAG_INSTANCE: "x"},
                                      "properties": {}})
    arm.put(f"{COMPUTE}/untagged-vm", {"location": LOCATION, "properties": {}})
    arm.power[names("az-c2")[0].lower()] = "deallocated"

    got = await driver.get("az-c1")
    assert got is not None and got.state == "running" and got.spot and got.public_ip
    assert got.tags[TAG_INSTANCE] == "az-c1"
    assert await driver.get("az-nope") is None

    listed = {vm.instance_id: vm for vm in await driver.list()}
    assert set(listed) == {"az-c1", "az-c2"}
    assert listed["az-c1"].public_ip == got.public_ip
    assert listed["az-c2"].state == "stopping"  # deallocated: still a resource, for the reconciler to delete


async def test_delete_removes_vm_nic_ip_and_is_idempotent(driver: AzureDriver, arm: ArmStandin) -> None:
    await driver.create(req("az-d1"))
    assert len(left_behind(arm, "az-d1")) == 4
    await driver.delete("az-d1")
    assert left_behind(arm, "az-d1") == []
    assert await driver.get("az-d1") is None
    await driver.delete("az-d1")  # again: nothing to do, no error
    await driver.delete("az-never-made")


async def test_allocation_failure_is_capacity_and_leaves_nothing(driver: AzureDriver, arm: ArmStandin) -> None:
    arm.fail_next_vm = ("allocation", "ZonalAllocationFailed")
    with pytest.raises(CapacityError) as info:
        await driver.create(req("az-e1", spot=True))
    assert info.value.retryable and "ZonalAllocationFailed" in str(info.value)
    assert info.value.__cause__ is not None
    # The stand-in, like Azure, kept the failed VM: the driver must have deleted it, NIC and IP too.
    assert ("DELETE", names("az-e1")[0]) in arm.requests
    assert left_behind(arm, "az-e1") == []
    assert await driver.list() == []
    # The next try starts clean and succeeds.
    await driver.create(req("az-e1", spot=True))
    vm = await driver.get("az-e1")
    assert vm is not None and vm.state == "running"


async def test_quota_is_quota_exceeded(driver: AzureDriver, arm: ArmStandin) -> None:
    arm.fail_next_vm = ("quota", "OperationNotAllowed")
    with pytest.raises(QuotaExceeded) as info:
        await driver.create(req("az-f1"))
    assert "quota" in str(info.value) and not info.value.retryable
    assert left_behind(arm, "az-f1") == []


async def test_missing_credentials_name_azure_and_the_keys() -> None:
    with pytest.raises(ProviderAuthError) as info:
        AzureDriver(SUB, RG, LOCATION, "daemon1", tenant_id="tenant")
    text = str(info.value)
    assert text.startswith("azure:") and "client_id" in text and "client_secret" in text
    assert "tenant_id," not in text.split("(")[0]  # the one given is not reported missing


def http_error(status: int, code: str, message: str = "refused") -> HttpResponseError:
    exc = HttpResponseError(message=message)
    exc.status_code = status
    exc.error = ODataV4Format({"code": code, "message": message})
    return exc


@pytest.mark.parametrize(("exc", "kind"), [
    (http_error(200, "AllocationFailed"), CapacityError),  # a failed LRO: the poll itself was a 200
    (http_error(409, "SkuNotAvailable"), CapacityError),
    (http_error(409, "OperationNotAllowed", "exceeding approved Total Regional Cores quota"), QuotaExceeded),
    (http_error(409, "OperationNotAllowed", "VM is being deleted"), ProviderError),
    (http_error(403, "AuthorizationFailed"), ProviderAuthError),
    (http_error(401, "InvalidAuthenticationToken"), ProviderAuthError),
    (ClientAuthenticationError("no credential in the chain"), ProviderAuthError),
    (http_error(400, "InvalidParameter"), InvalidRequest),
    (http_error(429, "TooManyRequests"), TransientProviderError),
    (http_error(503, ""), TransientProviderError),
    (ServiceRequestError("connection refused"), TransientProviderError),
])
def test_classify_by_error_code(exc: Exception, kind: type[ProviderError]) -> None:
    err = classify(exc, "launch")
    assert type(err) is kind and err.provider == "azure" and err.op == "launch"


async def test_no_credentials_name_azure_and_what_to_set(arm: ArmStandin, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """The real DefaultAzureCredential with nothing to find (no AZURE_* variables, no az login, no
    managed identity): the error names the provider and the keys to set."""
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
                "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # https, so that the SDK asks the credential for a token before it would refuse plain http.
    d = AzureDriver(SUB, RG, LOCATION, "daemon1", base_url=f"https://127.0.0.1:{free_port()}",
                    client_kwargs={"retry_total": 0})
    try:
        with pytest.raises(ProviderAuthError) as info:
            await d.list()
    finally:
        await d.close()
    text = str(info.value)
    assert text.startswith("azure: list: cannot authenticate")
    assert "providers.azure.tenant_id" in text and "client_secret" in text and "DefaultAzureCredential" in text


async def test_daemon_builds_the_service_principal_from_config(tmp_path: Path) -> None:
    """The daemon hands the config's service principal and endpoint to the driver; the secret is a
    Secret (never printed by the config) and reaches only the credential."""
    from dataclasses import replace

    from cloudtaskd.config import AzureProviderConfig, ProvidersConfig, Secret
    from cloudtaskd.daemon import Daemon
    from tests.conftest import make_config

    azure = AzureProviderConfig(enabled=True, subscription_id=SUB, tenant_id="tenant-1", client_id="client-1",
                                client_secret=Secret("s3cr3t-value"), base_url="https://127.0.0.1:1",
                                resource_group=RG, location="westeurope")
    config = replace(make_config(tmp_path), providers=ProvidersConfig(azure=azure))
    assert "s3cr3t-value" not in repr(config)
    daemon = Daemon(config)
    daemon.daemon_id = "d-test"
    [provider] = [p for p, _ in daemon._providers() if p.name == "azure"]  # as the daemon starts it
    driver = provider.driver
    assert isinstance(driver, AzureDriver)
    try:
        await driver._clients()
        from azure.identity.aio import ClientSecretCredential

        assert isinstance(driver._credential, ClientSecretCredential)
        assert driver.base_url == "https://127.0.0.1:1" and driver.location == "westeurope"
        assert driver.daemon_id == "d-test" and driver.resource_group == RG
    finally:
        await driver.close()


async def test_reconcile_deletes_orphans_after_a_crash(driver: AzureDriver, arm: ArmStandin, tmp_path: Path) -> None:
    """A VM tagged with our daemon id but with no row (the daemon died between create and record)
    is deleted with its NIC and IP by the next reconcile; a known one is left alone."""
    await reconcile_after_crash(driver, "azure", "Standard_D2s_v5", LOCATION, req("az-known"),
                                req("az-orphan", spot=True), tmp_path)
    assert left_behind(arm, "az-orphan") == []
    assert len(left_behind(arm, "az-known")) == 4


async def crash_between_nic_and_vm(arm: ArmStandin, instance_id: str) -> None:
    """A daemon's create dies after the IP and NIC, before its VM PUT reached ARM."""
    crashed = make_driver(arm)
    arm.stall_vm_creates()
    create = asyncio.create_task(crashed.create(req(instance_id)))
    await asyncio.wait_for(arm.vm_create_arrived.wait(), 10)
    create.cancel()  # the process dies: nothing of the driver's clean-up runs
    arm.release_vm_create(accept=False)
    with pytest.raises(asyncio.CancelledError):
        await create
    await crashed.close()
    vm, nic, ip, disk = names(instance_id)
    assert arm.get(vm) is None and arm.get(disk) is None
    for path in (nic, ip):
        resource = arm.get(path)
        assert resource is not None and resource["tags"] == {TAG_DAEMON: "daemon1", TAG_INSTANCE: instance_id}


async def test_nic_and_ip_left_by_a_crash_are_deleted_by_the_reconciler(arm: ArmStandin, tmp_path: Path) -> None:
    """Only VMs are listed to the reconciler: the NIC and IP of a create that never reached its VM
    are found by their tags and deleted by the next sync of the restarted daemon; a known VM's stay."""
    from cloudtaskd.config import Config
    from cloudtaskd.core.dispatch import Dispatcher
    from cloudtaskd.core.store import Store
    from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
    from cloudtaskd.fleet.pins import InstancePins
    from cloudtaskd.fleet.providers.cloud import CloudProvider, CloudSettings
    from tests.conftest import test_runtime

    await crash_between_nic_and_vm(arm, "az-crash")
    driver = make_driver(arm, orphan_grace_s=0)  # the restarted daemon's
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        vm = await driver.create(req("az-live"))
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, cloud_id, created_at,"
            " state_changed_at) VALUES ('az-live', 'azure', NULL, 'running', 2, 'x', ?, 0, ?)", (vm.cloud_id, tx.now)))
        provider = CloudProvider(driver, CloudSettings("Standard_D2s_v5", LOCATION, False, 2, "ubuntu", key), "daemon1",
                                 tmp_path, InstancePins(store), test_runtime())
        config = Config(state_dir=str(tmp_path))
        await Reconciler(store=store, dispatcher=(disp := Dispatcher(store, config)), providers=[(provider, 5)],
                         config=config, agent_url="ws://x", metrics=disp.metrics, sessions=disp.sessions).sync(now=1e9)
    finally:
        await store.close()
        await driver.close()
    assert left_behind(arm, "az-crash") == []
    assert len(left_behind(arm, "az-live")) == 4


async def test_orphans_wait_out_a_grace_and_a_create_in_flight_is_no_orphan(arm: ArmStandin) -> None:
    await crash_between_nic_and_vm(arm, "az-g1")
    now = [1000.0]
    driver = make_driver(arm, orphan_grace_s=60, clock=lambda: now[0])
    try:
        assert await driver.list() == []
        assert len(left_behind(arm, "az-g1")) == 2  # first seen now: kept for the grace
        now[0] += 30
        await driver.list()
        assert len(left_behind(arm, "az-g1")) == 2
        now[0] += 31
        await driver.list()
        assert left_behind(arm, "az-g1") == []

        # This driver's own create, between its NIC and its VM: not taken, whatever the grace.
        driver.orphan_grace_s = 0
        arm.stall_vm_creates()
        create = asyncio.create_task(driver.create(req("az-g2")))
        await asyncio.wait_for(arm.vm_create_arrived.wait(), 10)
        await driver.list()
        assert len(left_behind(arm, "az-g2")) == 2
        arm.release_vm_create(accept=True)
        vm = await create
        assert vm.instance_id == "az-g2" and len(left_behind(arm, "az-g2")) == 4
        assert [v.instance_id for v in await driver.list()] == ["az-g2"]
    finally:
        await driver.close()


async def test_only_our_tagged_leftovers_are_swept(driver: AzureDriver, arm: ArmStandin) -> None:
    """A disk of ours left alone (its VM deleted with the disk detached) goes; another daemon's
    NIC, an untagged IP and a disk without an instance tag stay."""
    driver.orphan_grace_s = 0
    await driver.list()  # the resource group
    arm.put(f"{DISKS}/ct-az-h1-osdisk", {"location": LOCATION, "tags": {TAG_DAEMON: "daemon1", TAG_INSTANCE: "az-h1"},
                                         "properties": {"diskState": "Unattached"}})
    arm.put(f"{NETWORK}/networkInterfaces/other-nic", {"location": LOCATION,
                                                       "tags": {TAG_DAEMON: "daemon2", TAG_INSTANCE: "x"}})
    arm.put(f"{NETWORK}/publicIPAddresses/mine-by-hand", {"location": LOCATION})
    arm.put(f"{DISKS}/shared-data", {"location": LOCATION, "tags": {TAG_DAEMON: "daemon1"}})
    assert await driver.list() == []
    assert arm.get(f"{DISKS}/ct-az-h1-osdisk") is None
    for kept in (f"{NETWORK}/networkInterfaces/other-nic", f"{NETWORK}/publicIPAddresses/mine-by-hand",
                 f"{DISKS}/shared-data"):
        assert arm.get(kept) is not None, kept


class DaemonAzureDriver(AzureDriver):
    """The daemon's own driver, with the test credential and plain-http policy of make_driver:
    monkeypatched over cloudtaskd.fleet.providers.azure.AzureDriver by the daemon-level tests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cred = FakeCredential()
        super().__init__(*args, **kwargs, credential=cred, client_kwargs={
            "authentication_policy": PlainHttpAuth(cred, "https://management.azure.com/.default"),
            "polling_interval": 0.01, "retry_total": 0})


@pytest.mark.timeout(300)  # a VM bootstrap installs aiohttp into a fresh virtualenv
@needs_sshd
async def test_a_job_on_azure_end_to_end(arm: ArmStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon creates a VM through the ARM stand-in, bootstraps it over SSH (a local OpenSSH,
    reached through ssh_address_override; the host key trusted on first use and pinned on the
    instance), runs the job, then deletes the idle VM with its NIC and IP."""
    import cloudtaskd.fleet.providers.azure as azure_module
    from cloudtaskd.config import AzureProviderConfig

    monkeypatch.setattr(azure_module, "AzureDriver", DaemonAzureDriver)
    azure = AzureProviderConfig(enabled=True, max_instances=1, subscription_id=SUB, resource_group=RG,
                                location=LOCATION, base_url=arm.url, cpus=2, spot=True,
                                image="Canonical:ubuntu-24_04-lts:server:latest")
    async with cloud_daemon(tmp_path, "azure", azure) as run:
        res = await run.job("d['n'] + 7", 20)
        assert sorted(r["result"] for r in res.values()) == [i + 7 for i in range(20)]
        assert {r["instance"].split("-")[0] for r in res.values()} == {"azure"}
        rows = await run.instance_rows("azure")
        assert len(rows) == 1 and rows[0]["host_key"].split()[:2] == run.sshd.public_host_key().split()[:2]
        vm = arm.get(names(rows[0]["id"])[0])
        assert vm is not None and vm["properties"]["priority"] == "Spot"
        assert vm["properties"]["storageProfile"]["imageReference"]["offer"] == "ubuntu-24_04-lts"  # config's image
        assert vm["tags"] == {TAG_DAEMON: run.daemon.daemon_id, TAG_INSTANCE: rows[0]["id"]}

        async def all_deleted() -> bool:
            return left_behind(arm, rows[0]["id"]) == []
        await run.until(all_deleted, "the idle VM deleted with its NIC and IP")


async def test_each_architecture_boots_its_own_ubuntu_image_on_azure(driver: AzureDriver, arm: ArmStandin) -> None:
    """An Ampere size and an x86 one: each VM's PUT names Canonical's Ubuntu 24.04 image of its
    size's architecture; a configured image is sent as it is, whatever the architecture."""
    await driver.create(req("az-arm1", machine_type="Standard_D2ps_v5", arch=ARM64))
    await driver.create(req("az-x861", machine_type="Standard_D2s_v5", arch=X86_64))
    await driver.create(req("az-own1", machine_type="Standard_D2ps_v5", arch=ARM64,
                            image="Canonical:ubuntu-22_04-lts:server-arm64:latest"))

    def image(instance_id: str) -> dict[str, str]:
        vm = arm.get(names(instance_id)[0])
        assert vm is not None
        return dict(vm["properties"]["storageProfile"]["imageReference"])

    ubuntu = {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "version": "latest"}
    assert image("az-arm1") == {**ubuntu, "sku": "server-arm64"}
    assert image("az-x861") == {**ubuntu, "sku": "server"}
    assert image("az-own1") == {"publisher": "Canonical", "offer": "ubuntu-22_04-lts", "sku": "server-arm64",
                                "version": "latest"}
