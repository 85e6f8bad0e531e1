"""A small Azure Resource Manager stand-in (aiohttp) for the Azure driver's tests.

It stores any resource by its path (case-insensitive, as ARM is) and answers the way ARM does:
PUT -> 201 + `Azure-AsyncOperation`, DELETE -> 202 + `Location`/`Azure-AsyncOperation` (204 when
absent), each operation InProgress on its first poll and Succeeded (or Failed) on the next; GET -> the
resource, or a 404 with an ARM error body; a path with an odd number of segments lists its children.
VMs get an instance view (`?$expand=instanceView` or `/instanceView`). A VM's PUT makes its managed
OS disk as Azure does (`Microsoft.Compute/disks/<osDisk.name>`, attached, without the VM's tags), and
its DELETE takes the disk along when `deleteOption` is Delete. PATCH merges (tags replaced whole).

`stall_vm_creates()`: the next VM PUT arrives and waits; `release_vm_create(accept)` lets it go on, or
answers it without making anything, as a PUT whose sender died before ARM took it (the daemon
crashed between its NIC and its VM).

Failures a test can ask for on the next VM create: an allocation failure (a failed LRO that leaves
the VM behind in the Failed state, as Azure does) or a quota refusal (409 OperationNotAllowed).

Resource SKUs (`GET /subscriptions/{s}/providers/Microsoft.Compute/skus`): the `skus` a test sets,
narrowed by a `location eq '...'` filter the way Azure narrows them (`locations` and `locationInfo`
keep only that location), in pages of `sku_page_size` linked by `nextLink`, or `sku_error` instead.

Compute usages (`GET /subscriptions/{s}/providers/Microsoft.Compute/locations/{l}/usages`): the
`usages` of that location (USAGES by default), as `{"value": [{"name": {"value", "localizedValue"},
"currentValue", "limit", "unit"}]}`. Marketplace images (`.../locations/{l}/publishers/{p}/
artifacttypes/vmimage/offers/{o}/skus/{s}/versions[/{v}]`) from `images` ((publisher, offer, sku)
-> versions, the same in every location): a list honours `$orderby=name desc` and `$top`; an
unknown image is a 404 `NotFound` "Artifact: VMImage was not found.", as Azure answers it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.serving import serve

VM_TYPE = "microsoft.compute/virtualmachines"
DISK_TYPE = "microsoft.compute/disks"
SKUS_SUFFIX = "/providers/microsoft.compute/skus"
USAGES = re.compile(r"^/subscriptions/[^/]+/providers/microsoft\.compute/locations/(?P<location>[^/]+)/usages$")
IMAGE_VERSIONS = re.compile(r"^/subscriptions/[^/]+/providers/microsoft\.compute/locations/(?P<location>[^/]+)/"
                            r"publishers/(?P<publisher>[^/]+)/artifacttypes/vmimage/offers/(?P<offer>[^/]+)/"
                            r"skus/(?P<sku>[^/]+)/versions(?:/(?P<version>[^/]+))?$")


def usage(name: str, localized: str, current: int, limit: int) -> dict[str, Any]:
    """One Compute usage as `Usage - List` answers it."""
    return {"unit": "Count", "currentValue": current, "limit": limit,
            "name": {"value": name, "localizedValue": localized}}


# A pay-as-you-go subscription's defaults in a big region (a few of the many usages Azure lists).
USAGES_DEFAULT = [
    usage("availabilitySets", "Availability Sets", 0, 2500),
    usage("cores", "Total Regional vCPUs", 4, 20),
    usage("virtualMachines", "Virtual Machines", 2, 25000),
    usage("standardDSv5Family", "Standard DSv5 Family vCPUs", 4, 10),
    usage("standardFSv2Family", "Standard FSv2 Family vCPUs", 0, 10),
    usage("lowPriorityCores", "Total Regional Low-priority vCPUs", 0, 20),
]
IMAGES = {
    ("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"): ["22.04.202401100", "22.04.202409270"],
    ("canonical", "ubuntu-24_04-lts", "server"): ["24.04.202409120", "24.04.202410040"],
    ("canonical", "ubuntu-24_04-lts", "server-arm64"): ["24.04.202410040"],
}


@dataclass
class _Operation:
    resource: str  # path key
    method: str
    error: dict[str, str] | None = None
    polls: int = 0


@dataclass
class ArmStandin:
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    fail_next_vm: tuple[str, str] | None = None  # ("allocation" | "quota", error code)
    power: dict[str, str] = field(default_factory=dict)  # VM path (lower) -> power state; default running
    skus: list[dict[str, Any]] = field(default_factory=list)  # the Resource SKUs API's answer, all locations
    sku_page_size: int = 0  # 0: one page
    sku_error: tuple[int, str] | None = None  # (HTTP status, ARM error code) for every SKU list
    sku_filters: list[str] = field(default_factory=list)  # the `$filter` of each first-page SKU request
    usages: dict[str, list[dict[str, Any]]] = field(  # location -> Compute usages
        default_factory=lambda: {"eastus": [dict(u, name=dict(u["name"])) for u in USAGES_DEFAULT]})
    images: dict[tuple[str, str, str], list[str]] = field(  # (publisher, offer, sku), lowercase -> versions
        default_factory=lambda: {k: list(v) for k, v in IMAGES.items()})
    url: str = ""
    vm_create_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _stall_vm: bool = False
    _vm_gate: asyncio.Event = field(default_factory=asyncio.Event)
    _vm_accept: bool = True
    _ops: dict[str, _Operation] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.url = await serve(app)

    def stall_vm_creates(self) -> None:
        self._stall_vm, self._vm_accept = True, True
        self.vm_create_arrived.clear()
        self._vm_gate.clear()

    def release_vm_create(self, accept: bool) -> None:
        self._stall_vm, self._vm_accept = False, accept
        self._vm_gate.set()

    async def stop(self) -> None:
        self.release_vm_create(False)
        if self._runner is not None:
            await self._runner.cleanup()

    def get(self, path: str) -> dict[str, Any] | None:
        return self.resources.get(path.rstrip("/").lower())

    def put(self, path: str, body: dict[str, Any], provisioning_state: str = "Succeeded") -> dict[str, Any]:
        key = path.rstrip("/").lower()
        resource = {**body, "id": path.rstrip("/"), "name": path.rstrip("/").rsplit("/", 1)[-1]}
        resource.setdefault("properties", {})["provisioningState"] = provisioning_state
        if "/publicipaddresses/" in key:
            resource["properties"].setdefault("ipAddress", f"203.0.113.{len(self.resources) % 250 + 1}")
        for subnet in resource["properties"].get("subnets", []):
            subnet["id"] = f"{resource['id']}/subnets/{subnet['name']}"
        self.resources[key] = resource
        return resource

    def of_type(self, type_suffix: str) -> list[dict[str, Any]]:
        return [r for k, r in self.resources.items() if k.rsplit("/", 2)[-2] == type_suffix.lower()]

    # ---- HTTP ----

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    def _operation(self, resource: str, method: str, error: dict[str, str] | None = None) -> dict[str, str]:
        op_id = uuid.uuid4().hex
        self._ops[op_id] = _Operation(resource, method, error)
        op_url = f"{self.url}/operations/{op_id}?api-version=2024-01-01"
        return {"Azure-AsyncOperation": op_url, "Location": op_url}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        key = path.lower()
        self.requests.append((request.method, path))
        if key.startswith("/operations/"):
            return self._poll(key.rsplit("/", 1)[-1])
        if request.method == "PUT":
            return await self._put(request, path)
        if request.method == "PATCH":
            if key not in self.resources:
                return self._error(404, "ResourceNotFound", f"The Resource '{key}' was not found.")
            body = await request.json()
            resource = self.resources[key]
            resource.update({k: v for k, v in body.items() if k != "properties"})
            resource["properties"].update(body.get("properties") or {})
            return web.json_response(resource, status=200, headers=self._operation(key, "PATCH"))
        if request.method == "DELETE":
            if key not in self.resources:
                return web.Response(status=204)
            return web.Response(status=202, headers=self._operation(key, "DELETE"))
        if request.method == "GET" and key.endswith(SKUS_SUFFIX):
            return self._skus(request, path)
        if request.method == "GET" and (match := USAGES.match(key)):
            return web.json_response({"value": self.usages.get(match["location"], [])})
        if request.method == "GET" and (match := IMAGE_VERSIONS.match(key)):
            return self._image_versions(request, path, match)
        if request.method in ("GET", "HEAD"):
            return self._get(request, key)
        return self._error(405, "MethodNotAllowed", f"{request.method} is not supported here")

    async def _put(self, request: web.Request, path: str) -> web.Response:
        body = await request.json()
        key = path.lower()
        failure = None
        is_vm = key.rsplit("/", 2)[-2] == VM_TYPE.rsplit("/", 1)[-1]
        if is_vm and self._stall_vm:
            self.vm_create_arrived.set()
            await self._vm_gate.wait()
            if not self._vm_accept:
                return self._error(503, "ServiceUnavailable", "the request never reached ARM")
        if is_vm and self.fail_next_vm is not None:
            failure, self.fail_next_vm = self.fail_next_vm, None
        if failure is not None and failure[0] == "quota":
            return self._error(409, failure[1], "Operation could not be completed as it results in exceeding "
                                                "approved standardDSv5Family Cores quota.")
        resource = self.put(path, body, provisioning_state="Creating")
        if is_vm:
            self._os_disk(resource)
        error = None
        if failure is not None:
            error = {"code": failure[1], "message": "Allocation failed. We do not have sufficient capacity "
                                                    "for the requested VM size in this region."}
        return web.json_response(resource, status=201, headers=self._operation(key, "PUT", error))

    def _os_disk(self, vm: dict[str, Any]) -> None:
        os_disk = vm["properties"].setdefault("storageProfile", {}).setdefault("osDisk", {})
        name = os_disk.setdefault("name", f"{vm['name']}_OsDisk_1_{uuid.uuid4().hex}")
        rg_path = vm["id"].split("/providers/", 1)[0]
        disk = self.put(f"{rg_path}/providers/Microsoft.Compute/disks/{name}", {
            "location": vm.get("location"), "managedBy": vm["id"], "sku": {"name": "StandardSSD_LRS"},
            "properties": {"osType": "Linux", "diskState": "Attached", "timeCreated": "2024-01-01T00:00:00Z"}})
        os_disk.setdefault("managedDisk", {})["id"] = disk["id"]

    def _poll(self, op_id: str) -> web.Response:
        op = self._ops.get(op_id)
        if op is None:
            return self._error(404, "NotFound", f"no operation {op_id}")
        op.polls += 1
        if op.polls == 1:
            return web.json_response({"status": "InProgress"})
        resource = self.resources.get(op.resource)
        if op.method == "DELETE":
            gone = self.resources.pop(op.resource, None)
            os_disk = ((gone or {}).get("properties") or {}).get("storageProfile", {}).get("osDisk", {})
            if os_disk.get("deleteOption") == "Delete" and os_disk.get("managedDisk", {}).get("id"):
                self.resources.pop(os_disk["managedDisk"]["id"].lower(), None)
        elif resource is not None:
            resource["properties"]["provisioningState"] = "Failed" if op.error else "Succeeded"
        if op.error:
            return web.json_response({"status": "Failed", "error": op.error})
        return web.json_response({"status": "Succeeded"})

    def _get(self, request: web.Request, key: str) -> web.Response:
        if key.endswith("/instanceview"):
            vm = self.resources.get(key.rsplit("/", 1)[0])
            if vm is None:
                return self._error(404, "ResourceNotFound", f"{key} was not found")
            return web.json_response(self._instance_view(vm))
        if key in self.resources:
            resource = self.resources[key]
            if request.query.get("$expand", "").lower() == "instanceview" and VM_TYPE in key:
                resource = {**resource, "properties": {**resource["properties"],
                                                        "instanceView": self._instance_view(resource)}}
            return web.json_response(resource)
        if len(key.strip("/").split("/")) % 2 == 1:  # a collection: list its direct children
            children = [r for k, r in self.resources.items() if k.rsplit("/", 1)[0] == key]
            return web.json_response({"value": children})
        return self._error(404, "ResourceNotFound", f"The Resource '{key}' was not found.")

    def _skus(self, request: web.Request, path: str) -> web.Response:
        if self.sku_error is not None:
            status, code = self.sku_error
            return self._error(status, code, f"refused: {code}")
        skip = int(request.query.get("$skiptoken", "0"))
        query = request.query.get("$filter", "")
        if not skip:
            self.sku_filters.append(query)
        skus = self.skus
        if query:
            match = re.fullmatch(r"location eq '([^']*)'", query.strip())
            if match is None:
                return self._error(400, "InvalidFilter", f"only a location filter is supported, not {query!r}")
            where = match.group(1).lower()
            skus = [{**sku, "locations": [where], "locationInfo": [
                        i for i in sku.get("locationInfo", []) if i.get("location", "").lower() == where]}
                    for sku in skus if where in (loc.lower() for loc in sku.get("locations", []))]
        size = self.sku_page_size or max(len(skus), 1)
        body: dict[str, Any] = {"value": skus[skip:skip + size]}
        if skip + size < len(skus):
            params = {**request.query, "$skiptoken": str(skip + size)}
            body["nextLink"] = str(request.url.with_path(path).with_query(params))
        return web.json_response(body)

    def _image_versions(self, request: web.Request, path: str, match: re.Match[str]) -> web.Response:
        versions = self.images.get((match["publisher"], match["offer"], match["sku"]))
        version = match["version"]
        if not versions or (version is not None and version not in versions):
            return self._error(404, "NotFound", "Artifact: VMImage was not found.")
        location = match["location"]
        if version is not None:
            return web.json_response({"location": location, "name": version, "id": path, "properties": {
                "osImage": {"operatingSystem": "Linux"}, "hyperVGeneration": "V2",
                "architecture": "Arm64" if "arm64" in match["sku"] else "x64"}})
        found = sorted(versions, reverse=request.query.get("$orderby", "").lower() == "name desc")
        if "$top" in request.query:
            found = found[:int(request.query["$top"])]
        return web.json_response([{"location": location, "name": v, "id": f"{path}/{v}"} for v in found])

    def _instance_view(self, vm: dict[str, Any]) -> dict[str, Any]:
        state = vm["properties"].get("provisioningState", "Succeeded")
        statuses = [{"code": f"ProvisioningState/{state.lower()}"}]
        if state == "Succeeded":
            statuses.append({"code": f"PowerState/{self.power.get(vm['id'].lower(), 'running')}"})
        return {"statuses": statuses}
