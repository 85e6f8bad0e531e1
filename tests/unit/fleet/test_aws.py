"""The AWS driver through aioboto3 against moto running as a real HTTP server."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.errors import CapacityError, InvalidRequest, ProviderAuthError, ProviderError, QuotaExceeded
from cloudtaskd.fleet.providers.aws import AwsDriver
from cloudtaskd.fleet.providers.base import ARM64, X86_64, LaunchSpec, Offer
from cloudtaskd.fleet.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CloudProvider, CloudSettings, CreateRequest
from tests.cloud_e2e import CloudRun, cloud_daemon, needs_sshd, reconcile_after_crash
from tests.conftest import test_runtime
from tests.fakes.metadata_standin import metadata_standin
from tests.fakes.moto_ec2 import MotoEc2, PricingStandin
from tests.fakes.sshd import Sshd

REGION = "us-east-1"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd5pjkWPRG2g1DCrDL2qVdUwq0eGnWxSOZ6fzfJ2pYk test"


@pytest.fixture
async def driver(moto: MotoEc2, creds: None) -> AsyncIterator[AwsDriver]:
    moto.reset()
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1)
    ec2 = await d._client()
    images = await ec2.describe_images()
    d.image = images["Images"][0]["ImageId"]
    yield d
    await d.close()


def req(instance_id: str, *, spot: bool = False, machine_type: str = "t3.micro", arch: str = X86_64) -> CreateRequest:
    return CreateRequest(instance_id, "daemon1", machine_type, REGION, spot, "ubuntu", PUBKEY, arch=arch)


async def describe(d: AwsDriver, cloud_id: str) -> dict[str, Any]:
    ec2 = await d._client()
    out = await ec2.describe_instances(InstanceIds=[cloud_id])
    return dict(out["Reservations"][0]["Instances"][0])


async def test_create_spot_and_on_demand_with_tags(driver: AwsDriver) -> None:
    spot = await driver.create(req("aws-a1", spot=True))
    ondemand = await driver.create(req("aws-a2", machine_type="c5.large"))
    a, b = await describe(driver, spot.cloud_id), await describe(driver, ondemand.cloud_id)
    assert a.get("InstanceLifecycle") == "spot" and b.get("InstanceLifecycle") != "spot"
    assert b["InstanceType"] == "c5.large"
    tags = {t["Key"]: t["Value"] for t in a["Tags"]}
    assert tags[TAG_DAEMON] == "daemon1" and tags[TAG_INSTANCE] == "aws-a1"
    assert a["KeyName"].startswith("cloudtask-daemon1-")
    assert spot.state in ("pending", "running") and spot.instance_id == "aws-a1"


async def test_concurrent_creates_are_one_run_instances_call(driver: AwsDriver, moto: MotoEc2) -> None:
    vms = await asyncio.gather(*(driver.create(req(f"aws-b{i}")) for i in range(4)))
    assert moto.calls["RunInstances"] == 1
    assert sorted(v.instance_id for v in vms) == [f"aws-b{i}" for i in range(4)]
    assert len({v.cloud_id for v in vms}) == 4
    assert {v.instance_id for v in await driver.list()} == {f"aws-b{i}" for i in range(4)}


async def test_create_is_idempotent_by_instance_id(driver: AwsDriver, moto: MotoEc2) -> None:
    first = await driver.create(req("aws-c1"))
    again = await driver.create(req("aws-c1"))
    assert again.cloud_id == first.cloud_id and moto.calls["RunInstances"] == 1


async def test_list_is_only_ours_and_delete_is_idempotent(driver: AwsDriver) -> None:
    ec2 = await driver._client()
    await ec2.run_instances(ImageId=driver.image, InstanceType="t3.micro", MinCount=1, MaxCount=1)  # not ours
    other = AwsDriver(REGION, "daemon2", endpoint_url=driver.endpoint_url, max_attempts=1, image=driver.image)
    try:
        await other.create(CreateRequest("aws-x", "daemon2", "t3.micro", REGION, False, "u", PUBKEY))
    finally:
        await other.close()
    mine = await driver.create(req("aws-d1"))
    assert [v.cloud_id for v in await driver.list()] == [mine.cloud_id]
    await driver.delete("aws-d1")
    await driver.delete("aws-d1")
    assert await driver.get("aws-d1") is None and await driver.list() == []
    assert (await describe(driver, mine.cloud_id))["State"]["Name"] == "terminated"


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("InsufficientInstanceCapacity", 500, CapacityError),
    ("InstanceLimitExceeded", 400, QuotaExceeded),
    ("AuthFailure", 401, ProviderAuthError),
])
async def test_errors_map_to_named_types(driver: AwsDriver, moto: MotoEc2, code: str, status: int,
                                         kind: type[Exception]) -> None:
    await driver.create(req("aws-warm"))  # key pair and security group exist already
    moto.fail_next["RunInstances"] = (code, status, "injected by the test")
    with pytest.raises(kind, match=code) as info:
        await driver.create(req("aws-e1"))
    assert "aws: launch:" in str(info.value)
    assert await driver.get("aws-e1") is None


async def test_missing_credentials_name_the_provider(moto: MotoEc2, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1, image="ami-x")
    try:
        with pytest.raises(ProviderAuthError, match=r"aws: .*no credentials: set providers\.aws\.access_key"):
            await d.list()
    finally:
        await d.close()


async def test_reconcile_terminates_orphans_after_a_crash(driver: AwsDriver, tmp_path: Path) -> None:
    """A VM tagged with our daemon id but with no live row (the daemon died between launch and its
    record) is terminated by the next reconcile; a known one is left alone."""
    orphan = await reconcile_after_crash(driver, "aws", "t3.micro", REGION, req("aws-known"), req("aws-orphan"),
                                         tmp_path)
    assert (await describe(driver, orphan.cloud_id))["State"]["Name"] == "terminated"

@pytest.mark.timeout(300)  # a VM bootstrap installs aiohttp into a fresh virtualenv
@needs_sshd
async def test_a_job_on_aws_end_to_end(moto: MotoEc2, creds: None, tmp_path: Path) -> None:
    """The daemon launches a VM in (emulated) EC2, bootstraps it over SSH (reached through the
    documented ssh_address_override hook at a local OpenSSH), runs the job, then terminates it."""
    from cloudtaskd.config import AwsProviderConfig

    moto.reset()
    sshd = Sshd(tmp_path / "sshd")
    sshd.start()
    moto.console = console_with_keys(sshd.public_host_key())  # as cloud-init prints them
    async with metadata_standin("aws") as imds:
        aws = AwsProviderConfig(enabled=True, max_instances=1, machine_type="t3.micro", cpus=2, spot=True,
                                image=await moto_image(moto), endpoint_url=moto.url, metadata_url=imds.url)
        async with cloud_daemon(tmp_path, "aws", aws, sshd) as run:
            await aws_job_checks(run, moto, sshd)
            # The agent bootstrapped on the spot VM watches its interruption notice (IMDSv2).
            assert imds.tokens_issued >= 1 and imds.requests["aws_action"] >= 1 and not imds.refused


async def aws_job_checks(run: CloudRun, moto: MotoEc2, sshd: Sshd) -> None:
    """The job runs on the VM, its host key was pinned from the console, the idle VM goes."""
    res = await run.job("d['n'] * 3", 25)
    assert sorted(r["result"] for r in res.values()) == [3 * i for i in range(25)]
    assert {r["instance"].split("-")[0] for r in res.values()} == {"aws"}
    # The host key was taken from the console output and pinned on the instance's row.
    published = sshd.public_host_key().split()
    assert [r["host_key"] for r in await run.instance_rows("aws")] == [f"{published[0]} {published[1]}"]
    assert moto.calls["GetConsoleOutput"] >= 1
    driver = AwsDriver(REGION, run.daemon.daemon_id, endpoint_url=moto.url, max_attempts=1)
    try:
        async def all_terminated() -> bool:
            return await driver.list() == []
        await run.until(all_terminated, "the idle VM terminated")
    finally:
        await driver.close()


async def moto_image(moto: MotoEc2) -> str:
    """An AMI id moto knows (the driver's Canonical lookup finds none there)."""
    probe = AwsDriver(REGION, "x", endpoint_url=moto.url, max_attempts=1)
    try:
        return str((await (await probe._client()).describe_images())["Images"][0]["ImageId"])
    finally:
        await probe.close()

def console_with_keys(*keys: str) -> str:
    lines = "\n".join(f"ec2: {k} root@ip-10-0-0-1" for k in keys)
    return ("[   12.3] cloud-init[800]: Cloud-init v. 23.1 running 'modules:final'\n"
            f"-----BEGIN SSH HOST KEY KEYS-----\n{lines}\n-----END SSH HOST KEY KEYS-----\n"
            "[   14.0] cloud-init[800]: finished\n")


def test_host_keys_are_read_from_the_console_output() -> None:
    import base64

    from cloudtaskd.fleet.providers.aws import console_host_keys

    ed, ecdsa = PUBKEY.rsplit(" ", 1)[0], "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY="
    text = console_with_keys(ed, ecdsa)
    assert console_host_keys(text) == [ed, ecdsa]
    assert console_host_keys(base64.b64encode(text.encode()).decode()) == [ed, ecdsa]  # as EC2 returns it
    assert console_host_keys("booting...\nno keys yet") == []
    assert console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA") == []  # not finished


@pytest.mark.skipif(__import__("tests.fakes.sshd", fromlist=["x"]).available() is not None, reason="needs a real sshd")
async def test_a_published_host_key_that_does_not_match_is_refused(driver: AwsDriver, moto: MotoEc2,
                                                                    tmp_path: Path) -> None:
    """The cloud publishes the VM's host key; the machine that answers SSH has another one (an
    interception): the bootstrap refuses before logging in, and the VM is terminated."""
    from cloudtaskd.core.store import Store
    from cloudtaskd.fleet.bootstrap import HostKeyMismatch
    from cloudtaskd.fleet.pins import InstancePins
    from cloudtaskd.fleet.providers.base import LaunchSpec
    from cloudtaskd.fleet.providers.cloud import CloudProvider, CloudSettings
    from tests.fakes.sshd import Sshd

    sshd = Sshd(tmp_path / "sshd")
    sshd.start()
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    moto.console = console_with_keys(Path(f"{other}.pub").read_text().strip())
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, created_at, state_changed_at)"
            " VALUES ('aws-mitm', 'aws', NULL, 'starting', 2, 'x', 0, ?)", (tx.now,)))
        settings = CloudSettings("t3.micro", REGION, False, 2, "root", sshd.client_key,
                                 ssh_address_override=f"127.0.0.1:{sshd.port}")
        provider = CloudProvider(driver, settings, "daemon1", tmp_path, InstancePins(store), test_runtime())
        spec = LaunchSpec("aws-mitm", 1, tmp_path, "ws://127.0.0.1:1/v1/agent", "token", 2,
                          worker_bundle=tmp_path / "bundle.tar.gz")
        with pytest.raises(HostKeyMismatch, match="does not match the pinned key"):
            await provider.launch(spec)
        assert await driver.list() == []  # terminated, not left running
        row = await store.fetchone("SELECT host_key FROM instances WHERE id = 'aws-mitm'")
        assert row is not None and row["host_key"].startswith("ssh-ed25519 ")
        assert row["host_key"].split()[1] == Path(f"{other}.pub").read_text().split()[1]
        assert "pinned host key" in (provider.output_tail("aws-mitm") or "")
        assert "Accepted publickey" not in (sshd.dir / "sshd.log").read_text()  # never logged in
    finally:
        await store.close()
        sshd.stop()


