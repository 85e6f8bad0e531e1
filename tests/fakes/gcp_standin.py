"""A small Compute Engine stand-in (aiohttp) for the GCP driver's tests.

It serves the REST paths google-cloud-compute's InstancesClient, ZoneOperationsClient and
MachineTypesClient call (`/compute/v1/projects/{p}/zones/{z}/instances[...]`,
`.../aggregated/instances`, `.../operations/{op}[/wait]`, `.../machineTypes[/{name}]` from a small
fixture), keeps instances in memory, and answers as GCE does: a mutation
returns an Operation that is PENDING, then RUNNING, then DONE on the next polls; an instance is
PROVISIONING, then STAGING, then RUNNING on the next gets; each one gets a natIP; a deleted
instance is STOPPING until its operation is DONE; errors are Google's JSON error bodies. A boot
image whose architecture (IMAGE_ARCHES: the Ubuntu families) the machine type's does not match is
refused as GCE refuses it (a type without `architecture` is x86, as every non-Arm series is).

It runs on its own thread and event loop, so that a driver that blocked the test's loop would be
caught (the stand-in would still answer, and the test would see no ticks) rather than deadlock.

Tests can:
- `fail_next(method, status, reason, count)`: the next calls of a method answer an HTTP error;
- `fail_operation_next(method, code, status)`: the next insert/bulkInsert is accepted, creates
  nothing, and its operation finishes DONE with `error.errors[{code}]` (a stock-out, a quota);
- `hold(method)`: the next call of a method waits until the test releases it;
- `publish_host_keys(name, {type: blob})`: guest attributes under `hostkeys/`;
- shape the VPC: `networks` (name -> Network), `add_network(...)`, `del networks[name]`; the
  project starts with the auto-mode `default` network and the four rules GCE makes with it
  (`default-allow-ssh` among them); `firewalls` holds every rule by name;
- set `machine_types` (zone -> machine type resources; MACHINE_TYPES by default);
- for `check`: `zones.get` answers for the zones of `machine_types`, `regions.get` with each
  region's `quotas` (region -> [{metric, limit, usage}], QUOTAS by default), `images.get` and
  `images.getFromFamily` from `images` ((project, name) -> Image; IMAGES by default: Ubuntu's);
- read `calls` (method, HTTP method, path, body) to assert what the client sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import re
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

P = "/compute/v1/projects/{project}"
Z = P + "/zones/{zone}"
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL = re.compile(r"^[a-z0-9_-]{0,63}$")
FILTER = re.compile(r'^\s*([A-Za-z0-9_.-]+)\s*(=|!=|eq|ne)\s*"?([^"]*?)"?\s*$')
HOLD_MAX_S = 10.0  # a held call goes on by itself after this (the test then sees it was not released)
REASONS = {400: "badRequest", 401: "required", 403: "forbidden", 404: "notFound", 409: "alreadyExists",
           412: "conditionNotMet", 429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}


def google_error(status: int, message: str, reason: str | None = None, domain: str = "global") -> dict[str, Any]:
    """An error body as the Compute API sends it."""
    return {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": domain, "reason": reason or REASONS.get(status, "")}]}}


def machine_type(name: str, cpus: int, memory_mb: int, *, shared: bool = False,
                 accelerators: tuple[tuple[str, int], ...] = (), architecture: str = "") -> dict[str, Any]:
    """A machine type resource as `machineTypes.get` answers it (the zone and links are added when served)."""
    body: dict[str, Any] = {"kind": "compute#machineType", "id": str(abs(hash(name)) % 10**12), "name": name,
                            "description": f"{cpus} vCPUs, {memory_mb / 1024:g} GB RAM", "guestCpus": cpus,
                            "memoryMb": memory_mb, "imageSpaceGb": 0, "maximumPersistentDisks": 128,
                            "maximumPersistentDisksSizeGb": "263168", "isSharedCpu": shared}
    if accelerators:
        body["accelerators"] = [{"guestAcceleratorType": t, "guestAcceleratorCount": n} for t, n in accelerators]
    if architecture:
        body["architecture"] = architecture
    return body


_E2_4 = machine_type("e2-standard-4", 4, 16384)
_N2_2 = machine_type("n2-standard-2", 2, 8192)
_N1_1 = machine_type("n1-standard-1", 1, 3840)
_E2_MEDIUM = machine_type("e2-medium", 2, 4096, shared=True)  # 2 vCPUs of which 1 in time: shared-core
_A2_1G = machine_type("a2-highgpu-1g", 12, 87040, accelerators=(("nvidia-tesla-a100", 1),))
_E2_CUSTOM = machine_type("e2-custom-4-8192", 4, 8192)
_T2A_2 = machine_type("t2a-standard-2", 2, 8192, architecture="ARM64")  # Ampere Altra
# Where each type is sold: n2-standard-2 not in us-central1-b, the A2 and N1 only in us-central1-a.
MACHINE_TYPES: dict[str, list[dict[str, Any]]] = {
    "us-central1-a": [_E2_4, _N2_2, _N1_1, _E2_MEDIUM, _A2_1G, _E2_CUSTOM, _T2A_2],
    "us-central1-b": [_E2_4, _E2_MEDIUM, _E2_CUSTOM],
    "europe-west1-b": [_E2_4, _N2_2, _E2_MEDIUM],
}


# The boot images whose architecture the stand-in knows (GCE knows every image's).
_FAMILY = "projects/ubuntu-os-cloud/global/images/family/"
IMAGE_ARCHES = {f"{_FAMILY}ubuntu-2404-lts-amd64": "X86_64", f"{_FAMILY}ubuntu-2404-lts-arm64": "ARM64",
                f"{_FAMILY}ubuntu-2204-lts": "X86_64", f"{_FAMILY}ubuntu-2204-lts-arm64": "ARM64"}


@dataclass
class Call:
    method: str  # the API method, e.g. "instances.bulkInsert"
    http_method: str
    path: str
    body: Any


@dataclass
class Gate:
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    released_by_test: bool = False

    def release(self) -> None:
        self.released_by_test = True
        self.released.set()


@dataclass
class Network:
    auto: bool = True  # auto mode: a subnet in every region, named after the network
    subnetworks: dict[str, set[str]] = field(default_factory=dict)  # region -> names (custom mode)


def quota(metric: str, limit: float, usage: float = 0.0) -> dict[str, Any]:
    """One entry of a Region resource's `quotas`, as `regions.get` answers it."""
    return {"metric": metric, "limit": limit, "usage": usage}


