"""Azure driver (the async azure-mgmt clients): spot or regular VMs, every resource tagged.

Credentials: a service principal (`tenant_id`, `client_id`, `client_secret`: all three, or none),
else DefaultAzureCredential (environment, managed identity, the az CLI login). `base_url` points
every client at an emulator; `client_kwargs` go to each client as they are (tests pass their own
authentication policy and a short polling interval there; the product's path stays https-only).

Idempotency: every resource is named from our instance id (`ct-<id>-vm`, `-nic`, `-ip`,
`-osdisk`), so a repeated create finds the VM it made before. A failed create leaves nothing behind:
Azure keeps a VM that failed allocation as a resource in the Failed state, so create deletes it (and
its NIC, IP and disk) before raising.

Orphans: the IP and NIC are made before the VM, so a daemon that dies between them (or a create
cancelled at shutdown) leaves them with no VM, and the reconciler, which syncs from VMs, would never
see them. Every one carries the daemon's and the instance's tags (the OS disk too: Azure does not
pass a VM's tags on to its disk, so create tags it), and list() deletes those of ours whose
instance has no VM, once they have been seen so for ORPHAN_GRACE_S and no create of this driver is
making them (ARM's lists lag its writes).
"""

from __future__ import annotations

import asyncio
import builtins
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
from cloudtaskd.fleet.providers.checks import CheckResult, quota_result
from cloudtaskd.fleet.providers.cloud import TAG_DAEMON, TAG_INSTANCE, CloudVm, CreateRequest

log = structlog.get_logger("cloudtaskd.fleet.providers.azure")

PROVIDER = "azure"
# Ubuntu 24.04 LTS per architecture (publisher, offer, sku, version), both Hyper-V generation 2.
DEFAULT_IMAGES = {X86_64: ("Canonical", "ubuntu-24_04-lts", "server", "latest"),
                  ARM64: ("Canonical", "ubuntu-24_04-lts", "server-arm64", "latest")}
VNET_PREFIX = "10.77.0.0/16"
SUBNET_NAME = "cloudtask"
SSH_RULE_PRIORITY = 1000
NAME_MAX = 64  # Linux VM and computer names
ORPHAN_GRACE_S = 180.0  # a NIC, IP or disk of ours seen this long with no VM is deleted

# Instance-view codes -> VM_STATES. A power state, when there is one, says more than provisioning.
STATUS_MAP = {
    "PowerState/starting": "pending",
    "PowerState/running": "running",
    "PowerState/stopping": "stopping",
    "PowerState/stopped": "stopping",  # not ours to restart: on its way out, the reconciler deletes it
    "PowerState/deallocating": "stopping",
    "PowerState/deallocated": "stopping",  # still a resource (disk, NIC, IP): listed so it gets deleted
    "ProvisioningState/creating": "pending",
    "ProvisioningState/updating": "pending",
    "ProvisioningState/migrating": "pending",
    "ProvisioningState/succeeded": "pending",  # up, but no power state reported yet
    "ProvisioningState/deleting": "stopping",
    "ProvisioningState/failed": "stopping",  # a failed VM stays behind until deleted
    "ProvisioningState/canceled": "stopping",
}

CAPACITY_CODES = {"ZonalAllocationFailed", "AllocationFailed", "SkuNotAvailable", "OverconstrainedAllocationRequest",
                  "OverconstrainedZonalAllocationRequest"}
QUOTA_CODES = {"QuotaExceeded", "PublicIPCountLimitReached"}
AUTH_CODES = {"AuthorizationFailed", "InvalidAuthenticationToken", "InvalidAuthenticationTokenTenant",
              "ExpiredAuthenticationToken", "AuthenticationFailed", "LinkedAuthorizationFailed"}
INVALID_CODES = {"InvalidParameter", "BadRequest", "InvalidRequestContent", "InvalidRequestFormat",
                 "InvalidResourceName", "ImageNotFound", "PlatformImageNotFound", "InvalidTemplate"}
TRANSIENT_CODES = {"TooManyRequests", "SubscriptionRequestsThrottled", "InternalServerError",
                   "InternalExecutionError", "InternalOperationError", "RetryableError", "ServiceUnavailable",
                   "GatewayTimeout"}