async def test_a_stock_out_is_reported_at_once_and_a_transient_error_retried(moto: MotoEc2, creds: None) -> None:
    """With the daemon's retry budget: a capacity error (a 500, which botocore would retry) reaches
    the orchestrator after one call; a transient one is retried with the same ClientToken."""
    moto.reset()
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url)  # default attempts, as the daemon builds it
    try:
        d.image = (await (await d._client()).describe_images())["Images"][0]["ImageId"]
        await d.create(req("aws-r0"))  # key pair and security group exist
        moto.fail_next["RunInstances"] = ("InsufficientInstanceCapacity", 500, "no capacity in us-east-1a")
        before = moto.calls["RunInstances"]
        with pytest.raises(CapacityError):
            await d.create(req("aws-r1"))
        assert moto.calls["RunInstances"] - before == 1
        moto.fail_next["RunInstances"] = ("InternalError", 500, "try again")
        before = moto.calls["RunInstances"]
        vm = await d.create(req("aws-r2"))
        assert vm.instance_id == "aws-r2" and moto.calls["RunInstances"] - before == 2
        tokens = [p["ClientToken"] for a, p in moto.params[-3:] if a == "RunInstances"]
        assert len(tokens) == 2 and tokens[0] == tokens[1]  # the retry cannot launch twice
    finally:
        await d.close()


