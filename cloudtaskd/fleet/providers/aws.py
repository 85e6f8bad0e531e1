"""AWS EC2 driver (aioboto3): spot or on-demand, batched RunInstances, everything tagged.

Credentials: `access_key`/`secret_key` from the config, else the standard AWS chain (AWS_*
variables, shared files, instance roles). `endpoint_url` points every call at an emulator.

Batching: creates that arrive within BATCH_WINDOW_S for the same (type, zone, market) go out as
one RunInstances with Min/MaxCount = n. Every instance and its volumes get the daemon's tag in the
RunInstances call itself (TagSpecifications). A batch of one gets its cloudtask instance id there
too; in a larger batch each instance is then tagged with its own id by CreateTags, retried while
EC2 does not know the new instance yet (`InvalidInstanceID.NotFound`: its API is eventually
consistent). An instance that could not be tagged is terminated at once; a crash in between
leaves it with only the daemon tag, and `list` reports it under its cloud id (i-...), which
`get`/`delete` accept, so the reconciler terminates it as unknown: a batch can leak nothing.

Networking: the region's default VPC, unless `subnet_id` is set (then the VM gets a public address
in that subnet and the SSH group is made in its VPC) or `security_group_id` names a group of one's
own. A region without a default VPC fails with an error naming both keys.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
from collections import defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from cloudtaskd.errors import (
    CapacityError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    QuotaExceeded,
    TransientProviderError,
)
from cloudtaskd.fleet.providers.base import ARM64, X86_64
from cloudtaskd.fleet.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CloudVm, CreateRequest

if TYPE_CHECKING:
    from cloudtaskd.fleet.providers.checks import CheckResult

log = structlog.get_logger("cloudtaskd.fleet.providers.aws")

BATCH_WINDOW_S = 0.05
LAUNCH_RETRY_S = 0.5  # first pause before retrying a transient RunInstances failure (then doubling)
# CreateTags on an instance RunInstances has just returned can meet EC2's eventual consistency:
# retried on InvalidInstanceID.NotFound, pausing TAG_RETRY_S doubling, TAG_ATTEMPTS calls in all
# (about 15 s, past the few seconds AWS documents for a new id to propagate).
TAG_RETRY_S = 0.25
TAG_ATTEMPTS = 7
UBUNTU_OWNER = "099720109477"  # Canonical
# Canonical's AMI names: ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-<amd64|arm64>-server-<serial>.
UBUNTU_RELEASE = "Ubuntu 24.04"
UBUNTU_IMAGE_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*"
UBUNTU_ARCH = {X86_64: "amd64", ARM64: "arm64"}  # ours -> Canonical's name part (EC2 says x86_64/arm64, as we do)
SECURITY_GROUP = "cloudtask-ssh"
HOST_KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"  # cloud-init prints these to the console
HOST_KEYS_END = "-----END SSH HOST KEY KEYS-----"

STATUS_MAP = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopping",  # not ours to restart: treated as on its way out
    "shutting-down": "stopping",
    "terminated": "terminated",
}

CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
                  "InsufficientHostCapacity", "Unsupported"}
QUOTA_CODES = {"InstanceLimitExceeded", "MaxSpotInstanceCountExceeded", "VcpuLimitExceeded",
               "SpotInstanceRequestLimitExceeded", "RequestLimitExceeded-quota"}
AUTH_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
              "OptInRequired", "Blocked", "ExpiredToken", "AccessDenied"}
TRANSIENT_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError", "ServiceUnavailable",
                   "Unavailable", "InternalFailure"}
# What EC2 answers when a call needs a VPC and the region has no default one ("No default VPC for
# this user"), or when the default VPC has no subnet (MissingInput: "No subnets found for the
# default VPC ..."; MissingInput is also a generic code, so only with a message about a VPC/subnet).
NO_VPC_CODES = {"VPCIdNotSpecified", "VPCResourceNotSpecified"}
NO_VPC_ADVICE = ("the region has no default VPC (or it has no subnet) for this account: set providers.aws.subnet_id "
                 "(a subnet to start VMs in) and, if you keep your own rules, providers.aws.security_group_id "
                 "(a group in that subnet's VPC allowing SSH from this host)")
NOT_FOUND_CODE = "InvalidInstanceID.NotFound"


def classify(exc: BaseException, op: str) -> ProviderError:
    """botocore's errors -> our named types (the only place that knows EC2's error codes)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ProviderAuthError("aws", op, "no credentials: set providers.aws.access_key and secret_key, "
                                 "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return TransientProviderError("aws", op, str(exc))
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "")), str(err.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{code}: {message}"
        if code in NO_VPC_CODES or (code == "MissingInput" and ("VPC" in message or "subnet" in message)):
            return InvalidRequest("aws", op, f"{text}: {NO_VPC_ADVICE}")
        if code in CAPACITY_CODES:
            return CapacityError("aws", op, text)
        if code in QUOTA_CODES:
            return QuotaExceeded("aws", op, text)
        if code in AUTH_CODES or status in (401, 403):
            return ProviderAuthError("aws", op, text)
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientProviderError("aws", op, text)
        return InvalidRequest("aws", op, text)
    return TransientProviderError("aws", op, f"{type(exc).__name__}: {exc}")


@dataclass
class _Batch:
    requests: list[CreateRequest] = field(default_factory=list)
    futures: list[asyncio.Future[CloudVm]] = field(default_factory=list)


class AwsDriver:
    name = "aws"

    def __init__(self, region: str, daemon_id: str, *, access_key: str | None = None, secret_key: str | None = None,
                 endpoint_url: str | None = None, max_attempts: int = 5, image: str | None = None,
                 subnet_id: str | None = None, security_group_id: str | None = None) -> None:
        self.region = region
        self.daemon_id = daemon_id
        self.endpoint_url = endpoint_url or None
        self.image = image
        self.subnet_id = subnet_id or None  # None: the region's default VPC
        self.security_group_id = security_group_id or None  # None: one made per daemon (SSH in)
        self._creds = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
        self._max_attempts = max_attempts
        self._stack: AsyncExitStack | None = None
        self._ec2: Any = None
        self._ec2_once: Any = None
        self._client_lock = asyncio.Lock()
        self._setup: tuple[str, str] | None = None  # (key name, security group id)
        self._images: dict[str, str] = {}  # arch -> the default image in this region (cached per architecture)
        self._setup_lock = asyncio.Lock()
        self._batches: dict[tuple[str, str, bool], _Batch] = defaultdict(_Batch)

    def session(self, region: str | None = None) -> Any:
        """An aioboto3 session with this driver's credentials (the catalog's Pricing client uses it too)."""
        import aioboto3

        return aioboto3.Session(region_name=region or self.region, **self._creds)

    def client_config(self) -> Any:
        from botocore.config import Config as BotoConfig

        return BotoConfig(retries={"total_max_attempts": self._max_attempts, "mode": "standard"})

    async def _client(self) -> Any:
        async with self._client_lock:
            if self._ec2 is None:
                from botocore.config import Config as BotoConfig

                self._stack = AsyncExitStack()
                self._ec2 = await self._stack.enter_async_context(self.session().client(
                    "ec2", endpoint_url=self.endpoint_url, config=self.client_config()))
                # RunInstances retries itself (below): botocore would retry a stock-out (a 500) too,
                # and the orchestrator should hear of it at once to try the next-best offer.
                self._ec2_once = await self._stack.enter_async_context(self.session().client(
                    "ec2", endpoint_url=self.endpoint_url,
                    config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"})))
            return self._ec2

    async def _run_instances(self, params: dict[str, Any]) -> Any:
        """RunInstances, retried on transient errors only (the ClientToken makes a retry safe)."""
        await self._client()
        delay = LAUNCH_RETRY_S
        for attempt in range(1, self._max_attempts + 1):
            try:
                return await self._ec2_once.run_instances(**params)
            except Exception as exc:
                err = classify(exc, "launch")
                if not isinstance(err, TransientProviderError) or attempt == self._max_attempts:
                    raise err from exc
                log.info("aws_launch_retry", attempt=attempt, error=str(err))
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._ec2 = self._ec2_once = None

    # ---- one-time set-up: image, key pair, security group ----

    async def _prepare(self, req: CreateRequest) -> tuple[str, str, str]:
        """(image, key name, security group id) for this request: the key pair and the group are
        made once; the default image is looked up once per architecture (a request's image, or the
        configured one, is used as it is, whatever the architecture)."""
        async with self._setup_lock:
            ec2 = await self._client()
            try:
                if self._setup is None:
                    key_name = await self._key_pair(ec2, req.ssh_public_key)
                    self._setup = (key_name, self.security_group_id or await self._security_group(ec2))
                image = req.image or self.image
                if not image:
                    if req.arch not in self._images:
                        self._images[req.arch] = await self._ubuntu_image(ec2, req.arch)
                    image = self._images[req.arch]
            except Exception as exc:
                raise classify(exc, "prepare") from exc
            return (image, *self._setup)

    async def _ubuntu_image(self, ec2: Any, arch: str) -> str:
        """The newest Canonical Ubuntu LTS AMI in this region for this architecture."""
        if arch not in UBUNTU_ARCH:
            raise InvalidRequest("aws", "prepare", f"no default image for architecture {arch!r}: "
                                 "set providers.aws.image")
        name = UBUNTU_IMAGE_NAME.format(arch=UBUNTU_ARCH[arch])
        found = await ec2.describe_images(Owners=[UBUNTU_OWNER],
                                          Filters=[{"Name": "name", "Values": [name]},
                                                   {"Name": "architecture", "Values": [arch]},
                                                   {"Name": "state", "Values": ["available"]}])
        images = sorted(found.get("Images", []), key=lambda i: i.get("CreationDate", ""))
        if not images:
            raise InvalidRequest("aws", "prepare", f"no {UBUNTU_RELEASE} {arch} image ({name}, owner "
                                 f"{UBUNTU_OWNER}) in {self.region}; set providers.aws.image to an AMI id of that "
                                 "architecture")
        log.info("aws_default_image", region=self.region, arch=arch, image=images[-1]["ImageId"],
                 name=images[-1].get("Name"))
        return str(images[-1]["ImageId"])

    async def _key_pair(self, ec2: Any, public_key: str) -> str:
        name = f"cloudtask-{self.daemon_id}-{hashlib.sha256(public_key.encode()).hexdigest()[:8]}"
        existing = await ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])
        if not existing.get("KeyPairs"):
            await ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.encode(), TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": [{"Key": TAG_DAEMON, "Value": self.daemon_id}]}])
        return name

    async def _security_group(self, ec2: Any) -> str:
        """The daemon's SSH group: in the default VPC, or in subnet_id's VPC (a group belongs to one VPC)."""
        name = f"{SECURITY_GROUP}-{self.daemon_id}"
        filters = [{"Name": "group-name", "Values": [name]}]
        vpc: dict[str, str] = {}
        if self.subnet_id:
            subnets = await ec2.describe_subnets(SubnetIds=[self.subnet_id])
            vpc = {"VpcId": str(subnets["Subnets"][0]["VpcId"])}
            filters.append({"Name": "vpc-id", "Values": [vpc["VpcId"]]})
        found = await ec2.describe_security_groups(Filters=filters)
        if found.get("SecurityGroups"):
            return str(found["SecurityGroups"][0]["GroupId"])
        made = await ec2.create_security_group(GroupName=name, Description="cloudtask: SSH from the control host",
                                               TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                                                   {"Key": TAG_DAEMON, "Value": self.daemon_id}]}], **vpc)
        group = str(made["GroupId"])
        await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        return group

    # ---- the driver contract ----

    async def create(self, req: CreateRequest) -> CloudVm:
        existing = await self.get(req.instance_id)
        if existing is not None and existing.state != "terminated":
            return existing  # idempotent: this instance id was already launched
        key = (req.machine_type, req.zone, req.spot)
        batch = self._batches[key]
        future: asyncio.Future[CloudVm] = asyncio.get_running_loop().create_future()
        batch.requests.append(req)
        batch.futures.append(future)
        if len(batch.requests) == 1:
            asyncio.get_running_loop().call_later(
                BATCH_WINDOW_S, lambda: asyncio.ensure_future(self._flush(key)))
        return await future

    async def _flush(self, key: tuple[str, str, bool]) -> None:
        batch = self._batches.pop(key, _Batch())
        if not batch.requests:
            return
        try:
            outcomes = await self._run_batch(batch.requests)
        except Exception as exc:
            err = classify(exc, "launch")
            for f in batch.futures:
                if not f.done():
                    f.set_exception(err)
            return
        for f, outcome in zip(batch.futures, outcomes, strict=True):
            if f.done():
                continue
            if isinstance(outcome, ProviderError):
                f.set_exception(outcome)
            else:
                f.set_result(outcome)

    async def _run_batch(self, reqs: list[CreateRequest]) -> builtins.list[CloudVm | ProviderError]:
        """One RunInstances for the batch; per request its VM, or why it has none."""
        first = reqs[0]
        image, key_name, group = await self._prepare(first)
        n = len(reqs)
        ours = [{"Key": TAG_DAEMON, "Value": self.daemon_id}]
        if n == 1:  # tagged with its instance id as it is made: nothing can see it untagged
            ours.append({"Key": TAG_INSTANCE, "Value": first.instance_id})
        params: dict[str, Any] = {
            "ImageId": image, "InstanceType": first.machine_type, "MinCount": n, "MaxCount": n,
            "KeyName": key_name,
            # Same ids, same token: a retried call (after a timeout) does not launch twice.
            "ClientToken": hashlib.sha256(",".join(sorted(r.instance_id for r in reqs)).encode()).hexdigest()[:64],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [*ours, {"Key": "Name", "Value": "cloudtask"}]},
                                  {"ResourceType": "volume", "Tags": ours}],
        }
        if self.subnet_id:
            # A subnet of one's own often does not map public addresses on launch; the daemon
            # reaches the VM over SSH at its public address, so it asks for one.
            params["NetworkInterfaces"] = [{"DeviceIndex": 0, "SubnetId": self.subnet_id, "Groups": [group],
                                            "AssociatePublicIpAddress": True}]
        else:
            params["SecurityGroupIds"] = [group]
        if first.zone and first.zone != self.region and not self.subnet_id:  # a subnet has its own zone
            params["Placement"] = {"AvailabilityZone": first.zone}
        if first.spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        out = await self._run_instances(params)
        instances = out.get("Instances", [])
        if len(instances) != n:
            await self._terminate_quietly([str(i["InstanceId"]) for i in instances])
            raise CapacityError("aws", "launch", f"asked for {n} instances, got {len(instances)}")
        if n == 1:
            outcomes: builtins.list[CloudVm | ProviderError] = [self._vm(instances[0], first.instance_id)]
        else:
            outcomes = list(await asyncio.gather(*(self._tag(inst, req) for req, inst in zip(reqs, instances,
                                                                                            strict=True))))
            untagged = [str(inst["InstanceId"]) for inst, o in zip(instances, outcomes, strict=True)
                        if isinstance(o, ProviderError)]
            await self._terminate_quietly(untagged)  # never left running without its instance id
        launched = sum(not isinstance(o, ProviderError) for o in outcomes)
        log.info("aws_instances_launched", count=launched, type=first.machine_type, zone=first.zone, spot=first.spot)
        return outcomes

    async def _tag(self, inst: dict[str, Any], req: CreateRequest) -> CloudVm | ProviderError:
        """Tag a just-made instance with its instance id, retrying while EC2 does not know it yet."""
        ec2 = await self._client()
        delay = TAG_RETRY_S
        for attempt in range(1, TAG_ATTEMPTS + 1):
            try:
                await ec2.create_tags(Resources=[inst["InstanceId"]],
                                      Tags=[{"Key": TAG_INSTANCE, "Value": req.instance_id}])
                return self._vm(inst, req.instance_id)
            except Exception as exc:
                err = classify(exc, "tag")
                code = _error_code(exc)
                if attempt == TAG_ATTEMPTS or not (code == NOT_FOUND_CODE or isinstance(err, TransientProviderError)):
                    log.warning("aws_tag_failed", cloud_id=inst["InstanceId"], instance=req.instance_id,
                                attempts=attempt, error=str(err))
                    return err
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _terminate_quietly(self, cloud_ids: builtins.list[str]) -> None:
        """Best effort: what this fails to end carries our daemon tag, and the reconciler ends it."""
        if not cloud_ids:
            return
        try:
            await (await self._client()).terminate_instances(InstanceIds=cloud_ids)
        except Exception as exc:
            log.warning("aws_terminate_failed", cloud_ids=cloud_ids, error=str(classify(exc, "terminate")))

    def _vm(self, inst: dict[str, Any], instance_id: str | None = None) -> CloudVm:
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        return CloudVm(
            instance_id=instance_id or tags.get(TAG_INSTANCE, ""),
            cloud_id=str(inst["InstanceId"]),
            state=STATUS_MAP.get(inst.get("State", {}).get("Name", ""), "pending"),
            public_ip=inst.get("PublicIpAddress"),
            zone=inst.get("Placement", {}).get("AvailabilityZone"),
            spot=inst.get("InstanceLifecycle") == "spot",
            tags=tags,
        )

    async def _describe(self, filters: list[dict[str, Any]]) -> list[CloudVm]:
        ec2 = await self._client()
        base = [{"Name": f"tag:{TAG_DAEMON}", "Values": [self.daemon_id]},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped",
                                                           "shutting-down"]}]
        vms: list[CloudVm] = []
        try:
            paginator = ec2.get_paginator("describe_instances")
            async for page in paginator.paginate(Filters=base + filters):
                for reservation in page.get("Reservations", []):
                    vms.extend(self._vm(inst) for inst in reservation.get("Instances", []))
        except Exception as exc:
            raise classify(exc, "describe") from exc
        return vms

    async def get(self, instance_id: str) -> CloudVm | None:
        found = await self._describe(_id_filter(instance_id))
        return found[0] if found else None

    async def list(self) -> list[CloudVm]:
        return await self._describe([])

    async def delete(self, instance_id: str) -> None:
        found = await self._describe(_id_filter(instance_id))
        if not found:
            return
        ec2 = await self._client()
        try:
            await ec2.terminate_instances(InstanceIds=[vm.cloud_id for vm in found])
        except Exception as exc:
            raise classify(exc, "terminate") from exc

    async def host_keys(self, instance_id: str) -> builtins.list[str]:
        """The host keys cloud-init prints to the console (between its BEGIN/END SSH HOST KEY KEYS
        markers). The console output appears minutes after boot, so [] is common: then the caller
        trusts on first use."""
        vm = await self.get(instance_id)
        if vm is None:
            return []
        ec2 = await self._client()
        try:
            try:
                out = await ec2.get_console_output(InstanceId=vm.cloud_id, Latest=True)
            except Exception as exc:
                # Latest (the live serial output, at once) exists only on Nitro types; older ones
                # (t2, m4, c4, r4, ...) refuse it as a bad request (UnsupportedOperation). Their
                # buffered output, posted a few minutes after boot, holds the same keys.
                if not isinstance(classify(exc, "describe"), InvalidRequest):
                    raise
                log.info("aws_console_latest_refused", instance=instance_id, error=_error_code(exc))
                out = await ec2.get_console_output(InstanceId=vm.cloud_id)
        except Exception as exc:
            raise classify(exc, "describe") from exc
        return console_host_keys(str(out.get("Output") or ""))

    # ---- cloudtaskctl check ----

    async def check(self, *, machine_types: tuple[str, ...], zones: tuple[str, ...], max_instances: int, cpus: int,
                    cheap: bool = False) -> builtins.list[CheckResult]:
        """Credentials, then (unless cheap) the region's zones, the instance types, the image, the
        SSH rule and the vCPU quota: each a line with what to fix."""
        from cloudtaskd.fleet.providers.checks import CheckResult

        def fail(what: str, exc: BaseException, fix: str) -> CheckResult:
            return CheckResult("aws", what, "FAIL", f"{classify(exc, 'check')}; {fix}")

        out: builtins.list[CheckResult] = []
        ec2 = await self._client()
        try:
            found = await ec2.describe_availability_zones()
        except Exception as exc:
            return [fail("credentials", exc, "set providers.aws.access_key/secret_key or the AWS_* variables,"
                                             f" and check that region {self.region} is enabled for the account")]
        names = {z["ZoneName"] for z in found.get("AvailabilityZones", [])}
        out.append(CheckResult("aws", "credentials", "ok", f"region {self.region}, {len(names)} zones"))
        if cheap:
            return out
        for zone in zones:
            if zone and zone not in names and zone != self.region:
                out.append(CheckResult("aws", f"zone {zone}", "FAIL", f"not a zone of {self.region}: one of"
                                       f" {', '.join(sorted(names))} (providers.aws.zone / zones)"))
        arches: dict[str, None] = {}  # of the configured types: each needs a default image of its own
        for machine_type in dict.fromkeys(machine_types):
            try:
                got = await ec2.describe_instance_types(InstanceTypes=[machine_type])
                ok = bool(got.get("InstanceTypes"))
                arches.update(dict.fromkeys(a for a in map(arch_of, got.get("InstanceTypes", [])) if a))
            except Exception as exc:
                if "InvalidInstanceType" not in str(exc):
                    out.append(fail(f"instance type {machine_type}", exc, "try again, or check the permissions"))
                    continue
                ok = False
            out.append(CheckResult("aws", f"instance type {machine_type}", "ok") if ok else CheckResult(
                "aws", f"instance type {machine_type}", "FAIL",
                f"{self.region} has no such type: fix providers.aws.machine_type / machine_types"))
        try:
            if self.image:
                images = (await ec2.describe_images(ImageIds=[self.image])).get("Images", [])
                if not images:
                    raise InvalidRequest("aws", "check", f"image {self.image} not found")
                out.append(CheckResult("aws", f"image {self.image}", "ok", str(images[0].get("Name", ""))))
            else:
                for arch in arches or (X86_64,):
                    out.append(CheckResult("aws", f"image ({arch})", "ok",
                                           f"{UBUNTU_RELEASE}: {await self._ubuntu_image(ec2, arch)}"))
        except InvalidRequest as exc:
            out.append(CheckResult("aws", f"image {self.image or f'({UBUNTU_RELEASE})'}", "FAIL",
                                   f"{exc}: set providers.aws.image to an AMI id that exists in {self.region}"))
        except Exception as exc:
            if "InvalidAMIID" not in str(exc):
                out.append(fail(f"image {self.image}", exc, "allow ec2:DescribeImages"))
            else:
                out.append(CheckResult("aws", f"image {self.image}", "FAIL", f"no such image in {self.region}:"
                                       " set providers.aws.image to an AMI id that exists there"))
        name = f"{SECURITY_GROUP}-<daemon id>"
        try:
            groups = (await ec2.describe_security_groups(
                Filters=[{"Name": "group-name", "Values": [f"{SECURITY_GROUP}-*"]}])).get("SecurityGroups", [])
            ssh = [g for g in groups if any(p.get("IpProtocol") in ("tcp", "-1") and p.get("FromPort", 0) <= 22
                                            <= p.get("ToPort", 65535) for p in g.get("IpPermissions", []))]
            if ssh or not groups:
                out.append(CheckResult("aws", "ssh rule", "ok", f"security group {name} admits tcp/22" if ssh else
                                       f"security group {name} (tcp/22 from anywhere) is made at the first launch"))
            else:
                out.append(CheckResult("aws", "ssh rule", "FAIL", f"security group {groups[0]['GroupName']} does not"
                                       " admit tcp/22: add the rule, or delete the group to have it made again"))
        except Exception as exc:
            out.append(fail("ssh rule", exc, "allow ec2:DescribeSecurityGroups"))
        out.append(await self._quota_check(max_instances * cpus))
        return out

    async def _quota_check(self, vcpus: int) -> CheckResult:
        """The On-Demand standard-instance vCPU quota (L-1216C47A) against what max_instances may use."""
        from cloudtaskd.fleet.providers.checks import CheckResult

        try:
            async with self.session().client("service-quotas", endpoint_url=self.endpoint_url,
                                             config=self.client_config()) as sq:
                got = await sq.get_service_quota(ServiceCode="ec2", QuotaCode="L-1216C47A")
            value = float(got["Quota"]["Value"])
        except Exception as exc:
            return CheckResult("aws", "quota", "warn", f"could not read the EC2 vCPU quota ({type(exc).__name__}):"
                                                       f" make sure it allows {vcpus} vCPUs (max_instances x cpus)")
        if value < vcpus:
            return CheckResult("aws", "quota", "FAIL", f"the on-demand vCPU quota is {value:g}, below the {vcpus} that"
                                                       " max_instances x cpus needs: ask AWS for more, or lower"
                                                       " max_instances")
        return CheckResult("aws", "quota", "ok", f"{value:g} on-demand vCPUs, {vcpus} needed at most")