# A new project's quotas (a few of the dozens GCE lists), in each region of MACHINE_TYPES.
QUOTAS: dict[str, list[dict[str, Any]]] = {
    region: [quota("CPUS", 24.0), quota("N2_CPUS", 24.0), quota("C3_CPUS", 0.0), quota("PREEMPTIBLE_CPUS", 0.0),
             quota("INSTANCES", 24.0), quota("IN_USE_ADDRESSES", 8.0), quota("SSD_TOTAL_GB", 500.0)]
    for region in ("us-central1", "europe-west1")}


def image(name: str, family: str, *, architecture: str = "X86_64", deprecated: str = "",
          created: str = "2024-09-27T00:00:00.000-07:00") -> dict[str, Any]:
    """An Image resource as `images.get` answers it (the project's links are added when served)."""
    body: dict[str, Any] = {"kind": "compute#image", "id": str(abs(hash(name)) % 10**18), "name": name,
                            "family": family, "architecture": architecture, "status": "READY", "diskSizeGb": "10",
                            "sourceType": "RAW", "creationTimestamp": created}
    if deprecated:
        body["deprecated"] = {"state": deprecated}
    return body


IMAGES: dict[tuple[str, str], dict[str, Any]] = {("ubuntu-os-cloud", i["name"]): i for i in (
    image("ubuntu-2204-jammy-v20240927", "ubuntu-2204-lts"),
    image("ubuntu-2204-jammy-v20230114", "ubuntu-2204-lts", deprecated="DEPRECATED",
          created="2023-01-14T00:00:00.000-07:00"),
    image("ubuntu-2404-noble-amd64-v20241004", "ubuntu-2404-lts-amd64"),
    image("ubuntu-2404-noble-arm64-v20241004", "ubuntu-2404-lts-arm64", architecture="ARM64"),
)}


# What GCE answers when an instance's machine series and boot disk type do not go together, by series.
PD_TYPES = {"pd-standard", "pd-balanced", "pd-ssd", "pd-extreme"}
REFUSED_DISKS: dict[str, set[str]] = {
    **{s: PD_TYPES for s in ("c4", "c4a", "c4d", "n4", "n4a", "n4d", "x4", "m4", "a4", "h4d")},
    "c3": {"pd-standard"}, "c3d": {"pd-standard"}, "h3": {"pd-standard", "pd-ssd"},
    **{s: {"hyperdisk-balanced"} for s in ("e2", "n1", "n2", "n2d", "c2", "c2d", "t2d", "t2a", "a2", "g2", "custom")},
}