# ---- issue 14: real clouds on the first try ----

NOT_FOUND = ("InvalidInstanceID.NotFound", 400, "The instance ID 'i-0123456789abcdef0' does not exist")


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


async def test_a_single_launch_is_tagged_by_run_instances_itself(driver: AwsDriver, moto: MotoEc2) -> None:
    """A batch of one carries its instance id from the first moment (TagSpecifications), on the
    instance and on its volumes: no CreateTags that EC2's eventual consistency could refuse."""
    moto.fail_if = lambda action, _: NOT_FOUND if action == "CreateTags" else None
    vm = await driver.create(req("aws-s1"))
    assert vm.instance_id == "aws-s1" and moto.calls["CreateTags"] == 0
    inst = await describe(driver, vm.cloud_id)
    assert tags_of(inst)[TAG_INSTANCE] == "aws-s1" and tags_of(inst)[TAG_DAEMON] == "daemon1"
    ec2 = await driver._client()
    volumes = (await ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                                    "Values": [vm.cloud_id]}]))["Volumes"]
    assert volumes and all(tags_of(v).get(TAG_DAEMON) == "daemon1" for v in volumes)


async def test_tagging_a_batch_is_retried_while_ec2_does_not_know_the_instance_yet(
        driver: AwsDriver, moto: MotoEc2, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateTags straight after RunInstances answers InvalidInstanceID.NotFound for a while: the
    batch is not failed for it, each instance is tagged once EC2 knows it."""
    from cloudtaskd.fleet.providers import aws

    monkeypatch.setattr(aws, "TAG_RETRY_S", 0.01)
    refusals = {"left": 3}

    def not_yet(action: str, _: dict[str, list[str]]) -> tuple[str, int, str] | None:
        if action == "CreateTags" and refusals["left"] > 0:
            refusals["left"] -= 1
            return NOT_FOUND
        return None

    moto.fail_if = not_yet
    vms = await asyncio.gather(driver.create(req("aws-t1")), driver.create(req("aws-t2")))
    assert moto.calls["RunInstances"] == 1 and moto.calls["CreateTags"] == 2 + 3
    assert {v.instance_id for v in await driver.list()} == {"aws-t1", "aws-t2"}
    assert {tags_of(await describe(driver, v.cloud_id))[TAG_INSTANCE] for v in vms} == {"aws-t1", "aws-t2"}


async def test_an_instance_that_cannot_be_tagged_fails_alone_and_is_terminated(
        driver: AwsDriver, moto: MotoEc2, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudtaskd.errors import InvalidRequest
    from cloudtaskd.fleet.providers import aws

    monkeypatch.setattr(aws, "TAG_RETRY_S", 0.01)
    moto.fail_if = lambda action, p: NOT_FOUND if action == "CreateTags" and p.get("Tag.1.Value") == ["aws-u1"] \
        else None
    bad, good = await asyncio.gather(driver.create(req("aws-u1")), driver.create(req("aws-u2")),
                                     return_exceptions=True)
    assert isinstance(bad, InvalidRequest) and "InvalidInstanceID.NotFound" in str(bad)
    assert not isinstance(good, BaseException) and good.instance_id == "aws-u2"
    assert moto.calls["CreateTags"] == 1 + aws.TAG_ATTEMPTS  # bounded
    assert [v.instance_id for v in await driver.list()] == ["aws-u2"]  # nothing untagged left running


async def test_console_output_falls_back_when_latest_is_refused(driver: AwsDriver, moto: MotoEc2) -> None:
    """Non-Nitro types (t2, m4, c4, r4...) refuse GetConsoleOutput with Latest=true: the buffered
    output is read instead, and the launch goes on with the keys it publishes."""
    vm = await driver.create(req("aws-n1", machine_type="t2.micro"))
    moto.console = console_with_keys(PUBKEY)
    moto.fail_if = lambda action, p: (
        ("UnsupportedOperation", 400, "This instance type does not support retrieving the latest console logs.")
        if action == "GetConsoleOutput" and p.get("Latest") == ["true"] else None)
    assert await driver.host_keys("aws-n1") == [PUBKEY.rsplit(" ", 1)[0]]
    calls = [p for a, p in moto.params if a == "GetConsoleOutput"]
    assert [c.get("Latest") for c in calls] == [["true"], None] and calls[1]["InstanceId"] == [vm.cloud_id]


async def reconciler_for(driver: AwsDriver, tmp_path: Path, store: Any) -> Any:
    """A reconciler whose only provider is `driver` (SSH to a VM fails at once: no agent runs on moto)."""
    from cloudtaskd.config import Config
    from cloudtaskd.core.dispatch import Dispatcher
    from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
    from cloudtaskd.fleet.pins import InstancePins
    from cloudtaskd.fleet.providers.cloud import CloudProvider, CloudSettings

    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    provider = CloudProvider(driver, CloudSettings("t3.micro", REGION, False, 2, "ubuntu", key,
                                                   ssh_address_override="127.0.0.1:1"), "daemon1",
                             tmp_path, InstancePins(store), test_runtime())

    async def no_ssh(*_: Any, **__: Any) -> Any:
        raise OSError("no sshd on moto")

    provider._connect = no_ssh  # type: ignore[method-assign]  # the agent stop is not under test
    config = Config(state_dir=str(tmp_path))
    disp = Dispatcher(store, config)
    return Reconciler(store=store, dispatcher=disp, providers=[(provider, 5)], config=config, agent_url="ws://x",
                      metrics=disp.metrics, sessions=disp.sessions)


async def test_a_vm_with_only_the_daemon_tag_is_listed_and_terminated(driver: AwsDriver, tmp_path: Path) -> None:
    """A VM carrying the daemon's tag but no instance id (tagging never happened: the race, or a
    crash in between) is listed under its cloud id and terminated by the reconciler, unless a
    launch of this process is in flight (it may be that launch's, about to be tagged)."""
    from cloudtaskd.core.store import Store

    ec2 = await driver._client()
    made = await ec2.run_instances(ImageId=driver.image, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                                   TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                       {"Key": TAG_DAEMON, "Value": "daemon1"}]}])
    cloud_id = made["Instances"][0]["InstanceId"]
    assert [(v.instance_id, v.cloud_id) for v in await driver.list()] == [("", cloud_id)]
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        reconciler = await reconciler_for(driver, tmp_path, store)
        listed = await reconciler.providers["aws"].list_instances()
        assert [(c.instance_id, c.anonymous) for c in listed] == [(cloud_id, True)]
        reconciler._launching.add("aws-inflight")
        await reconciler.sync(now=1e9)
        assert (await describe(driver, cloud_id))["State"]["Name"] == "running"  # maybe that launch's
        reconciler._launching.clear()
        await reconciler.sync(now=1e9)
        assert (await describe(driver, cloud_id))["State"]["Name"] == "terminated"
        assert await driver.list() == []
    finally:
        await store.close()