NOT_FOUND_CODES = {"ResourceNotFound", "NotFound", "ResourceGroupNotFound"}


def classify(exc: BaseException, op: str) -> ProviderError:
    """azure-core's errors -> our named types, by ARM error code first (the only place that knows them)."""
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ProviderError):
        return exc
    error = getattr(exc, "error", None)
    code = str(getattr(error, "code", None) or "")
    message = str(getattr(error, "message", None) or exc)
    status = int(getattr(exc, "status_code", None) or 0)
    text = f"{code}: {message}" if code else message
    if code in CAPACITY_CODES:
        return CapacityError(PROVIDER, op, text)
    if code in QUOTA_CODES or (code == "OperationNotAllowed" and "quota" in message.lower()):
        return QuotaExceeded(PROVIDER, op, text)
    if code in AUTH_CODES or status in (401, 403):
        return ProviderAuthError(PROVIDER, op, text)
    if code in INVALID_CODES or status == 400:
        return InvalidRequest(PROVIDER, op, text)
    if code in TRANSIENT_CODES or status == 429 or status >= 500:
        return TransientProviderError(PROVIDER, op, text)
    # No HTTP code at all: a credential that could not get a token, or the network.
    if not code and not status:
        if isinstance(exc, ClientAuthenticationError):
            first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
            return ProviderAuthError(PROVIDER, op, "cannot authenticate: set providers.azure.tenant_id, client_id "
                                     "and client_secret, or make DefaultAzureCredential work (AZURE_* variables, a "
                                     f"managed identity, `az login`); the SDK said: {first}")
        if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError | TimeoutError):
            return TransientProviderError(PROVIDER, op, f"{type(exc).__name__}: {message}")
    return ProviderError(PROVIDER, op, text or type(exc).__name__)


def _not_found(exc: BaseException) -> bool:
    error = getattr(exc, "error", None)
    return getattr(exc, "status_code", None) == 404 or getattr(error, "code", None) in NOT_FOUND_CODES


def _props(resource: Any) -> dict[str, Any]:
    """The REST `properties` of a response model (the models are mappings over the wire JSON)."""
    props = resource.get("properties") if resource is not None else None
    return dict(props) if props else {}


def vm_state(vm: Any) -> str:
    props = _props(vm)
    codes = [str(s.get("code", "")) for s in (props.get("instanceView") or {}).get("statuses") or []]
    power = next((c for c in codes if c.startswith("PowerState/")), None)
    provisioning = next((c for c in codes if c.startswith("ProvisioningState/")), None)
    provisioning = provisioning or f"ProvisioningState/{str(props.get('provisioningState', 'creating')).lower()}"
    if provisioning in ("ProvisioningState/failed", "ProvisioningState/deleting") or power is None:
        return STATUS_MAP.get(provisioning, "pending")
    return STATUS_MAP.get(power, "pending")


