"""AWS EC2 driver (aioboto3): spot or on-demand, batched RunInstances, everything tagged.

Credentials: `access_key`/`secret_key` from the config, else the standard AWS chain (AWS_*
variables, shared files, instance roles). `endpoint_url` points every call at an emulator.

Batching: creates that arrive within BATCH_WINDOW_S for the same (type, zone, market) go out as
one RunInstances with Min/MaxCount = n; each instance is then tagged with its own cloudtask
instance id. A crash between the two leaves instances with only the daemon tag, which the
reconciler terminates as unknown: a batch can leak nothing.
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
from cloudtaskd.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CloudVm, CreateRequest

if TYPE_CHECKING:
    from cloudtaskd.check import CheckResult

log = structlog.get_logger("cloudtaskd.providers.aws")

BATCH_WINDOW_S = 0.05
LAUNCH_RETRY_S = 0.5  # first pause before retrying a transient RunInstances failure (then doubling)
UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_IMAGE_NAME = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"
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
                 endpoint_url: str | None = None, max_attempts: int = 5, image: str | None = None) -> None:
        self.region = region
        self.daemon_id = daemon_id
        self.endpoint_url = endpoint_url or None
        self.image = image
        self._creds = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
        self._max_attempts = max_attempts
        self._stack: AsyncExitStack | None = None
        self._ec2: Any = None
        self._ec2_once: Any = None
        self._client_lock = asyncio.Lock()
        self._setup: tuple[str, str, str] | None = None  # (image, key name, security group id)
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
        async with self._setup_lock:
            if self._setup is None:
                ec2 = await self._client()
                try:
                    image = req.image or self.image or await self._ubuntu_image(ec2)
                    key_name = await self._key_pair(ec2, req.ssh_public_key)
                    group = await self._security_group(ec2)
                except Exception as exc:
                    raise classify(exc, "prepare") from exc
                self._setup = (image, key_name, group)
            return self._setup

    async def _ubuntu_image(self, ec2: Any) -> str:
        found = await ec2.describe_images(Owners=[UBUNTU_OWNER],
                                          Filters=[{"Name": "name", "Values": [UBUNTU_IMAGE_NAME]},
                                                   {"Name": "state", "Values": ["available"]}])
        images = sorted(found.get("Images", []), key=lambda i: i.get("CreationDate", ""))
        if not images:
            raise InvalidRequest("aws", "prepare", f"no Ubuntu 22.04 image in {self.region}; set providers.aws.image")
        return str(images[-1]["ImageId"])

    async def _key_pair(self, ec2: Any, public_key: str) -> str:
        name = f"cloudtask-{self.daemon_id}-{hashlib.sha256(public_key.encode()).hexdigest()[:8]}"
        existing = await ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])
        if not existing.get("KeyPairs"):
            await ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.encode(), TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": [{"Key": TAG_DAEMON, "Value": self.daemon_id}]}])
        return name

    async def _security_group(self, ec2: Any) -> str:
        name = f"{SECURITY_GROUP}-{self.daemon_id}"
        found = await ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])
        if found.get("SecurityGroups"):
            return str(found["SecurityGroups"][0]["GroupId"])
        made = await ec2.create_security_group(GroupName=name, Description="cloudtask: SSH from the control host",
                                               TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                                                   {"Key": TAG_DAEMON, "Value": self.daemon_id}]}])
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
            vms = await self._run_batch(batch.requests)
        except Exception as exc:
            err = classify(exc, "launch")
            for f in batch.futures:
                if not f.done():
                    f.set_exception(err)
            return
        for f, vm in zip(batch.futures, vms, strict=True):
            if not f.done():
                f.set_result(vm)

    async def _run_batch(self, reqs: list[CreateRequest]) -> list[CloudVm]:
        first = reqs[0]
        image, key_name, group = await self._prepare(first)
        ec2 = await self._client()
        n = len(reqs)
        params: dict[str, Any] = {
            "ImageId": image, "InstanceType": first.machine_type, "MinCount": n, "MaxCount": n,
            "KeyName": key_name, "SecurityGroupIds": [group],
            # Same ids, same token: a retried call (after a timeout) does not launch twice.
            "ClientToken": hashlib.sha256(",".join(sorted(r.instance_id for r in reqs)).encode()).hexdigest()[:64],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [
                {"Key": TAG_DAEMON, "Value": self.daemon_id}, {"Key": "Name", "Value": "cloudtask"}]}],
        }
        if first.zone and first.zone != self.region:
            params["Placement"] = {"AvailabilityZone": first.zone}
        if first.spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        out = await self._run_instances(params)
        instances = out.get("Instances", [])
        vms = []
        for req, inst in zip(reqs, instances, strict=False):
            try:
                await ec2.create_tags(Resources=[inst["InstanceId"]], Tags=[{"Key": TAG_INSTANCE,
                                                                             "Value": req.instance_id}])
            except Exception as exc:
                raise classify(exc, "tag") from exc
            vms.append(self._vm(inst, req.instance_id))
        if len(vms) != n:
            raise CapacityError("aws", "launch", f"asked for {n} instances, got {len(vms)}")
        log.info("aws_instances_launched", count=n, type=first.machine_type, zone=first.zone, spot=first.spot)
        return vms

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
        found = await self._describe([{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
        return found[0] if found else None

    async def list(self) -> list[CloudVm]:
        return await self._describe([])

    async def delete(self, instance_id: str) -> None:
        found = await self._describe([{"Name": f"tag:{TAG_INSTANCE}", "Values": [instance_id]}])
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
            out = await ec2.get_console_output(InstanceId=vm.cloud_id, Latest=True)
        except Exception as exc:
            raise classify(exc, "describe") from exc
        return console_host_keys(str(out.get("Output") or ""))

    # ---- cloudtaskctl check ----

    async def check(self, *, machine_types: tuple[str, ...], zones: tuple[str, ...], max_instances: int, cpus: int,
                    cheap: bool = False) -> builtins.list[CheckResult]:
        """Credentials, then (unless cheap) the region's zones, the instance types, the image, the
        SSH rule and the vCPU quota: each a line with what to fix."""
        from cloudtaskd.check import CheckResult

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
        for machine_type in dict.fromkeys(machine_types):
            try:
                got = await ec2.describe_instance_types(InstanceTypes=[machine_type])
                ok = bool(got.get("InstanceTypes"))
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
                out.append(CheckResult("aws", "image", "ok", f"Ubuntu 22.04: {await self._ubuntu_image(ec2)}"))
        except InvalidRequest as exc:
            out.append(CheckResult("aws", f"image {self.image or '(Ubuntu 22.04)'}", "FAIL",
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
        from cloudtaskd.check import CheckResult

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