async def test_a_launch_cut_by_a_crash_does_not_stay_pending(driver: AwsDriver, tmp_path: Path) -> None:
    """The daemon died between recording a launch (a PENDING row) and the provider's answer: the
    next sync ends the row with a reason, and terminates the VM the cloud made for it, if any."""
    from cloudtaskd.core.store import Store

    made = await driver.create(req("aws-crash1"))  # the provider got as far as making the VM
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        for inst in ("aws-crash1", "aws-crash2"):  # aws-crash2: the crash came before RunInstances
            await store.write(lambda tx, inst=inst: tx.db.execute(
                "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, created_at,"
                " state_changed_at) VALUES (?, 'aws', NULL, 'pending', 2, 'x', 0, ?)", (inst, tx.now)))
        reconciler = await reconciler_for(driver, tmp_path, store)
        await reconciler.sync(now=1e9)
        rows = {r["id"]: r for r in await store.fetchall("SELECT id, state, last_error FROM instances")}
        assert {i: r["state"] for i, r in rows.items()} == {"aws-crash1": "stopped", "aws-crash2": "stopped"}
        assert "daemon stopped during its launch" in rows["aws-crash1"]["last_error"]
        assert "terminated" in rows["aws-crash1"]["last_error"]
        assert "before the provider reported a VM" in rows["aws-crash2"]["last_error"]
        assert (await describe(driver, made.cloud_id))["State"]["Name"] == "terminated"
    finally:
        await store.close()