class AzureDriver:
    name = PROVIDER

    def __init__(self, subscription_id: str, resource_group: str, location: str, daemon_id: str, *,
                 tenant_id: str | None = None, client_id: str | None = None, client_secret: str | None = None,
                 base_url: str | None = None, credential: Any = None,
                 client_kwargs: dict[str, Any] | None = None, orphan_grace_s: float = ORPHAN_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        principal = {"tenant_id": tenant_id, "client_id": client_id, "client_secret": client_secret}
        missing = [f"providers.azure.{k}" for k, v in principal.items() if not v]
        if credential is None and 0 < len(missing) < len(principal):
            raise ProviderAuthError(PROVIDER, "configure", f"incomplete service principal: set {', '.join(missing)} "
                                    "(or none of tenant_id, client_id, client_secret to use DefaultAzureCredential)")
        if not subscription_id:
            raise ProviderAuthError(PROVIDER, "configure", "no subscription: set providers.azure.subscription_id")
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.location = location
        self.daemon_id = daemon_id
        self.base_url = base_url or None
        self._principal = principal if not missing else None
        self._credential = credential
        self._owns_credential = credential is None
        self._client_kwargs = dict(client_kwargs or {})
        self._compute: Any = None
        self._network: Any = None
        self._resources: Any = None
        self._client_lock = asyncio.Lock()
        self._subnet_id: str | None = None
        self._setup_lock = asyncio.Lock()
        self.orphan_grace_s = orphan_grace_s
        self._clock = clock
        self._creating: set[str] = set()  # instance ids with a create in flight: their NIC and IP are no orphans
        self._orphans_seen: dict[str, float] = {}  # instance id -> when first seen with resources but no VM

    # ---- clients ----

    async def _clients(self) -> tuple[Any, Any]:
        async with self._client_lock:
            if self._compute is None:
                from azure.mgmt.compute.aio import ComputeManagementClient
                from azure.mgmt.network.aio import NetworkManagementClient
                from azure.mgmt.resource.resources.aio import ResourceManagementClient

                if self._credential is None:
                    from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential

                    p = self._principal
                    self._credential = (ClientSecretCredential(str(p["tenant_id"]), str(p["client_id"]),
                                                               str(p["client_secret"]))
                                        if p else DefaultAzureCredential())
                args = (self._credential, self.subscription_id)
                kwargs = dict(self._client_kwargs)
                if self.base_url:
                    kwargs["base_url"] = self.base_url
                self._compute = ComputeManagementClient(*args, **kwargs)
                self._network = NetworkManagementClient(*args, **kwargs)
                self._resources = ResourceManagementClient(*args, **kwargs)
            return self._compute, self._network

    async def close(self) -> None:
        for client in (self._compute, self._network, self._resources):
            if client is not None:
                await client.close()
        self._compute = self._network = self._resources = None
        if self._owns_credential and self._credential is not None:
            await self._credential.close()
            self._credential = None
        self._subnet_id = None

    # ---- names and tags ----

    @staticmethod
    def names(instance_id: str) -> tuple[str, str, str]:
        """(VM, NIC, public IP) names: deterministic, so a repeated create finds what it made."""
        base = "ct-" + re.sub(r"[^A-Za-z0-9-]", "-", instance_id)[: NAME_MAX - 7]
        return f"{base}-vm", f"{base}-nic", f"{base}-ip"

    @staticmethod
    def disk_name(instance_id: str) -> str:
        """The OS disk's name (Azure would make up one with a random part)."""
        return AzureDriver.names(instance_id)[0].removesuffix("-vm") + "-osdisk"

    def _tags(self, instance_id: str | None = None) -> dict[str, str]:
        tags = {TAG_DAEMON: self.daemon_id}
        if instance_id is not None:
            tags[TAG_INSTANCE] = instance_id
        return tags

    # ---- one-time set-up: resource group, network security group, virtual network ----

    async def _prepare(self) -> str:
        async with self._setup_lock:
            if self._subnet_id is None:
                _, network = await self._clients()
                try:
                    self._subnet_id = await self._shared_network(network)
                except Exception as exc:
                    raise classify(exc, "prepare") from exc
            return self._subnet_id

    async def _shared_network(self, network: Any) -> str:
        rg, tags = self.resource_group, self._tags()
        try:
            await self._resources.resource_groups.get(rg)
        except Exception as exc:
            if not _not_found(exc):
                raise
            await self._resources.resource_groups.create_or_update(rg, {"location": self.location, "tags": tags})
        vnet_name, nsg_name = f"ct-{self.daemon_id}-vnet", f"ct-{self.daemon_id}-nsg"
        try:
            vnet = await network.virtual_networks.get(rg, vnet_name)
        except Exception as exc:
            if not _not_found(exc):
                raise
            # Standard public IPs are closed by default: SSH (the bootstrap) needs an explicit allow rule.
            nsg = await (await network.network_security_groups.begin_create_or_update(rg, nsg_name, {
                "location": self.location, "tags": tags, "properties": {"securityRules": [{
                    "name": "ssh", "properties": {
                        "protocol": "Tcp", "direction": "Inbound", "access": "Allow",
                        "priority": SSH_RULE_PRIORITY, "sourceAddressPrefix": "*", "sourcePortRange": "*",
                        "destinationAddressPrefix": "*", "destinationPortRange": "22"}}]}})).result()
            vnet = await (await network.virtual_networks.begin_create_or_update(rg, vnet_name, {
                "location": self.location, "tags": tags, "properties": {
                    "addressSpace": {"addressPrefixes": [VNET_PREFIX]},
                    "subnets": [{"name": SUBNET_NAME, "properties": {
                        "addressPrefix": VNET_PREFIX, "networkSecurityGroup": {"id": nsg["id"]}}}]}})).result()
        return f"{vnet['id']}/subnets/{SUBNET_NAME}"

    # ---- the driver contract ----

    async def create(self, req: CreateRequest) -> CloudVm:
        self._creating.add(req.instance_id)
        try:
            return await self._create(req)
        finally:
            self._creating.discard(req.instance_id)

    async def _create(self, req: CreateRequest) -> CloudVm:
        found = await self._find(req.instance_id)
        if found is not None:
            vm, address = found
            if str(_props(vm).get("provisioningState", "")).lower() != "failed":
                return self._vm(vm, address, req.instance_id)  # idempotent: this instance id was launched
            await self.delete(req.instance_id)  # a failed VM left by an earlier try: replace it
        image = self._image(req)
        location, zones = self._placement(req)
        subnet_id = await self._prepare()
        compute, network = await self._clients()
        vm_name, nic_name, ip_name = self.names(req.instance_id)
        rg, tags = self.resource_group, self._tags(req.instance_id)
        try:
            ip = await (await network.public_ip_addresses.begin_create_or_update(rg, ip_name, {
                "location": location, "tags": tags, "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Static", "publicIPAddressVersion": "IPv4"}})).result()
            nic = await (await network.network_interfaces.begin_create_or_update(rg, nic_name, {
                "location": location, "tags": tags, "properties": {"ipConfigurations": [{
                    "name": "primary", "properties": {
                        "subnet": {"id": subnet_id}, "privateIPAllocationMethod": "Dynamic",
                        "publicIPAddress": {"id": ip["id"]}}}]}})).result()
            body = self._vm_body(req, nic["id"], image, location, zones, tags)
            vm = await (await compute.virtual_machines.begin_create_or_update(rg, vm_name, body)).result()
        except Exception as exc:
            err = classify(exc, "launch")
            await self._cleanup(req.instance_id, err)
            raise err from exc
        await self._tag_disk(compute, req.instance_id, tags)
        log.info("azure_vm_created", instance=req.instance_id, vm=vm_name, size=req.machine_type, spot=req.spot)
        return self._vm(vm, _props(ip).get("ipAddress"), req.instance_id)

    async def _tag_disk(self, compute: Any, instance_id: str, tags: dict[str, str]) -> None:
        """The OS disk gets no tags from its VM: tag it, so that list() finds it if it is ever left alone."""
        try:
            await (await compute.disks.begin_update(self.resource_group, self.disk_name(instance_id),
                                                    {"tags": tags})).result()
        except Exception as exc:
            # The VM deletes the disk with itself (deleteOption Delete); the tag only matters without one.
            log.warning("azure_disk_tag_failed", instance=instance_id, error=str(classify(exc, "tag")))

    def _vm_body(self, req: CreateRequest, nic_id: str, image: dict[str, str], location: str,
                 zones: list[str] | None, tags: dict[str, str]) -> dict[str, Any]:
        vm_name, _, _ = self.names(req.instance_id)
        props: dict[str, Any] = {
            "hardwareProfile": {"vmSize": req.machine_type},
            "storageProfile": {"imageReference": image, "osDisk": {
                "name": self.disk_name(req.instance_id), "createOption": "FromImage", "deleteOption": "Delete",
                "managedDisk": {"storageAccountType": "StandardSSD_LRS"}}},
            "osProfile": {
                "computerName": vm_name.removesuffix("-vm")[:NAME_MAX], "adminUsername": req.ssh_user,
                "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [{
                    "path": f"/home/{req.ssh_user}/.ssh/authorized_keys", "keyData": req.ssh_public_key}]}}},
            "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {"primary": True}}]},
            "priority": "Regular",
        }
        if req.spot:
            # Delete on eviction (nothing to restart) and pay up to the on-demand price (-1): an
            # eviction then only ever comes from capacity, never from price.
            props.update(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
        body: dict[str, Any] = {"location": location, "tags": tags, "properties": props}
        if zones:
            body["zones"] = zones
        return body

    def _image(self, req: CreateRequest) -> dict[str, str]:
        if not req.image:
            if req.arch not in DEFAULT_IMAGES:
                raise InvalidRequest(PROVIDER, "launch", f"no default image for architecture {req.arch!r}: set "
                                     "providers.azure.image")
            publisher, offer, sku, version = DEFAULT_IMAGES[req.arch]
        elif req.image.startswith("/"):
            return {"id": req.image}  # a managed image or gallery image version
        elif len(parts := req.image.split(":")) == 4:
            publisher, offer, sku, version = parts
        else:
            raise InvalidRequest(PROVIDER, "launch", f"image {req.image!r}: use publisher:offer:sku:version "
                                 "or a resource id")
        return {"publisher": publisher, "offer": offer, "sku": sku, "version": version}

    def _placement(self, req: CreateRequest) -> tuple[str, list[str] | None]:
        """(location, zones): `zone` is this driver's location, one of its zones ("1"), or empty."""
        if not req.zone or req.zone.lower() == self.location.lower():
            return self.location, None
        if req.zone.isdigit():
            return self.location, [req.zone]
        raise InvalidRequest(PROVIDER, "launch", f"zone {req.zone!r}: this driver serves {self.location} "
                             "(its network lives there); use its name or a zone number")

    async def _cleanup(self, instance_id: str, cause: ProviderError) -> None:
        try:
            await self.delete(instance_id)
        except ProviderError as exc:
            # The reconciler finds what is left by its tags; the create's own error matters more here.
            log.warning("azure_cleanup_failed", instance=instance_id, error=str(exc), cause=str(cause))

    def _vm(self, vm: Any, public_ip: str | None, instance_id: str | None = None) -> CloudVm:
        tags = {str(k): str(v) for k, v in (vm.get("tags") or {}).items()}
        zones = vm.get("zones") or []
        return CloudVm(
            instance_id=instance_id or tags.get(TAG_INSTANCE, ""),
            cloud_id=str(vm.get("id") or vm.get("name") or ""),
            state=vm_state(vm),
            public_ip=public_ip,
            zone=str(zones[0]) if zones else (vm.get("location") or self.location),
            spot=str(_props(vm).get("priority", "")).lower() == "spot",
            tags=tags,
        )

    async def _public_ip(self, network: Any, ip_name: str) -> str | None:
        try:
            ip = await network.public_ip_addresses.get(self.resource_group, ip_name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise
        address = _props(ip).get("ipAddress")
        return str(address) if address else None

    async def _find(self, instance_id: str) -> tuple[Any, str | None] | None:
        """The VM (with its instance view) and its public address, or None."""
        compute, network = await self._clients()
        vm_name, _, ip_name = self.names(instance_id)
        try:
            vm = await compute.virtual_machines.get(self.resource_group, vm_name, expand="instanceView")
            address = await self._public_ip(network, ip_name)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise classify(exc, "describe") from exc
        return vm, address

    async def get(self, instance_id: str) -> CloudVm | None:
        found = await self._find(instance_id)
        return None if found is None else self._vm(found[0], found[1], instance_id)

    async def list(self) -> list[CloudVm]:
        compute, network = await self._clients()
        rg = self.resource_group
        try:
            ours = [vm async for vm in compute.virtual_machines.list(rg)
                    if (vm.get("tags") or {}).get(TAG_DAEMON) == self.daemon_id]
            ips = [ip async for ip in network.public_ip_addresses.list(rg)]
            addresses = {ip.get("name"): _props(ip).get("ipAddress") for ip in ips}
            # A list carries no instance view (Azure allows it only with a scale-set filter).
            views = await asyncio.gather(*(compute.virtual_machines.get(rg, vm["name"], expand="instanceView")
                                           for vm in ours), return_exceptions=True)
        except Exception as exc:
            if _not_found(exc):
                return []  # no resource group yet: nothing of ours
            raise classify(exc, "list") from exc
        await self._sweep_orphans(compute, network, {self._tag(vm, TAG_INSTANCE) for vm in ours}, ips)
        vms = []
        for vm, view in zip(ours, views, strict=True):
            if isinstance(view, BaseException):
                if _not_found(view):
                    continue  # deleted between the list and the get
                raise classify(view, "list") from view
            instance_id = str((vm.get("tags") or {}).get(TAG_INSTANCE, ""))
            vms.append(self._vm(view, addresses.get(self.names(instance_id)[2]), instance_id or None))
        return vms

    def _tag(self, resource: Any, key: str) -> str:
        return str((resource.get("tags") or {}).get(key, ""))

    async def _sweep_orphans(self, compute: Any, network: Any, with_vm: set[str], ips: builtins.list[Any]) -> None:
        """Delete our NICs, IPs and disks whose instance has no VM (see Orphans above). A failure
        here only logs: the VMs listed matter more, and the next sync tries again."""
        rg = self.resource_group
        try:
            nics = [nic async for nic in network.network_interfaces.list(rg)]
            disks = [disk async for disk in compute.disks.list_by_resource_group(rg)]
        except Exception as exc:
            log.warning("azure_orphan_sweep_failed", error=str(classify(exc, "list")))
            return
        # In deletion order: a NIC holds its IP; the disk stands alone.
        leftovers: dict[str, list[tuple[Any, str]]] = {}
        for operations, resources in ((network.network_interfaces, nics), (network.public_ip_addresses, ips),
                                      (compute.disks, disks)):
            for resource in resources:
                instance_id = self._tag(resource, TAG_INSTANCE)
                if self._tag(resource, TAG_DAEMON) != self.daemon_id or not instance_id:
                    continue
                if instance_id not in with_vm and instance_id not in self._creating:
                    leftovers.setdefault(instance_id, []).append((operations, str(resource.get("name"))))
        now = self._clock()
        self._orphans_seen = {i: self._orphans_seen.get(i, now) for i in leftovers}
        for instance_id, found in leftovers.items():
            if now - self._orphans_seen[instance_id] < self.orphan_grace_s:
                continue
            try:
                for operations, name in found:
                    try:
                        await (await operations.begin_delete(rg, name)).result()
                    except Exception as exc:
                        if not _not_found(exc):
                            raise
            except Exception as exc:
                log.warning("azure_orphan_delete_failed", instance=instance_id, error=str(classify(exc, "terminate")))
                continue
            self._orphans_seen.pop(instance_id, None)
            log.warning("azure_orphans_deleted", instance=instance_id, resources=[name for _, name in found])

    async def delete(self, instance_id: str) -> None:
        compute, network = await self._clients()
        vm_name, nic_name, ip_name = self.names(instance_id)
        rg = self.resource_group
        # The order matters: a NIC cannot go while a VM holds it, nor an IP while a NIC does.
        steps = ((compute.virtual_machines, vm_name), (network.network_interfaces, nic_name),
                 (network.public_ip_addresses, ip_name), (compute.disks, self.disk_name(instance_id)))
        for operations, name in steps:
            try:
                await (await operations.begin_delete(rg, name)).result()
            except Exception as exc:
                if not _not_found(exc):
                    raise classify(exc, "terminate") from exc
        log.info("azure_vm_deleted", instance=instance_id, vm=vm_name)


    # ---- `cloudtaskctl check`: reads only, makes nothing ----

    async def check(self, *, machine_types: tuple[str, ...], max_instances: int, cpus: int, spot: bool = True,
                    image: str | None = None, cheap: bool = False) -> builtins.list[CheckResult]:
        """Credentials (the resource group), then (unless cheap) the location and the sizes this
        subscription may deploy there (Resource SKUs), the image, and the regional vCPU quotas
        (Compute usages): each a line with what to fix. A missing resource group is no failure:
        the first launch makes it."""
        rg, location = self.resource_group, self.location
        try:
            await self._clients()
            await self._resources.resource_groups.get(rg)
            out = [CheckResult(PROVIDER, "credentials", "ok", f"subscription {self.subscription_id}, resource group "
                               f"{rg}")]
        except Exception as exc:
            if not _not_found(exc):
                return [_check_fail("credentials", exc, "set providers.azure.tenant_id, client_id and client_secret, "
                                    "or make DefaultAzureCredential work (AZURE_* variables, a managed identity, `az "
                                    "login`); check providers.azure.subscription_id and that the identity has a role "
                                    "(Contributor) on it")]
            out = [CheckResult(PROVIDER, "credentials", "ok", f"subscription {self.subscription_id}; resource group "
                               f"{rg} is made at the first launch")]
        if cheap:
            return out
        families: dict[str, str] = {}  # machine type -> its vCPU quota's name (standardDSv5Family)
        try:
            skus = await self._vm_skus()
        except Exception as exc:
            out.append(_check_fail(f"location {location}", exc, "try again, or allow Microsoft.Compute/skus/read"))
            skus = None
        if skus is not None:
            out += self._check_sizes(skus, machine_types, families)
        out.append(await self._check_image(machine_types[0] if machine_types else "", spot, image))
        out += await self._check_quota(max_instances * cpus, spot, families)
        return out

    async def _vm_skus(self) -> dict[str, dict[str, Any]]:
        """The VM sizes of the Resource SKUs API in this location, by lowercase name."""
        compute, _ = await self._clients()
        found = {}
        async for raw in compute.resource_skus.list(filter=f"location eq '{self.location}'"):
            sku = dict(raw)
            if str(sku.get("resourceType", "")).lower() == "virtualmachines":
                found[str(sku.get("name", "")).lower()] = sku
        return found

    def _check_sizes(self, skus: dict[str, dict[str, Any]], machine_types: tuple[str, ...],
                     families: dict[str, str]) -> builtins.list[CheckResult]:

        location = self.location
        if not skus:
            return [CheckResult(PROVIDER, f"location {location}", "FAIL", "no VM sizes there for this subscription: "
                                "set providers.azure.location to a location name (`az account list-locations -o "
                                "table`, the Name column: eastus, westeurope)")]
        out = [CheckResult(PROVIDER, f"location {location}", "ok", f"{len(skus)} VM sizes")]
        for t in dict.fromkeys(machine_types):
            what = f"machine type {t}"
            sku = skus.get(t.lower())
            if sku is None:
                out.append(CheckResult(PROVIDER, what, "FAIL", f"not offered in {location}: fix providers.azure."
                                       f"machine_type / machine_types (`az vm list-skus -l {location} --resource-type "
                                       "virtualMachines -o table`)"))
                continue
            parsed = parse_sku(t, sku, location)
            if isinstance(parsed, str):
                out.append(CheckResult(PROVIDER, what, "FAIL", f"{parsed}: this subscription may not deploy it there; "
                                       "pick another size or location, or ask Azure support to lift the restriction"))
                continue
            if sku.get("family"):
                families[t] = str(sku["family"])
            out.append(CheckResult(PROVIDER, what, "ok", f"{parsed.cpus} vCPUs, {parsed.memory_gb:g} GB"))
        return out

    async def _check_image(self, machine_type: str, spot: bool, image: str | None) -> CheckResult:
        """The marketplace image a create would ask for (the create's own reading of providers.azure.image)."""
        location = self.location
        try:
            ref = self._image(CreateRequest("check", self.daemon_id, machine_type, location, spot, "check", "",
                                            image or None))
        except InvalidRequest as err:
            return CheckResult(PROVIDER, f"image {image}", "FAIL", str(err))
        if "id" in ref:
            return CheckResult(PROVIDER, f"image {ref['id']}", "warn", "a resource id: not checked here, make sure "
                               f"it exists and is replicated to {location}")
        urn = ":".join((ref["publisher"], ref["offer"], ref["sku"], ref["version"]))
        compute, _ = await self._clients()
        try:
            if ref["version"].lower() == "latest":
                found = await compute.virtual_machine_images.list(location, ref["publisher"], ref["offer"], ref["sku"],
                                                                  top=1, orderby="name desc")
                version = str(found[0]["name"]) if found else ""
            else:
                got = await compute.virtual_machine_images.get(location, ref["publisher"], ref["offer"], ref["sku"],
                                                               ref["version"])
                version = str(got["name"])
        except Exception as exc:
            if not _not_found(exc):
                return _check_fail(f"image {urn}", exc, "try again, or allow Microsoft.Compute/locations/publishers/"
                                   "read")
            version = ""
        if not version:
            return CheckResult(PROVIDER, f"image {urn}", "FAIL", f"no such image in {location}: set "
                               "providers.azure.image to publisher:offer:sku:version of one there (`az vm image list "
                               f"-l {location} -p PUBLISHER --all -o table`)")
        return CheckResult(PROVIDER, f"image {urn}", "ok", f"version {version}")

    async def _check_quota(self, vcpus: int, spot: bool, families: dict[str, str]) -> builtins.list[CheckResult]:
        """Spot VMs count against lowPriorityCores only; regular ones against cores and their
        family's quota. Each against max_instances x cpus."""
        compute, _ = await self._clients()
        location = self.location
        try:
            usages = {str((u.get("name") or {}).get("value", "")).lower(): u
                      async for u in compute.usage.list(location)}
        except Exception as exc:
            return [CheckResult(PROVIDER, "quota", "warn", f"could not read the vCPU quotas ({classify(exc, 'check')})"
                                f": make sure {vcpus} vCPUs (max_instances x cpus) may run in {location}")]
        names = [SPOT_QUOTA] if spot else [CORES_QUOTA, *dict.fromkeys(families.values())]
        out = []
        for name in names:
            what = f"quota {name}"
            u = usages.get(name.lower())
            if u is None:
                out.append(CheckResult(PROVIDER, what, "warn", f"{location} reports no {name} quota: make sure {vcpus}"
                                       " vCPUs (max_instances x cpus) may run there"))
                continue
            out.append(quota_result(PROVIDER, what, float(u.get("limit") or 0), float(u.get("currentValue") or 0),
                                    vcpus, where=f" in {location}", fix="request more (portal: Quotas > Compute), or "
                                    "lower providers.azure.max_instances"))
        return out


CORES_QUOTA = "cores"  # Total Regional vCPUs (regular VMs; each family has its own quota besides)
SPOT_QUOTA = "lowPriorityCores"  # Total Regional Low-priority (spot) vCPUs: the only one spot VMs count against


def _check_fail(what: str, exc: BaseException, fix: str) -> CheckResult:
    return CheckResult(PROVIDER, what, "FAIL", f"{classify(exc, 'check')}; {fix}")


# ---- the Resource SKUs API: what a size is, and whether this subscription may deploy it ----

# The SKU capability `CpuArchitectureType`: "x64" for Intel and AMD sizes, "Arm64" for Ampere/Cobalt ones.
ARCHES = {"x64": X86_64, "arm64": ARM64}


@dataclass(frozen=True, slots=True)
class Sku:
    """One VM size in one location, as the Resource SKUs API describes it for this subscription."""

    name: str
    cpus: int
    memory_gb: float
    gpus: int
    zones: frozenset[str]  # usable zone numbers ("1".."3") in the location
    spot_capable: bool
    arch: str = ""  # X86_64 or ARM64; "" when the SKU does not say


def parse_sku(name: str, sku: Mapping[str, Any], location: str) -> Sku | str:
    """The SKU, or why this subscription cannot deploy it in `location`."""
    zones: set[str] = set()
    for info in sku.get("locationInfo") or []:
        if str(info.get("location", "")).lower() == location.lower():
            zones.update(str(z) for z in info.get("zones") or [])
    for r in sku.get("restrictions") or []:
        info = r.get("restrictionInfo") or {}
        places = [str(p).lower() for p in (info.get("locations") or r.get("values") or [])]
        if location.lower() not in places:
            continue
        kind = str(r.get("type", ""))
        if kind == "Location":
            return f"{r.get('reasonCode') or 'restricted'} in {location}"
        if kind == "Zone":
            zones.difference_update(str(z) for z in info.get("zones") or [])
    caps = {str(c.get("name", "")): str(c.get("value", "")) for c in sku.get("capabilities") or []}
    # Constrained-core sizes (E4-2s_v5) bill for vCPUs but run only vCPUsAvailable: slots count the latter.
    cpus = int(float(caps.get("vCPUsAvailable") or caps.get("vCPUs") or 0))
    return Sku(name=name, cpus=cpus, memory_gb=float(caps.get("MemoryGB") or 0), gpus=int(float(caps.get("GPUs") or 0)),
               zones=frozenset(zones), spot_capable=caps.get("LowPriorityCapable", "True").lower() != "false",
               arch=ARCHES.get(caps.get("CpuArchitectureType", "").lower(), ""))