@dataclass
class _Operation:
    name: str
    zone: str | None  # None: a global operation
    kind: str
    target: str
    polls: int = 0
    error: tuple[str, str, int] | None = None  # (code, message, HTTP status)
    on_done: Callable[[], None] | None = None

    @property
    def status(self) -> str:
        return "PENDING" if self.polls == 0 else "RUNNING" if self.polls == 1 else "DONE"

    def json(self, base: str) -> dict[str, Any]:
        scope = f"{base}/zones/{self.zone}" if self.zone else f"{base}/global"
        body: dict[str, Any] = {"kind": "compute#operation", "id": str(abs(hash(self.name)) % 10**18),
                                "name": self.name, "operationType": self.kind,
                                "targetLink": self.target, "status": self.status,
                                "progress": 100 if self.status == "DONE" else 0,
                                "selfLink": f"{scope}/operations/{self.name}"}
        if self.zone:
            body["zone"] = scope
        if self.status == "DONE" and self.error is not None:
            code, message, status = self.error
            body["error"] = {"errors": [{"code": code, "message": message}]}
            body["httpErrorStatusCode"] = status
            body["httpErrorMessage"] = "SERVICE UNAVAILABLE" if status == 503 else "FORBIDDEN"
        return body


class ComputeStandin:
    def __init__(self) -> None:
        self.url = ""
        self.lock = threading.Lock()  # the stand-in's thread and the test's share the state below
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> instance resource
        self.host_keys: dict[str, dict[str, str]] = {}  # instance name -> {key type: base64 blob}
        self.default_host_keys: dict[str, str] = {}  # published for every instance without keys of its own
        self.machine_types: dict[str, list[dict[str, Any]]] = copy.deepcopy(MACHINE_TYPES)  # zone -> types
        self.calls: list[Call] = []
        self.quotas: dict[str, list[dict[str, Any]]] = copy.deepcopy(QUOTAS)  # region -> Region.quotas
        self.images: dict[tuple[str, str], dict[str, Any]] = copy.deepcopy(IMAGES)  # (project, name) -> Image
        self.networks: dict[str, Network] = {"default": Network()}
        self.firewalls: dict[str, dict[str, Any]] = {}  # name -> firewall resource (network as a full URL)
        self.page_size = 500  # list and aggregatedList answer in pages of this many
        self.gets_to_running = 2  # a new instance is RUNNING after this many gets (PROVISIONING, STAGING before)
        self._ops: dict[str, _Operation] = {}
        self._failures: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._op_failures: dict[str, list[tuple[str, str, int]]] = {}
        self._gates: dict[str, Gate] = {}
        self._all_gates: list[Gate] = []
        self._ids = itertools.count(1)
        self._looks: dict[str, int] = {}  # instance name -> gets so far
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ---- life cycle (a thread of its own) ----

    async def start(self) -> None:
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="compute-standin", daemon=True)
        self._thread.start()
        self.url = await asyncio.wrap_future(ready)
        # The rules GCE makes with the default network (tcp:22 from anywhere to every instance among them).
        for name, allowed, ranges in (
                ("default-allow-ssh", [{"IPProtocol": "tcp", "ports": ["22"]}], ["0.0.0.0/0"]),
                ("default-allow-rdp", [{"IPProtocol": "tcp", "ports": ["3389"]}], ["0.0.0.0/0"]),
                ("default-allow-icmp", [{"IPProtocol": "icmp"}], ["0.0.0.0/0"]),
                ("default-allow-internal", [{"IPProtocol": "tcp", "ports": ["0-65535"]},
                                            {"IPProtocol": "udp", "ports": ["0-65535"]}], ["10.128.0.0/9"])):
            self.add_firewall("test-project", {"name": name, "network": "global/networks/default",
                                               "allowed": allowed, "sourceRanges": ranges, "priority": 65534})

    def _serve(self, ready: concurrent.futures.Future[str]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application(middlewares=[self._middleware])
            self._routes(app)
            runner = web.AppRunner(app)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                ready.set_result(f"http://127.0.0.1:{runner.addresses[0][1]}")
                await self._stop.wait()
            finally:
                await runner.cleanup()

        try:
            asyncio.run(main())
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def stop(self) -> None:
        for gate in self._all_gates:  # a test that failed before releasing must not hold the shutdown
            gate.released.set()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- what tests call ----

    def fail_next(self, method: str, status: int, reason: str | None = None, message: str = "injected by the test",
                  count: int = 1, body: dict[str, Any] | None = None) -> None:
        with self.lock:
            self._failures.setdefault(method, []).extend(
                [(status, body or google_error(status, message, reason))] * count)

    def fail_operation_next(self, method: str, code: str, status: int = 503,
                            message: str = "The zone does not have enough resources available to fulfill the "
                                           "request. Try a different zone, or try again later.") -> None:
        with self.lock:
            self._op_failures.setdefault(method, []).append((code, message, status))

    def hold(self, method: str) -> Gate:
        gate = Gate()
        with self.lock:
            self._gates[method] = gate
            self._all_gates.append(gate)
        return gate

    def publish_host_keys(self, name: str, keys: dict[str, str]) -> None:
        with self.lock:
            self.host_keys[name] = dict(keys)

    def add_network(self, name: str, *, auto: bool = True, subnetworks: dict[str, set[str]] | None = None) -> None:
        with self.lock:
            self.networks[name] = Network(auto, dict(subnetworks or {}))

    def add_firewall(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        """A rule as `firewalls.insert` stores it: defaults filled in, the network as a full URL."""
        base = f"{self.url}/compute/v1/projects/{project}"
        rule = {"kind": "compute#firewall", "id": str(5000 + next(self._ids)), "direction": "INGRESS",
                "priority": 1000, "disabled": False, "creationTimestamp": "2024-01-01T00:00:00.000-00:00",
                **copy.deepcopy(body), "selfLink": f"{base}/global/firewalls/{body['name']}"}
        rule["network"] = f"{base}/global/networks/{str(body.get('network') or 'default').rsplit('/', 1)[-1]}"
        with self.lock:
            self.firewalls[rule["name"]] = rule
        return rule

    def calls_of(self, method: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method]

    def instance(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            found = [i for (_, n), i in self.instances.items() if n == name]
            return copy.deepcopy(found[0]) if found else None

    def add_instance(self, project: str, zone: str, body: dict[str, Any], status: str = "RUNNING") -> None:
        """An instance made behind the driver's back (another daemon's, an unlabelled one)."""
        with self.lock:
            self._create(zone, {"machineType": "e2-small", **body}, project)["status"] = status

    # ---- HTTP ----

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post(Z + "/instances", self._insert, name="instances.insert")
        r.add_post(Z + "/instances/bulkInsert", self._bulk_insert, name="instances.bulkInsert")
        r.add_get(Z + "/instances", self._list, name="instances.list")
        r.add_get(P + "/aggregated/instances", self._aggregated, name="instances.aggregatedList")
        r.add_get(Z + "/instances/{name}", self._get, name="instances.get")
        r.add_delete(Z + "/instances/{name}", self._delete, name="instances.delete")
        r.add_post(Z + "/instances/{name}/setLabels", self._set_labels, name="instances.setLabels")
        r.add_get(Z + "/instances/{name}/getGuestAttributes", self._guest_attributes,
                  name="instances.getGuestAttributes")
        r.add_get(Z + "/operations/{op}", self._operation, name="zoneOperations.get")
        r.add_post(Z + "/operations/{op}/wait", self._operation, name="zoneOperations.wait")
        r.add_get(Z + "/machineTypes", self._machine_types, name="machineTypes.list")
        r.add_get(Z + "/machineTypes/{name}", self._machine_type, name="machineTypes.get")
        r.add_get(P + "/global/networks/{name}", self._network, name="networks.get")
        r.add_get(P + "/global/firewalls", self._firewall_list, name="firewalls.list")
        r.add_post(P + "/global/firewalls", self._firewall_insert, name="firewalls.insert")
        r.add_get(P + "/global/operations/{op}", self._operation, name="globalOperations.get")
        r.add_get(Z, self._zone, name="zones.get")
        r.add_get(P + "/regions/{region}", self._region, name="regions.get")
        r.add_get(P + "/global/images/family/{family}", self._image_from_family, name="images.getFromFamily")
        r.add_get(P + "/global/images/{name}", self._image, name="images.get")
        r.add_route("*", "/{tail:.*}", self._unknown, name="unknown")

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        method = request.match_info.route.name or "unknown"
        body = await request.json() if request.can_read_body else None
        with self.lock:
            self.calls.append(Call(method, request.method, request.path, body))
            gate = self._gates.pop(method, None)
            failures = self._failures.get(method)
            failure = failures.pop(0) if failures else None
        if gate is not None:
            gate.arrived.set()
            await asyncio.to_thread(gate.released.wait, HOLD_MAX_S)
        if failure is not None:
            return web.json_response(failure[1], status=failure[0])
        return await handler(request)

    def _base(self, request: web.Request) -> str:
        return f"{self.url}/compute/v1/projects/{request.match_info['project']}"

    def _new_op(self, request: web.Request, kind: str, target: str, error: tuple[str, str, int] | None = None,
                on_done: Callable[[], None] | None = None) -> web.Response:
        op = _Operation(f"operation-{uuid.uuid4().hex[:16]}", request.match_info.get("zone"), kind, target, 0, error,
                        on_done)
        self._ops[op.name] = op
        return web.json_response(op.json(self._base(request)))

    def _create(self, zone: str, body: dict[str, Any], project: str) -> dict[str, Any]:
        """Store an instance (the caller holds the lock)."""
        n = next(self._ids)
        base = f"{self.url}/compute/v1/projects/{project}"
        inst = copy.deepcopy(body)
        machine_type = str(inst.get("machineType", ""))
        inst.update({
            "kind": "compute#instance", "id": str(1000 + n), "zone": f"{base}/zones/{zone}",
            "machineType": f"{base}/zones/{zone}/machineTypes/{machine_type.rsplit('/', 1)[-1]}",
            "selfLink": f"{base}/zones/{zone}/instances/{inst['name']}", "status": "PROVISIONING",
            "labelFingerprint": uuid.uuid4().hex[:12], "creationTimestamp": "2024-01-01T00:00:00.000-00:00",
        })
        inst.setdefault("metadata", {})["fingerprint"] = uuid.uuid4().hex[:12]
        for nic in inst.get("networkInterfaces", []):
            nic["networkIP"] = f"10.128.0.{n % 250 + 2}"
            for ac in nic.get("accessConfigs", []):
                if ac.get("type", "ONE_TO_ONE_NAT") == "ONE_TO_ONE_NAT":
                    ac["natIP"] = f"198.51.100.{n % 250 + 1}"
        self.instances[(zone, inst["name"])] = inst
        return inst

    def _placement_invalid(self, body: dict[str, Any], zone: str, field: str, bulk: bool) -> web.Response | None:
        """GCE's answers to a network, subnetwork or boot disk type it cannot use (the caller holds the lock)."""
        def invalid(what: str, value: Any, why: str) -> web.Response:
            return web.json_response(google_error(400, f"Invalid value for field '{field}.{what}': '{value}'. {why}",
                                                  "invalid"), status=400)

        for i, nic in enumerate(body.get("networkInterfaces") or []):
            network, subnetwork = nic.get("network"), nic.get("subnetwork")
            name = str(network or "default").rsplit("/", 1)[-1]
            if network and name not in self.networks:
                return invalid(f"networkInterfaces[{i}].network", network,
                               "The referenced network resource cannot be found.")
            found = self.networks.get(name)
            if subnetwork:
                region, sub = str(subnetwork).split("/")[-3], str(subnetwork).rsplit("/", 1)[-1]
                auto = found is not None and found.auto and sub == name
                if not auto and (found is None or sub not in found.subnetworks.get(region, set())):
                    return invalid(f"networkInterfaces[{i}].subnetwork", subnetwork,
                                   "The referenced subnetwork resource cannot be found.")
            elif found is not None and not found.auto:
                return invalid(f"networkInterfaces[{i}]", nic, "Subnetwork should be specified for custom "
                                                               "subnetmode network")
        for i, disk in enumerate(body.get("disks") or []):
            disk_type = str((disk.get("initializeParams") or {}).get("diskType") or "")
            if disk_type and not bulk and "/diskTypes/" not in f"/{disk_type}":
                return invalid(f"disks[{i}].initializeParams.diskType", disk_type, "The URL is malformed.")
            kind = disk_type.rsplit("/", 1)[-1] or "pd-standard"  # GCE's default
            machine = str(body.get("machineType", "")).rsplit("/", 1)[-1]
            if kind in REFUSED_DISKS.get(machine.split("-", 1)[0], set()):
                return web.json_response(google_error(400, f"[{kind}, {machine}] features are not compatible for "
                                                           "creating instance.", "badRequest"), status=400)
        return None

    def _invalid(self, body: dict[str, Any], name: str) -> web.Response | None:
        if not NAME.match(name):
            return web.json_response(google_error(400, f"Invalid value for field 'resource.name': '{name}'. Must be "
                                                       "a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
                                                  "invalid"), status=400)
        for key, value in (body.get("labels") or {}).items():
            if not NAME.match(key) or not LABEL.match(str(value)):
                return web.json_response(google_error(400, f"Invalid value for field 'resource.labels': "
                                                           f"'{key}={value}'", "invalid"), status=400)
        if not body.get("machineType"):
            return web.json_response(google_error(400, "Invalid value for field 'resource.machineType': ''",
                                                  "invalid"), status=400)
        return self._wrong_arch(body)

    def _wrong_arch(self, body: dict[str, Any]) -> web.Response | None:
        """GCE's refusal of a boot image of another architecture than the machine type's."""
        name = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        # Without the lock: some callers hold it (it is not reentrant), and tests set machine_types
        # before they create anything.
        known = [t for types in list(self.machine_types.values()) for t in types if t["name"] == name]
        if not known:
            return None
        machine_arch = known[0].get("architecture") or "X86_64"
        for disk in body.get("disks") or []:
            disk_arch = IMAGE_ARCHES.get(str((disk.get("initializeParams") or {}).get("sourceImage", "")))
            if disk.get("boot") and disk_arch and disk_arch != machine_arch:
                message = (f"Invalid resource usage: 'Requested boot disk architecture ({disk_arch}) is not "
                           f"compatible with machine type architecture ({machine_arch}).'")
                return web.json_response(google_error(400, message, "badRequest"), status=400)
        return None

    def _conflict(self, zone: str, project: str, name: str) -> web.Response:
        return web.json_response(google_error(409, f"The resource 'projects/{project}/zones/{zone}/instances/{name}'"
                                                    " already exists", "alreadyExists"), status=409)

    async def _insert(self, request: web.Request) -> web.Response:
        body = await request.json()
        zone, project, name = request.match_info["zone"], request.match_info["project"], str(body.get("name", ""))
        if (bad := self._invalid(body, name)) is not None:
            return bad
        with self.lock:
            if (bad := self._placement_invalid(body, zone, "resource", bulk=False)) is not None:
                return bad
            if (zone, name) in self.instances:
                return self._conflict(zone, project, name)
            failures = self._op_failures.get("instances.insert")
            error = failures.pop(0) if failures else None
            if error is None:
                self._create(zone, body, project)
        return self._new_op(request, "insert", f"{self._base(request)}/zones/{zone}/instances/{name}", error)

    async def _bulk_insert(self, request: web.Request) -> web.Response:
        body = await request.json()
        zone, project = request.match_info["zone"], request.match_info["project"]
        names = list(body.get("perInstanceProperties") or {})
        count, min_count = int(body.get("count", 0)), int(body.get("minCount", body.get("count", 0)))
        props = dict(body.get("instanceProperties") or {})
        if body.get("namePattern") or not names or count != len(names) or not 0 < min_count <= count:
            return web.json_response(google_error(400, "the stand-in needs perInstanceProperties names, one per "
                                                       "count", "invalid"), status=400)
        for name in names:
            if (bad := self._invalid(props, name)) is not None:
                return bad
        with self.lock:
            if (bad := self._placement_invalid(props, zone, "resource.instanceProperties", bulk=True)) is not None:
                return bad
            for name in names:
                if (zone, name) in self.instances:
                    return self._conflict(zone, project, name)
            failures = self._op_failures.get("instances.bulkInsert")
            error = failures.pop(0) if failures else None
            if error is None:
                for name in names:
                    self._create(zone, {**props, "name": name}, project)
        return self._new_op(request, "bulkInsert", f"{self._base(request)}/zones/{zone}", error)

    def _not_found(self, request: web.Request, what: str = "") -> web.Response:
        m = request.match_info
        path = f"projects/{m['project']}/zones/{m['zone']}/instances/{m['name']}{what}"
        return web.json_response(google_error(404, f"The resource '{path}' was not found", "notFound"), status=404)

    async def _get(self, request: web.Request) -> web.Response:
        with self.lock:
            inst = self.instances.get((request.match_info["zone"], request.match_info["name"]))
            if inst is None:
                return self._not_found(request)
            # Each look moves a new instance on its way up, as a booting VM does.
            if inst["status"] in ("PROVISIONING", "STAGING"):
                looks = self._looks[inst["name"]] = self._looks.get(inst["name"], 0) + 1
                inst["status"] = "RUNNING" if looks >= self.gets_to_running else "STAGING"
            return web.json_response(copy.deepcopy(inst))

    def _matches(self, inst: dict[str, Any], expression: str) -> bool:
        if not expression:
            return True
        m = FILTER.match(expression)
        if m is None:
            raise ValueError(expression)
        key, op, value = m.groups()
        if key.startswith("labels."):
            actual = (inst.get("labels") or {}).get(key.removeprefix("labels."))
        else:
            actual = inst.get(key)
        return (actual == value) == (op in ("=", "eq"))

    def _page(self, request: web.Request, zone: str | None) -> tuple[list[dict[str, Any]], str | None] | web.Response:
        expression = request.query.get("filter", "")
        with self.lock:
            try:
                found = [copy.deepcopy(i) for (z, _), i in sorted(self.instances.items())
                         if (zone is None or z == zone) and self._matches(i, expression)]
            except ValueError:
                return web.json_response(google_error(400, f"Invalid value for field 'filter': '{expression}'. "
                                                           "Invalid list filter expression.", "invalid"), status=400)
        start = int(request.query.get("pageToken") or 0)
        size = min(int(request.query.get("maxResults") or self.page_size), self.page_size)
        page = found[start:start + size]
        return page, str(start + size) if start + size < len(found) else None

    async def _list(self, request: web.Request) -> web.Response:
        got = self._page(request, request.match_info["zone"])
        if isinstance(got, web.Response):
            return got
        page, token = got
        body: dict[str, Any] = {"kind": "compute#instanceList", "id": "instances"}
        if page:
            body["items"] = page
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _aggregated(self, request: web.Request) -> web.Response:
        got = self._page(request, None)
        if isinstance(got, web.Response):
            return got
        page, token = got
        items: dict[str, Any] = {}
        for inst in page:
            items.setdefault(f"zones/{inst['zone'].rsplit('/', 1)[-1]}", {"instances": []})["instances"].append(inst)
        if not items:  # GCE names the empty scopes with a warning instead
            items["zones/us-central1-a"] = {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "none"}}
        body: dict[str, Any] = {"kind": "compute#instanceAggregatedList", "id": "instances", "items": items}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _delete(self, request: web.Request) -> web.Response:
        key = (request.match_info["zone"], request.match_info["name"])
        with self.lock:
            inst = self.instances.get(key)
            if inst is None:
                return self._not_found(request)
            inst["status"] = "STOPPING"

        def gone() -> None:
            self.instances.pop(key, None)
            self.host_keys.pop(key[1], None)

        return self._new_op(request, "delete", inst["selfLink"], on_done=gone)

    async def _set_labels(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            inst = self.instances.get((request.match_info["zone"], request.match_info["name"]))
            if inst is None:
                return self._not_found(request)
            if body.get("labelFingerprint") != inst["labelFingerprint"]:
                return web.json_response(google_error(412, "Labels fingerprint either invalid or resource labels "
                                                           "have changed", "conditionNotMet"), status=412)
            if (bad := self._invalid({**inst, "labels": body.get("labels")}, inst["name"])) is not None:
                return bad
            inst["labels"] = dict(body.get("labels") or {})
            inst["labelFingerprint"] = uuid.uuid4().hex[:12]
            target = inst["selfLink"]
        return self._new_op(request, "setLabels", target)

    async def _guest_attributes(self, request: web.Request) -> web.Response:
        path = request.query.get("queryPath", "")
        with self.lock:
            if (request.match_info["zone"], request.match_info["name"]) not in self.instances:
                return self._not_found(request)
            keys = dict(self.host_keys.get(request.match_info["name"], self.default_host_keys))
        if path != "hostkeys/" or not keys:
            return self._not_found(request, f"/guestAttributes/{path}")
        return web.json_response({"kind": "compute#guestAttributes", "queryPath": path, "queryValue": {"items": [
            {"namespace": "hostkeys", "key": k, "value": v} for k, v in keys.items()]}})

    async def _operation(self, request: web.Request) -> web.Response:
        with self.lock:
            op = self._ops.get(request.match_info["op"])
            if op is None:
                return web.json_response(google_error(404, f"The resource 'operations/{request.match_info['op']}' "
                                                           "was not found", "notFound"), status=404)
            op.polls += 1
            if op.status == "DONE" and op.on_done is not None:
                op.on_done()
                op.on_done = None
            return web.json_response(op.json(self._base(request)))

    def _served_type(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        zone = request.match_info["zone"]
        return {**copy.deepcopy(body), "zone": zone,
                "selfLink": f"{self._base(request)}/zones/{zone}/machineTypes/{body['name']}"}

    async def _machine_types(self, request: web.Request) -> web.Response:
        with self.lock:
            found = [self._served_type(request, t) for t in self.machine_types.get(request.match_info["zone"], [])]
        body: dict[str, Any] = {"kind": "compute#machineTypeList", "id": "machineTypes"}
        if found:
            body["items"] = found
        return web.json_response(body)

    async def _machine_type(self, request: web.Request) -> web.Response:
        m = request.match_info
        with self.lock:
            found = [t for t in self.machine_types.get(m["zone"], []) if t["name"] == m["name"]]
            if found:
                return web.json_response(self._served_type(request, found[0]))
        path = f"projects/{m['project']}/zones/{m['zone']}/machineTypes/{m['name']}"
        return web.json_response(google_error(404, f"The resource '{path}' was not found", "notFound"), status=404)

    async def _network(self, request: web.Request) -> web.Response:
        m = request.match_info
        with self.lock:
            found = self.networks.get(m["name"])
        link = f"{self._base(request)}/global/networks/{m['name']}"
        if found is None:
            path = f"projects/{m['project']}/global/networks/{m['name']}"
            return web.json_response(google_error(404, f"The resource '{path}' was not found", "notFound"), status=404)
        body: dict[str, Any] = {"kind": "compute#network", "id": str(abs(hash(m["name"])) % 10**12), "name": m["name"],
                                "selfLink": link, "autoCreateSubnetworks": found.auto,
                                "routingConfig": {"routingMode": "REGIONAL"}}
        subnets = [f"{self._base(request)}/regions/{r}/subnetworks/{n}" for r, ns in found.subnetworks.items()
                   for n in sorted(ns)]
        if subnets:
            body["subnetworks"] = subnets
        return web.json_response(body)

    async def _firewall_list(self, request: web.Request) -> web.Response:
        expression = request.query.get("filter", "")
        with self.lock:
            try:
                # One project's rules, whichever the request names (the stand-in keeps no projects apart).
                found = [{**copy.deepcopy(r), "network": f"{self._base(request)}/global/networks/"
                                                         f"{r['network'].rsplit('/', 1)[-1]}"}
                         for _, r in sorted(self.firewalls.items())]
                found = [r for r in found if self._matches(r, expression)]
            except ValueError:
                return web.json_response(google_error(400, f"Invalid value for field 'filter': '{expression}'. "
                                                           "Invalid list filter expression.", "invalid"), status=400)
        start = int(request.query.get("pageToken") or 0)
        size = min(int(request.query.get("maxResults") or self.page_size), self.page_size)
        body: dict[str, Any] = {"kind": "compute#firewallList", "id": "firewalls"}
        if found[start:start + size]:
            body["items"] = found[start:start + size]
        if start + size < len(found):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)

    async def _firewall_insert(self, request: web.Request) -> web.Response:
        body = await request.json()
        project, name = request.match_info["project"], str(body.get("name", ""))
        if not NAME.match(name):
            return web.json_response(google_error(400, f"Invalid value for field 'resource.name': '{name}'.",
                                                  "invalid"), status=400)
        network = str(body.get("network") or "global/networks/default")
        with self.lock:
            if network.rsplit("/", 1)[-1] not in self.networks:
                return web.json_response(google_error(400, f"Invalid value for field 'resource.network': '{network}'. "
                                                           "The referenced network resource cannot be found.",
                                                      "invalid"), status=400)
            if name in self.firewalls:
                return web.json_response(google_error(409, f"The resource 'projects/{project}/global/firewalls/"
                                                           f"{name}' already exists", "alreadyExists"), status=409)
        rule = self.add_firewall(project, body)
        return self._new_op(request, "insert", rule["selfLink"])

    def _missing(self, request: web.Request, path: str) -> web.Response:
        resource = f"projects/{request.match_info['project']}/{path}"
        return web.json_response(google_error(404, f"The resource '{resource}' was not found", "notFound"), status=404)

    def _zones(self) -> dict[str, str]:
        """zone -> region: the zones the stand-in sells machine types in."""
        with self.lock:
            return {z: z.rsplit("-", 1)[0] for z in self.machine_types}

    async def _zone(self, request: web.Request) -> web.Response:
        zone = request.match_info["zone"]
        region = self._zones().get(zone)
        if region is None:
            return self._missing(request, f"zones/{zone}")
        base = self._base(request)
        return web.json_response({"kind": "compute#zone", "id": str(abs(hash(zone)) % 10**12), "name": zone,
                                  "description": zone, "status": "UP", "region": f"{base}/regions/{region}",
                                  "selfLink": f"{base}/zones/{zone}", "availableCpuPlatforms": ["Intel Broadwell"]})

    async def _region(self, request: web.Request) -> web.Response:
        region = request.match_info["region"]
        zones = sorted(z for z, r in self._zones().items() if r == region)
        if not zones:
            return self._missing(request, f"regions/{region}")
        base = self._base(request)
        with self.lock:
            quotas = copy.deepcopy(self.quotas.get(region, []))
        return web.json_response({"kind": "compute#region", "id": str(abs(hash(region)) % 10**12), "name": region,
                                  "description": region, "status": "UP", "quotas": quotas,
                                  "zones": [f"{base}/zones/{z}" for z in zones],
                                  "selfLink": f"{base}/regions/{region}"})

    def _served_image(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({**copy.deepcopy(body),
                                  "selfLink": f"{self._base(request)}/global/images/{body['name']}"})

    async def _image(self, request: web.Request) -> web.Response:
        m = request.match_info
        with self.lock:
            found = self.images.get((m["project"], m["name"]))
        if found is None:
            return self._missing(request, f"global/images/{m['name']}")
        return self._served_image(request, found)

    async def _image_from_family(self, request: web.Request) -> web.Response:
        """The family's newest image that is not deprecated, as GCE answers it."""
        m = request.match_info
        with self.lock:
            candidates = [i for (p, _), i in self.images.items() if p == m["project"] and i.get("family") == m["family"]
                          and not i.get("deprecated")]
        if not candidates:
            return self._missing(request, f"global/images/family/{m['family']}")
        return self._served_image(request, max(candidates, key=lambda i: str(i["creationTimestamp"])))

    async def _unknown(self, request: web.Request) -> web.Response:
        return web.json_response(google_error(404, f"the stand-in does not serve {request.method} {request.path}",
                                              "notFound"), status=404)