async def test_a_launch_in_flight_is_not_taken_for_a_crashed_one(driver: AwsDriver, tmp_path: Path) -> None:
    from cloudtaskd.core.store import Store

    await driver.create(req("aws-busy"))
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, created_at,"
            " state_changed_at) VALUES ('aws-busy', 'aws', NULL, 'pending', 2, 'x', 0, ?)", (tx.now,)))
        reconciler = await reconciler_for(driver, tmp_path, store)
        reconciler._launching.add("aws-busy")
        await reconciler.sync(now=1e9)
        row = await store.fetchone("SELECT state FROM instances WHERE id = 'aws-busy'")
        assert row is not None and row["state"] == "pending"
        assert [v.instance_id for v in await driver.list()] == ["aws-busy"]
    finally:
        await store.close()


NO_DEFAULT_VPC = ("VPCIdNotSpecified", 400, "No default VPC for this user")


def no_default_vpc(action: str, p: dict[str, list[str]]) -> tuple[str, int, str] | None:
    """EC2 in a region where this account has no default VPC: what needs one is refused."""
    if action == "CreateSecurityGroup" and "VpcId" not in p:
        return NO_DEFAULT_VPC
    if action == "RunInstances" and "SubnetId" not in p and "NetworkInterface.1.SubnetId" not in p:
        return NO_DEFAULT_VPC
    return None