def arch_of(instance_type: dict[str, Any]) -> str:
    """X86_64 or ARM64 from DescribeInstanceTypes' `ProcessorInfo.SupportedArchitectures` (i386 |
    x86_64 | arm64 | x86_64_mac | arm64_mac; t2.micro lists i386 and x86_64); "" for anything else."""
    supported = set(instance_type.get("ProcessorInfo", {}).get("SupportedArchitectures") or [])
    return ARM64 if "arm64" in supported else X86_64 if "x86_64" in supported else ""


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _id_filter(instance_id: str) -> list[dict[str, Any]]:
    """Find a VM by our instance id (its tag), or by its EC2 id (i-...) when it never got that tag.
    Ours are `aws-<hex>`, so the two never collide; either way only the daemon's tagged VMs match."""
    if instance_id.startswith("i-"):
        return [{"Name": "instance-id", "Values": [instance_id]}]
    return [{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}]


def console_host_keys(output: str) -> list[str]:
    """OpenSSH key lines from a console output (base64, as EC2 returns it, or already decoded)."""
    text = output
    if HOST_KEYS_BEGIN not in text:
        try:
            text = base64.b64decode(output, validate=False).decode(errors="replace")
        except ValueError:
            return []
    begin, end = text.rfind(HOST_KEYS_BEGIN), text.rfind(HOST_KEYS_END)
    if begin < 0 or end < begin:
        return []
    keys = []
    for line in text[begin + len(HOST_KEYS_BEGIN):end].splitlines():
        parts = line.split()  # some images prefix each line ("ec2: ssh-ed25519 AAAA... root@host")
        at = next((i for i, p in enumerate(parts[:-1]) if p.startswith(("ssh-", "ecdsa-"))), None)
        if at is not None:
            keys.append(f"{parts[at]} {parts[at + 1]}")
    return keys