async def test_no_default_vpc_is_an_error_naming_the_keys_to_set(driver: AwsDriver, moto: MotoEc2) -> None:
    from cloudtaskd.errors import InvalidRequest

    moto.fail_if = no_default_vpc
    with pytest.raises(InvalidRequest, match="VPCIdNotSpecified") as info:
        await driver.create(req("aws-v1"))
    assert "providers.aws.subnet_id" in str(info.value) and "providers.aws.security_group_id" in str(info.value)
    # A group of one's own, still no subnet: RunInstances is refused the same way, as clearly.
    driver.security_group_id = "sg-12345678"
    with pytest.raises(InvalidRequest, match=r"VPCIdNotSpecified.*providers\.aws\.subnet_id"):
        await driver.create(req("aws-v2"))


async def test_subnet_id_and_security_group_id_place_the_vm(driver: AwsDriver, moto: MotoEc2) -> None:
    """Without a default VPC, subnet_id is enough: the SSH group is made in the subnet's VPC and the
    VM gets a public address there; security_group_id replaces the group the daemon would make."""
    ec2 = await driver._client()
    vpc = (await ec2.create_vpc(CidrBlock="10.7.0.0/16"))["Vpc"]["VpcId"]
    subnet = (await ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24"))["Subnet"]["SubnetId"]
    moto.fail_if = no_default_vpc
    driver.subnet_id = subnet
    vm = await driver.create(req("aws-w1"))
    inst = await describe(driver, vm.cloud_id)
    assert inst["SubnetId"] == subnet and inst["VpcId"] == vpc and inst.get("PublicIpAddress")
    groups = (await ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}]))["SecurityGroups"]
    made = [g for g in groups if g["GroupName"] == "cloudtask-ssh-daemon1"]
    assert made
    run = [p for a, p in moto.params if a == "RunInstances"][-1]
    assert run["NetworkInterface.1.SubnetId"] == [subnet]
    assert run["NetworkInterface.1.SecurityGroupId.1"] == [made[0]["GroupId"]]
    assert run["NetworkInterface.1.AssociatePublicIpAddress"] == ["true"]

    own = (await ec2.create_security_group(GroupName="mine", Description="ssh", VpcId=vpc))["GroupId"]
    other = AwsDriver(REGION, "daemon9", endpoint_url=moto.url, max_attempts=1, image=driver.image,
                      subnet_id=subnet, security_group_id=own)
    try:
        before = moto.calls["CreateSecurityGroup"]
        await other.create(CreateRequest("aws-w2", "daemon9", "t3.micro", REGION, False, "u", PUBKEY))
        assert moto.calls["CreateSecurityGroup"] == before
        run = [p for a, p in moto.params if a == "RunInstances"][-1]
        assert run["NetworkInterface.1.SecurityGroupId.1"] == [own]
    finally:
        await other.close()


CANONICAL = "099720109477"
NOBLE = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{}-server-{}"


def canonical_images(moto: MotoEc2) -> dict[str, str]:
    """Canonical's Ubuntu AMIs as EC2 names them (moto has none), with the decoys a lookup must pass by."""
    def add(name: str, arch: str, created: str, owner: str = CANONICAL) -> str:
        return moto.add_image(REGION, name, arch, f"{created}T00:00:00+00:00", owner)

    return {
        "amd64-older": add(NOBLE.format("amd64", "20240423"), "x86_64", "2024-04-23"),
        "amd64": add(NOBLE.format("amd64", "20250805"), "x86_64", "2025-08-05"),
        "arm64": add(NOBLE.format("arm64", "20250805"), "arm64", "2025-08-05"),
        # Newer, but an older release; and the right name from an account that is not Canonical.
        "jammy": add("ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20251001", "x86_64", "2025-10-01"),
        "impostor": add(NOBLE.format("arm64", "20251101"), "arm64", "2025-11-01", owner="111122223333"),
    }


async def test_each_architecture_boots_its_own_ubuntu_image(moto: MotoEc2, creds: None) -> None:
    """One driver launches Graviton and x86 types: each with Canonical's newest 24.04 AMI of its
    architecture, each looked up once (EC2 refuses an AMI of the other architecture: the stand-in too)."""
    moto.reset()
    images = canonical_images(moto)
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1)  # no image configured
    try:
        arm = await d.create(req("aws-arm1", machine_type="t4g.small", arch=ARM64))
        x86 = await d.create(req("aws-x861", machine_type="c5.large", arch=X86_64))
        arm2 = await d.create(req("aws-arm2", machine_type="c7g.large", arch=ARM64))
        got = {vm.instance_id: (await describe(d, vm.cloud_id))["ImageId"] for vm in (arm, x86, arm2)}
        assert got == {"aws-arm1": images["arm64"], "aws-x861": images["amd64"], "aws-arm2": images["arm64"]}
        assert moto.calls["DescribeImages"] == 2  # once per architecture, then cached
        # The stand-in refuses what EC2 refuses, so the check above cannot pass by moto's leniency.
        ec2 = await d._client()
        with pytest.raises(Exception, match="does not match the architecture 'x86_64'"):
            await ec2.run_instances(ImageId=images["amd64"], InstanceType="t4g.small", MinCount=1, MaxCount=1)
    finally:
        await d.close()


async def test_a_configured_image_is_used_for_every_architecture(moto: MotoEc2, creds: None) -> None:
    moto.reset()
    images = canonical_images(moto)
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1, image=images["arm64"])
    try:
        vm = await d.create(req("aws-own1", machine_type="t4g.small", arch=ARM64))
        assert (await describe(d, vm.cloud_id))["ImageId"] == images["arm64"]
        assert moto.calls["DescribeImages"] == 0
    finally:
        await d.close()


async def test_no_image_of_the_architecture_names_the_key_to_set(moto: MotoEc2, creds: None) -> None:
    moto.reset()
    moto.add_image(REGION, NOBLE.format("amd64", "20250805"), "x86_64", "2025-08-05T00:00:00+00:00", CANONICAL)
    d = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1)
    try:
        with pytest.raises(InvalidRequest, match=r"no Ubuntu 24.04 arm64 image .*providers\.aws\.image"):
            await d.create(req("aws-none1", machine_type="t4g.small", arch=ARM64))
    finally:
        await d.close()


async def test_the_catalog_s_architecture_picks_each_launch_s_image(moto: MotoEc2, creds: None, tmp_path: Path) -> None:
    """The chain in one daemon: the catalog (moto's DescribeInstanceTypes) cached in the state
    database, the provider's offers from it, and launches of an Arm and an x86 type; a type the
    catalog does not know boots the x86_64 image, with a warning saying so."""
    from structlog.testing import capture_logs

    from cloudtaskd.core.store import Store
    from cloudtaskd.fleet import catalog
    from cloudtaskd.fleet.catalog.aws import fetch_offers
    from cloudtaskd.fleet.pins import InstancePins

    moto.reset()
    images = canonical_images(moto)
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pricing = PricingStandin()
    await pricing.start()
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    driver = AwsDriver(REGION, "daemon1", endpoint_url=moto.url, max_attempts=1)
    try:
        settings = CloudSettings("t4g.small", "us-east-1a", False, 2, "ubuntu", key, machine_types=("c5.large",))
        provider = CloudProvider(driver, settings, "daemon1", tmp_path, InstancePins(store), test_runtime())
        offers = await fetch_offers(driver, ["t4g.small", "c5.large"], pricing_endpoint_url=pricing.url)
        await store.write(catalog.save, "aws", offers)
        provider.catalog = (await store.read(catalog.load))["aws"]
        by_type = {o.machine_type: o for o in provider.offers()}
        assert {t: o.arch for t, o in by_type.items()} == {"t4g.small": ARM64, "c5.large": X86_64}
        unknown = Offer("aws", "m5.large", "us-east-1a", False, 2)  # no catalog entry

        async def launch(instance_id: str, offer: Offer) -> str:
            spec = LaunchSpec(instance_id, 1, tmp_path, "ws://x", "t", 2, offer=offer)
            # No worker bundle: launch stops with an error once the VM runs, before any SSH.
            with pytest.raises(ProviderError, match="no worker bundle"):
                await provider.launch(spec)
            vm = await driver.get(instance_id)
            assert vm is not None
            return str((await describe(driver, vm.cloud_id))["ImageId"])

        with capture_logs() as logs:
            got = await asyncio.gather(launch("aws-cat1", by_type["t4g.small"]),
                                       launch("aws-cat2", by_type["c5.large"]), launch("aws-cat3", unknown))
        assert got == [images["arm64"], images["amd64"], images["amd64"]]
        [warned] = [e for e in logs if e["event"] == "instance_arch_unknown"]
        assert warned["machine_type"] == "m5.large" and warned["assumed"] == X86_64
    finally:
        await driver.close()
        await store.close()
        await pricing.stop()
