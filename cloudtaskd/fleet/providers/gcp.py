"""GCP Compute Engine driver (google-cloud-compute): spot or standard VMs, every one labelled.

Credentials: `credentials` (tests), else the service-account JSON in `credentials_file`, else
Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the gcloud user file, the metadata
server). `api_endpoint` goes to every client as ClientOptions; operations are polled here through
our own ZoneOperationsClient, because `operation.result()` would poll through a client made without
those options (the real Google endpoint).

Threads: the library is synchronous. Every call runs in this driver's own thread pool, never on
the event loop, and operations are polled with short `zoneOperations.get` calls and an
asyncio.sleep between them, so no thread is parked waiting on an operation.

Names and identity: a VM is named from our instance id (`ct-<id>`, with a hash suffix when the id
is not a valid GCE name as it is), so a repeated create finds the VM it made (an insert's 409
means the same). Labels carry the daemon id and the instance id, both sanitized to label syntax;
the exact instance id is kept in the metadata item `cloudtask-instances`, a JSON map of VM name ->
instance id (see Batching for why a map). Offers span several zones, so list() asks
`instances.aggregatedList` (every zone, every page) with the filter `labels.cloudtask-daemon = <id>`,
and get/delete find a VM through the zone learned from create or list (else by name, across zones).

Batching: creates that arrive within BATCH_WINDOW_S for the same (zone, type, market, image,
SSH key) go out as one `instances.bulkInsert` with count = min_count = n and our names as
`perInstanceProperties` keys (all or nothing, like RunInstances with MinCount = MaxCount). Per
instance, bulkInsert takes only a name and a hostname, so the batch shares its labels and metadata:
the daemon label, the SSH key, and the name -> id map of the whole batch; each VM's instance label
is then added with `setLabels`. A crash before that leaves VMs that list() still identifies
through the map, so nothing leaks. A batch of one is a plain `instances.insert`. A bulkInsert that
finds one of its names taken falls back to one insert per VM, each of which returns the existing
VM on its 409.

No `request_id`: idempotency comes from the names. For at least an hour, a request id would also
hand a retried create the first, failed operation (a stock-out) instead of trying again.

Network (once per driver, before the first create): the VPC network `providers.gcp.network`
(`default` unless set; projects in organisations often have none, as the org policy
`compute.skipDefaultNetworkCreation` is common) must exist, else a create fails with an error
naming that key. VMs go into it (and into `providers.gcp.subnetwork` when set, as custom-mode
networks need) with a public address and the network tag `cloudtask-ssh`. The bootstrap needs SSH
from this host: when no enabled ingress rule on that network allows tcp:22 from 0.0.0.0/0 to every
instance or to that tag, one (`cloudtask-ssh-<network>`) is created for the tag only.

OS Login: where it is on for the project (organisations often enforce it), the guest ignores the
`ssh-keys` metadata our key is in; `enable-oslogin=FALSE` on the instance turns it off for our VMs
(an org policy `compute.requireOsLogin` overrides that, and then the bootstrap cannot log in).

Boot disk: with no type given, GCE makes pd-standard, which C3, C4, N4 and newer series refuse.
The type is chosen per series (`boot_disk_type`), or set with `providers.gcp.disk_type`.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import hashlib
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

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

log = structlog.get_logger("cloudtaskd.fleet.providers.gcp")

PROVIDER = "gcp"
BATCH_WINDOW_S = 0.05
# Ubuntu 24.04 LTS per architecture: image families of ubuntu-os-cloud (24.04 has only these two).
DEFAULT_IMAGES = {X86_64: "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
                  ARM64: "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-arm64"}
DEFAULT_IMAGE = DEFAULT_IMAGES[X86_64]  # the x86_64 one (what every type got before architectures were told apart)
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
DEFAULT_NETWORK = "default"
NETWORK_TAG = "cloudtask-ssh"  # on every VM; the SSH firewall rule we make targets only this tag
FIREWALL_PREFIX = "cloudtask-ssh"
SSH_PORT = 22
ANYWHERE = "0.0.0.0/0"
# Series of the first two generations take Persistent Disk (pd-balanced: SSD-backed, the cheapest
# that boots fast); from the third on (C3, C3D, C4, C4A, C4D, N4, H3, Z3, M3, X4, A3, ...) GCE's
# general-purpose boot disk is Hyperdisk Balanced, and C4, C4A, C4D, N4 and X4 take no Persistent
# Disk at all. A custom N1 type (`custom-4-8192`) has no series prefix: it is N1.
PD_DISK = "pd-balanced"
HYPERDISK_DISK = "hyperdisk-balanced"
HYPERDISK_FROM_GENERATION = 3
NAME_MAX = 63  # GCE resource names and label values
META_INSTANCES = "cloudtask-instances"  # metadata item: JSON {VM name: exact instance id}
CALL_TIMEOUT_S = 60.0  # one HTTP call (the library's default is 600 s)
READ_RETRY_S = 20.0  # gets and lists retry a 503 for this long (the library's default is 600 s)
OPERATION_WAIT_S = 600.0
NO_CREDENTIALS = ("set providers.gcp.credentials_file or GOOGLE_APPLICATION_CREDENTIALS, "
                  "or run `gcloud auth application-default login`")

STATUS_MAP = {
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "SUSPENDED": "stopping",
    "STOPPED": "stopping",
    "REPAIRING": "stopping",
    "DEPROVISIONING": "stopping",
    "PENDING_STOP": "stopping",
    # GCE's TERMINATED is "stopped": the VM and its disk still exist (and the disk still costs).
    # Not ours to restart, so it is on its way out: "stopping" keeps it in list(), where the
    # reconciler finds it and deletes it; "terminated" would mean it is gone, which it is not.
    "TERMINATED": "stopping",
}

CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED"}
QUOTA_CODES = {"QUOTA_EXCEEDED"}
TRANSIENT_CODES = {"RATE_LIMIT_EXCEEDED", "INTERNAL_ERROR", "SERVICE_UNAVAILABLE", "TIMEOUT"}
INVALID_CODES = {"RESOURCE_NOT_FOUND", "INVALID_FIELD_VALUE", "INVALID_USAGE", "BAD_REQUEST",
                 "RESOURCE_ALREADY_EXISTS", "UNSUPPORTED_OPERATION"}
RATE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}  # a per-minute limit: wait and retry
QUOTA_REASONS = {"quotaExceeded"}
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"

T = TypeVar("T")


class OperationError(Exception):
    """A Compute Engine operation that finished DONE with errors (the error is the operation's, not the call's)."""

    def __init__(self, code: str, message: str, http_status: int = 0) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        super().__init__(f"{code}: {message}" if code else message)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


NETWORK_MISSING = re.compile(r"networkInterfaces\[\d+\]\.(sub)?network.*(cannot be found|not found)", re.I | re.S)


def _network_missing(text: str, op: str) -> InvalidRequest:
    return InvalidRequest(PROVIDER, op, "the VPC network or subnetwork for the VMs does not exist: set "
                          "providers.gcp.network (and providers.gcp.subnetwork for a custom-mode network) to one "
                          f"that exists (`gcloud compute networks list`); the API said: {text}")


def _by_code(code: str, message: str, status: int, op: str) -> ProviderError:
    text = f"{code}: {message}" if code else message
    if NETWORK_MISSING.search(message):
        return _network_missing(text, op)
    if "Subnetwork should be specified" in message:
        return InvalidRequest(PROVIDER, op, f"{text}: set providers.gcp.subnetwork (a custom-mode network has no "
                              "subnetwork in every region)")
    spot_stockout = code == "UNSUPPORTED_OPERATION" and re.search(r"spot|preemptible|capacity", message, re.I)
    if code in CAPACITY_CODES or spot_stockout or any(c in message for c in CAPACITY_CODES):
        return CapacityError(PROVIDER, op, text)
    if code in QUOTA_CODES:
        return QuotaExceeded(PROVIDER, op, text)
    if code in TRANSIENT_CODES:
        return TransientProviderError(PROVIDER, op, text)
    if code in INVALID_CODES:
        return InvalidRequest(PROVIDER, op, text)
    if status in (401, 403):
        return ProviderAuthError(PROVIDER, op, text)
    if status == 429 or status >= 500:
        return TransientProviderError(PROVIDER, op, text)
    if status in (400, 404, 409, 412):
        return InvalidRequest(PROVIDER, op, text)
    return ProviderError(PROVIDER, op, text or "failed")


def classify(exc: BaseException, op: str) -> ProviderError:
    """google-api-core's and google-auth's errors, and failed operations -> our named types (the
    only place that knows Compute Engine's error codes and reasons)."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, OperationError):
        return _by_code(exc.code, exc.message, exc.http_status, op)
    if isinstance(exc, auth.DefaultCredentialsError):
        return ProviderAuthError(PROVIDER, op, f"no credentials: {NO_CREDENTIALS}; google-auth said: "
                                 f"{_first_line(str(exc))}")
    if isinstance(exc, auth.RefreshError):
        return ProviderAuthError(PROVIDER, op, f"the credentials were refused: {_first_line(str(exc))}")
    if isinstance(exc, api.RetryError):  # retries ran out: judge by what failed last
        cause = exc.cause
        return classify(cause, op) if cause is not None else TransientProviderError(PROVIDER, op, str(exc))
    if isinstance(exc, api.GoogleAPICallError):
        status = int(exc.code or 0)
        reasons = {str(e.get("reason", "")) for e in exc.errors or () if isinstance(e, dict)} | {str(exc.reason or "")}
        reasons.discard("")
        text = f"{status} {','.join(sorted(reasons)) or type(exc).__name__}: {exc.message}"
        if any(c in str(exc.message) for c in CAPACITY_CODES):
            return CapacityError(PROVIDER, op, text)
        if reasons & RATE_REASONS or status == 429:
            return TransientProviderError(PROVIDER, op, text)
        if reasons & QUOTA_REASONS:
            return QuotaExceeded(PROVIDER, op, text)
        return _by_code("", text, status, op)
    # The network (requests' errors are OSErrors too), before any HTTP status came back.
    if isinstance(exc, auth.TransportError | OSError | TimeoutError):
        return TransientProviderError(PROVIDER, op, f"{type(exc).__name__}: {exc}")
    return ProviderError(PROVIDER, op, f"{type(exc).__name__}: {exc}")


def _reraise(exc: Exception, op: str) -> NoReturn:
    """Raise exc classified, with exc as its cause (or as it is, when it is one of ours already)."""
    err = classify(exc, op)
    if err is exc:
        raise err
    raise err from exc


def _status(exc: BaseException) -> int:
    """The HTTP status of a google-api-core error, else 0."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else 0


def default_image(arch: str) -> str:
    """The Ubuntu LTS image family for a machine type's architecture."""
    if arch not in DEFAULT_IMAGES:
        raise InvalidRequest(PROVIDER, "launch", f"no default image for architecture {arch!r}: set providers.gcp.image")
    return DEFAULT_IMAGES[arch]


def label_value(value: str) -> str:
    """GCE label values: lowercase letters, digits, `_` and `-`, at most 63."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:NAME_MAX]


def vm_name(instance_id: str) -> str:
    """`ct-<id>` when the id is valid in a GCE name as it is; else a sanitized id plus a hash, so
    that two ids which sanitize alike still get two names."""
    slug = re.sub(r"[^a-z0-9-]+", "-", instance_id.lower()).strip("-")
    name = f"ct-{slug}"
    if slug == instance_id and len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:8]
    return f"ct-{slug[: NAME_MAX - 12]}".rstrip("-") + f"-{digest}"


def boot_disk_type(machine_type: str) -> str:
    """The boot disk type every machine of this type's series accepts: pd-balanced for the
    first two generations (E2, N1, N2, N2D, C2, C2D, T2D, T2A, A2, G2, M1, M2), hyperdisk-balanced
    from the third on (C3, C3D, C4, C4A, C4D, N4, H3, Z3, M3, M4, X4, A3, A4)."""
    series = machine_type.split("-", 1)[0].lower()
    generation = re.search(r"\d+", series)
    if generation is None:  # `custom-4-8192`: a custom N1
        return PD_DISK
    return HYPERDISK_DISK if int(generation.group()) >= HYPERDISK_FROM_GENERATION else PD_DISK


def _name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _admits_ssh(rule: Any, tag: str) -> bool:
    """An enabled ingress rule that allows tcp:22 from anywhere to every instance or to `tag`."""
    if rule.disabled or (rule.direction and str(rule.direction) != "INGRESS"):
        return False
    if ANYWHERE not in builtins.list(rule.source_ranges):
        return False
    targets, accounts = builtins.list(rule.target_tags), builtins.list(rule.target_service_accounts)
    if accounts or (targets and tag not in targets):
        return False
    for allowed in rule.allowed:
        if str(allowed.I_p_protocol).lower() not in ("tcp", "6", "all"):
            continue
        ports = builtins.list(allowed.ports)
        if not ports:
            return True  # every port
        for spec in ports:
            low, _, high = str(spec).partition("-")
            if int(low) <= SSH_PORT <= int(high or low):
                return True
    return False


def _ssh_rule_name(network: str) -> str:
    """The firewall rule the driver makes on a network without one that admits SSH."""
    return f"{FIREWALL_PREFIX}-{network}"[:NAME_MAX].rstrip("-")


def _zone_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _instance_id(inst: Any) -> str:
    """The exact instance id from the metadata map, else the instance label, else ""."""
    items = {str(i.key): str(i.value) for i in inst.metadata.items}
    try:
        ids = json.loads(items.get(META_INSTANCES, "{}"))
    except ValueError:
        ids = {}
    found = ids.get(inst.name) if isinstance(ids, dict) else None
    return str(found or dict(inst.labels).get(TAG_INSTANCE, ""))


@dataclass
class _Clients:
    instances: Any
    operations: Any
    read_retry: Any
    networks: Any
    firewalls: Any
    global_operations: Any
    make: Callable[[Any], Any]  # another client class with the same credentials and options (check's)


@dataclass
class _Batch:
    requests: list[CreateRequest] = field(default_factory=list)
    futures: list[asyncio.Future[CloudVm]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


_BatchKey = tuple[str, str, bool, str, str, str]  # zone, machine type, spot, image, ssh user, ssh key


def _fail(batch: _Batch, err: ProviderError) -> None:
    for f in batch.futures:
        if not f.done():
            f.set_exception(err)


def _name_taken(exc: BaseException, err: ProviderError) -> bool:
    """A 409 on the call, or an operation that failed because the name exists."""
    return _status(exc) == 409 or ALREADY_EXISTS in str(err)


class GcpDriver:
    name = PROVIDER

    def __init__(self, project_id: str, zone: str, daemon_id: str, *, credentials_file: str | None = None,
                 api_endpoint: str | None = None, credentials: Any = None, image: str | None = None,
                 network: str = DEFAULT_NETWORK, subnetwork: str | None = None, disk_type: str | None = None,
                 polling_interval_s: float = 1.0, max_workers: int = 8) -> None:
        if not project_id:
            raise ProviderAuthError(PROVIDER, "configure", "no project: set providers.gcp.project_id")
        self.project_id = project_id
        self.zone = zone
        self.daemon_id = daemon_id
        self.credentials_file = credentials_file or None
        self.api_endpoint = api_endpoint or None
        self.image = image or None
        # A name in this project, or a path (`projects/HOST/global/networks/N`: a Shared VPC's).
        self.network = network or DEFAULT_NETWORK
        self.subnetwork = subnetwork or None
        self.disk_type = disk_type or None
        self.polling_interval_s = polling_interval_s
        self._credentials = credentials
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._clients_: _Clients | None = None
        self._client_lock = asyncio.Lock()
        # instance id -> (zone, VM name), learned from create and list: VMs live in several zones, and
        # one listed under another name (an older naming) is still found by its id.
        self._where: dict[str, tuple[str, str]] = {}
        self._batches: dict[_BatchKey, _Batch] = defaultdict(_Batch)
        self._flushes: set[asyncio.Task[None]] = set()
        self._network_ready = False
        self._network_lock = asyncio.Lock()

    # ---- threads and clients ----

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run one blocking library call in this driver's pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="cloudtask-gcp")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _clients(self, op: str) -> _Clients:
        async with self._client_lock:
            if self._clients_ is None:
                try:
                    self._clients_ = await self._call(self._build_clients, op)
                except Exception as exc:
                    _reraise(exc, op)
            return self._clients_

    def _build_clients(self, op: str) -> _Clients:
        """In a pool thread: importing the library and finding credentials both block."""
        from google.api_core import exceptions as api
        from google.api_core import retry as retries
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        credentials = self._credentials if self._credentials is not None else self._load_credentials(op)
        options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
        read_retry = retries.Retry(initial=0.2, maximum=5.0, multiplier=2.0, timeout=READ_RETRY_S,
                                   predicate=retries.if_exception_type(api.ServiceUnavailable, api.DeadlineExceeded))
        def make(cls: Any) -> Any:
            return cls(credentials=credentials, client_options=options)

        return _Clients(make(compute_v1.InstancesClient), make(compute_v1.ZoneOperationsClient), read_retry,
                        make(compute_v1.NetworksClient), make(compute_v1.FirewallsClient),
                        make(compute_v1.GlobalOperationsClient), make)

    def _load_credentials(self, op: str) -> Any:
        if self.credentials_file:
            from google.auth.exceptions import GoogleAuthError
            from google.oauth2 import service_account

            path = self.credentials_file
            try:
                credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                    path, scopes=[COMPUTE_SCOPE])  # ^ google-auth ships py.typed but leaves this one unannotated
            except (OSError, ValueError, KeyError, GoogleAuthError) as exc:
                # The reason only (never the file's content): a parse error could quote a key.
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                if isinstance(exc, ValueError) and "missing fields" in str(exc):
                    reason = _first_line(str(exc))
                raise ProviderAuthError(PROVIDER, op, f"cannot use providers.gcp.credentials_file {path}: {reason} "
                                        "(it must be a service-account JSON key)") from exc
            log.info("gcp_credentials", source="credentials_file", path=path)
            return credentials
        import google.auth

        credentials, _ = google.auth.default(scopes=[COMPUTE_SCOPE])  # DefaultCredentialsError: see classify
        log.info("gcp_credentials", source="application_default")
        return credentials

    async def close(self) -> None:
        for batch in self._batches.values():  # not sent yet
            if batch.timer is not None:
                batch.timer.cancel()
            _fail(batch, ProviderError(PROVIDER, "launch", "cancelled: the driver was closed"))
        self._batches.clear()
        for task in builtins.list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
        clients, executor = self._clients_, self._executor
        self._clients_, self._executor = None, None

        def shut() -> None:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            if clients is not None:
                for client in (clients.instances, clients.operations, clients.networks, clients.firewalls,
                               clients.global_operations):
                    client.transport.close()

        await asyncio.to_thread(shut)  # waits for calls in flight, each bounded by CALL_TIMEOUT_S

    # ---- operations ----

    async def _wait(self, operation: Any, zone: str | None, op: str, project: str | None = None) -> None:
        """Poll a zonal operation (a global one when zone is None) until DONE; raise its error, classified."""
        from google.cloud import compute_v1

        clients = await self._clients(op)
        project = project or self.project_id
        deadline = time.monotonic() + OPERATION_WAIT_S
        while operation.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise TransientProviderError(PROVIDER, op, f"operation {operation.name} not done after "
                                             f"{OPERATION_WAIT_S:.0f} s")
            await asyncio.sleep(self.polling_interval_s)
            try:
                if zone is None:
                    operation = await self._call(clients.global_operations.get, project=project,
                                                 operation=operation.name, retry=clients.read_retry,
                                                 timeout=CALL_TIMEOUT_S)
                else:
                    operation = await self._call(clients.operations.get, project=project, zone=zone,
                                                 operation=operation.name, retry=clients.read_retry,
                                                 timeout=CALL_TIMEOUT_S)
            except Exception as exc:
                _reraise(exc, op)
        errors = builtins.list(operation.error.errors)
        if errors:
            first = errors[0]
            message = "; ".join(str(e.message) for e in errors)
            failed = OperationError(str(first.code), message, int(operation.http_error_status_code or 0))
            _reraise(failed, op)

    # ---- the driver contract ----

    async def create(self, req: CreateRequest) -> CloudVm:
        zone = req.zone or self.zone
        existing = await self._fetch(zone, req.instance_id, "launch")
        if existing is not None:
            return self._vm(existing, req.instance_id)  # idempotent: this instance id was already launched
        key: _BatchKey = (zone, req.machine_type, req.spot, req.image or self.image or default_image(req.arch),
                          req.ssh_user, req.ssh_public_key)
        batch = self._batches[key]
        future: asyncio.Future[CloudVm] = asyncio.get_running_loop().create_future()
        batch.requests.append(req)
        batch.futures.append(future)
        if batch.timer is None:
            batch.timer = asyncio.get_running_loop().call_later(BATCH_WINDOW_S, self._start_flush, key)
        return await future

    def _start_flush(self, key: _BatchKey) -> None:
        task = asyncio.ensure_future(self._flush(key))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, key: _BatchKey) -> None:
        batch = self._batches.pop(key, _Batch())
        if not batch.requests:
            return
        zone, image = key[0], key[3]
        results: builtins.list[CloudVm | ProviderError]
        try:
            await self._prepare_network()
            if len(batch.requests) == 1:
                results = [await self._insert_one(batch.requests[0], zone, image)]
            else:
                results = await self._insert_many(batch.requests, zone, image)
        except asyncio.CancelledError:
            _fail(batch, ProviderError(PROVIDER, "launch", "cancelled: the driver was closed"))
            raise
        except Exception as exc:
            results = [classify(exc, "launch")] * len(batch.requests)
        for f, result in zip(batch.futures, results, strict=True):
            if f.done():
                continue
            if isinstance(result, CloudVm):
                f.set_result(result)
            else:
                f.set_exception(result)

    # ---- the network, once: it exists, and SSH reaches the VMs ----

    def _network_project(self) -> str:
        m = re.match(r"(?:.*/)?projects/([^/]+)/", self.network)
        return m.group(1) if m else self.project_id

    def _network_path(self) -> str:
        return self.network if "/" in self.network else f"global/networks/{self.network}"

    def _subnetwork_path(self, zone: str) -> str | None:
        if self.subnetwork is None or "/" in self.subnetwork:
            return self.subnetwork
        return f"regions/{zone.rsplit('-', 1)[0]}/subnetworks/{self.subnetwork}"

    async def _prepare_network(self) -> None:
        async with self._network_lock:
            if self._network_ready:
                return
            clients = await self._clients("prepare")
            network = await self._get_network(clients, "prepare")
            await self._ensure_ssh_rule(clients, self._network_project(),
                                        str(network.self_link) or self._network_path())
            self._network_ready = True

    async def _get_network(self, clients: _Clients, op: str) -> Any:
        """The VPC network for the VMs, or an InvalidRequest naming providers.gcp.network."""
        project, name = self._network_project(), _name_of(self.network)
        try:
            return await self._call(clients.networks.get, project=project, network=name,
                                    retry=clients.read_retry, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if _status(exc) == 404:
                raise InvalidRequest(PROVIDER, op, f"the VPC network {name!r} does not exist in project "
                                     f"{project}: set providers.gcp.network to one that does (`gcloud compute "
                                     "networks list`; organisations often have no `default` network)") from exc
            _reraise(exc, op)

    async def _ssh_rules(self, clients: _Clients, project: str, network_link: str) -> builtins.list[Any]:
        """The enabled ingress rules on this network that admit SSH from anywhere to our VMs' tag.
        Raises the library's own errors (the callers decide what a refusal to read them means)."""
        ours = f"projects/{project}/global/networks/{_name_of(network_link)}"

        def rules() -> builtins.list[Any]:
            return builtins.list(clients.firewalls.list(project=project, retry=clients.read_retry,
                                                        timeout=CALL_TIMEOUT_S))

        return [r for r in await self._call(rules)
                if str(r.network).rstrip("/").endswith(ours) and _admits_ssh(r, NETWORK_TAG)]

    async def _ensure_ssh_rule(self, clients: Any, project: str, network_link: str) -> None:
        """Create the SSH rule for our tag unless one on this network admits it already. Without the
        permission to read or make firewall rules this only warns: a rule may exist that we cannot
        see, and if none does the bootstrap's SSH fails with its own error."""
        from google.cloud import compute_v1

        name = _name_of(network_link)
        try:
            if await self._ssh_rules(clients, project, network_link):
                return
            rule_name = _ssh_rule_name(name)
            rule = compute_v1.Firewall(
                name=rule_name, network=network_link, direction="INGRESS", priority=1000,
                source_ranges=[ANYWHERE], target_tags=[NETWORK_TAG],
                allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=[str(SSH_PORT)])],
                description="cloudtask: SSH to its VMs (the agent bootstrap)")
            try:
                operation = await self._call(clients.firewalls.insert_unary, project=project,
                                             firewall_resource=rule, timeout=CALL_TIMEOUT_S)
                await self._wait(operation, None, "prepare", project)
            except Exception as exc:
                if not _name_taken(exc, classify(exc, "prepare")):
                    raise
                return  # made meanwhile by another daemon of this project
            log.info("gcp_firewall_rule_created", rule=rule_name, network=name, tag=NETWORK_TAG)
        except Exception as exc:
            err = classify(exc, "prepare")
            if not isinstance(err, ProviderAuthError):
                raise err from exc
            log.warning("gcp_firewall_unchecked", network=name, error=str(err),
                        hint=f"make sure an ingress rule allows tcp:22 to the network tag {NETWORK_TAG}")

    def _spec(self, req: CreateRequest, image: str, names: dict[str, str], zone: str,
              bulk: bool) -> dict[str, Any]:
        """What an Instance and a bulkInsert's InstanceProperties share. A bulkInsert's properties
        name the disk type as an instance template does (`pd-balanced`); an insert, by zonal path."""
        from google.cloud import compute_v1

        if req.spot:
            scheduling = compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE",
                                               automatic_restart=False, on_host_maintenance="TERMINATE")
        else:
            scheduling = compute_v1.Scheduling(provisioning_model="STANDARD")
        disk_type = self.disk_type or boot_disk_type(req.machine_type)
        if not bulk and "/" not in disk_type:
            disk_type = f"zones/{zone}/diskTypes/{disk_type}"
        nic = compute_v1.NetworkInterface(network=self._network_path(), access_configs=[
            compute_v1.AccessConfig(type_="ONE_TO_ONE_NAT", name="External NAT")])
        subnetwork = self._subnetwork_path(zone)
        if subnetwork is not None:
            nic.subnetwork = subnetwork
        return {
            "metadata": compute_v1.Metadata(items=[
                compute_v1.Items(key="ssh-keys", value=f"{req.ssh_user}:{req.ssh_public_key}"),
                # OS Login, where the project turns it on, would ignore ssh-keys (our only way in).
                compute_v1.Items(key="enable-oslogin", value="FALSE"),
                compute_v1.Items(key="enable-guest-attributes", value="TRUE"),  # the guest publishes its host keys
                compute_v1.Items(key=META_INSTANCES, value=json.dumps(names, sort_keys=True)),
            ]),
            "scheduling": scheduling,
            "disks": [compute_v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=(
                compute_v1.AttachedDiskInitializeParams(source_image=image, disk_type=disk_type)))],
            "network_interfaces": [nic],
            "tags": compute_v1.Tags(items=[NETWORK_TAG]),
        }

    def _labels(self, instance_id: str | None = None) -> dict[str, str]:
        labels = {TAG_DAEMON: label_value(self.daemon_id)}
        if instance_id is not None:
            labels[TAG_INSTANCE] = label_value(instance_id)
        return labels

    async def _insert_one(self, req: CreateRequest, zone: str, image: str) -> CloudVm:
        from google.cloud import compute_v1

        clients = await self._clients("launch")
        name = vm_name(req.instance_id)
        body = compute_v1.Instance(name=name, machine_type=f"zones/{zone}/machineTypes/{req.machine_type}",
                                   labels=self._labels(req.instance_id),
                                   **self._spec(req, image, {name: req.instance_id}, zone, bulk=False))
        try:
            operation = await self._call(clients.instances.insert_unary, project=self.project_id, zone=zone,
                                         instance_resource=body, timeout=CALL_TIMEOUT_S)
            await self._wait(operation, zone, "launch")
        except Exception as exc:
            err = classify(exc, "launch")
            if not _name_taken(exc, err):
                _reraise(exc, "launch")
            # The name is taken: by the VM an earlier try of this create made (returned below).
        inst = await self._fetch(zone, req.instance_id, "launch")
        if inst is None:
            raise CapacityError(PROVIDER, "launch", f"VM {name} was gone right after its creation")
        log.info("gcp_instances_launched", count=1, type=req.machine_type, zone=zone, spot=req.spot, call="insert")
        return self._vm(inst, req.instance_id)

    async def _insert_many(self, reqs: builtins.list[CreateRequest], zone: str,
                           image: str) -> builtins.list[CloudVm | ProviderError]:
        from google.cloud import compute_v1

        clients = await self._clients("launch")
        first, n = reqs[0], len(reqs)
        names = {vm_name(r.instance_id): r.instance_id for r in reqs}
        resource = compute_v1.BulkInsertInstanceResource(
            count=n, min_count=n,  # all or nothing: a partial batch would strand the rest of the requests
            instance_properties=compute_v1.InstanceProperties(machine_type=first.machine_type, labels=self._labels(),
                                                              **self._spec(first, image, names, zone, bulk=True)),
            per_instance_properties={name: compute_v1.BulkInsertInstanceResourcePerInstanceProperties()
                                     for name in names})
        try:
            operation = await self._call(clients.instances.bulk_insert_unary, project=self.project_id, zone=zone,
                                         bulk_insert_instance_resource_resource=resource, timeout=CALL_TIMEOUT_S)
            await self._wait(operation, zone, "launch")
        except Exception as exc:
            err = classify(exc, "launch")
            if not _name_taken(exc, err):
                _reraise(exc, "launch")
            log.info("gcp_bulk_insert_name_taken", count=n, zone=zone)
            return await self._insert_each(reqs, zone, image)
        log.info("gcp_instances_launched", count=n, type=first.machine_type, zone=zone, spot=first.spot,
                 call="bulkInsert")
        return builtins.list(await asyncio.gather(*(self._finish(zone, r) for r in reqs)))

    async def _insert_each(self, reqs: builtins.list[CreateRequest], zone: str,
                           image: str) -> builtins.list[CloudVm | ProviderError]:
        got = await asyncio.gather(*(self._insert_one(r, zone, image) for r in reqs), return_exceptions=True)
        return [r if isinstance(r, CloudVm) else classify(r, "launch") for r in got]

    async def _finish(self, zone: str, req: CreateRequest) -> CloudVm | ProviderError:
        """After a bulkInsert: read the VM and add its own instance label."""
        from google.cloud import compute_v1

        try:
            inst = await self._fetch(zone, req.instance_id, "launch")
        except ProviderError as err:
            return err
        if inst is None:
            return CapacityError(PROVIDER, "launch", f"VM {vm_name(req.instance_id)} was gone right after its "
                                 "creation")
        vm = self._vm(inst, req.instance_id)
        labels = {**dict(inst.labels), **self._labels(req.instance_id)}
        clients = await self._clients("tag")
        try:
            operation = await self._call(
                clients.instances.set_labels_unary, project=self.project_id, zone=zone, instance=inst.name,
                instances_set_labels_request_resource=compute_v1.InstancesSetLabelsRequest(
                    labels=labels, label_fingerprint=inst.label_fingerprint), timeout=CALL_TIMEOUT_S)
            await self._wait(operation, zone, "tag")
        except Exception as exc:
            # The name and the metadata map identify the VM already; the label is for people.
            log.warning("gcp_label_failed", instance=req.instance_id, error=str(classify(exc, "tag")))
            return vm
        return replace(vm, tags=labels)

    def _vm(self, inst: Any, instance_id: str | None = None) -> CloudVm:
        zone = _zone_of(str(inst.zone)) or self.zone
        instance_id = instance_id or _instance_id(inst)
        if instance_id:
            self._where[instance_id] = (zone, str(inst.name))
        nat = next((str(ac.nat_i_p) for ni in inst.network_interfaces for ac in ni.access_configs if ac.nat_i_p),
                   None)
        return CloudVm(
            instance_id=instance_id,
            cloud_id=f"projects/{self.project_id}/zones/{zone}/instances/{inst.name}",
            state=STATUS_MAP.get(str(inst.status), "pending"),
            public_ip=nat,
            zone=zone,
            spot=str(inst.scheduling.provisioning_model) == "SPOT",
            tags={str(k): str(v) for k, v in dict(inst.labels).items()},
        )

    async def _fetch(self, zone: str, instance_id: str, op: str, name: str | None = None) -> Any:
        """The VM of this instance id (or of this name) in this zone, or None."""
        clients = await self._clients(op)
        try:
            return await self._call(clients.instances.get, project=self.project_id, zone=zone,
                                    instance=name or vm_name(instance_id), retry=clients.read_retry,
                                    timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            _reraise(exc, op)

    async def _aggregated(self, filter_: str, op: str) -> builtins.list[Any]:
        """Every instance matching the filter, in every zone (all pages)."""
        from google.cloud import compute_v1

        clients = await self._clients(op)
        request = compute_v1.AggregatedListInstancesRequest(project=self.project_id, filter=filter_)

        def every_page() -> builtins.list[Any]:
            pager = clients.instances.aggregated_list(request=request, retry=clients.read_retry,
                                                      timeout=CALL_TIMEOUT_S)
            return [inst for _, scoped in pager for inst in scoped.instances]

        try:
            return await self._call(every_page)
        except Exception as exc:
            _reraise(exc, op)

    async def _find(self, instance_id: str, op: str) -> Any:
        """The VM of this instance id in whichever zone it is, or None."""
        where = self._where.get(instance_id)
        if where is not None:
            inst = await self._fetch(where[0], instance_id, op, where[1])
            if inst is None:
                self._where.pop(instance_id, None)
            return inst
        found = await self._aggregated(f"name = {vm_name(instance_id)}", op)
        return found[0] if found else None

    async def get(self, instance_id: str) -> CloudVm | None:
        inst = await self._find(instance_id, "describe")
        return None if inst is None else self._vm(inst, instance_id)

    async def list(self) -> builtins.list[CloudVm]:
        ours = label_value(self.daemon_id)
        found = await self._aggregated(f"labels.{TAG_DAEMON} = {ours}", "list")
        return [self._vm(inst) for inst in found if dict(inst.labels).get(TAG_DAEMON) == ours]

    async def delete(self, instance_id: str) -> None:
        inst = await self._find(instance_id, "terminate")
        if inst is None:
            return
        zone = _zone_of(str(inst.zone)) or self.zone
        clients = await self._clients("terminate")
        try:
            operation = await self._call(clients.instances.delete_unary, project=self.project_id, zone=zone,
                                         instance=inst.name, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if _status(exc) == 404:
                return  # deleted since we looked: fine
            _reraise(exc, "terminate")
        try:
            await self._wait(operation, zone, "terminate")
        except InvalidRequest as err:
            if "RESOURCE_NOT_FOUND" not in str(err):
                raise
        self._where.pop(instance_id, None)
        log.info("gcp_vm_deleted", instance=instance_id, vm=inst.name, zone=zone)

    async def host_keys(self, instance_id: str) -> builtins.list[str]:
        """The host keys the guest agent publishes as guest attributes (`hostkeys/<type>` = base64
        blob; needs `enable-guest-attributes`, which create sets). [] until the guest has booted far
        enough to publish them, or when the VM is gone: then the caller trusts on first use."""
        from google.cloud import compute_v1

        inst = await self._find(instance_id, "describe")
        if inst is None:
            return []
        clients = await self._clients("describe")
        request = compute_v1.GetGuestAttributesInstanceRequest(
            project=self.project_id, zone=_zone_of(str(inst.zone)) or self.zone, instance=inst.name,
            query_path="hostkeys/")
        try:
            attrs = await self._call(clients.instances.get_guest_attributes, request=request,
                                     retry=clients.read_retry, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if _status(exc) == 404:
                return []  # nothing published yet
            _reraise(exc, "describe")
        return [f"{item.key} {item.value}" for item in attrs.query_value.items
                if item.key and item.value and item.namespace in ("", "hostkeys")]

    # ---- `cloudtaskctl check`: reads only, makes nothing ----

    async def check(self, *, machine_types: tuple[str, ...], zones: tuple[str, ...], max_instances: int, cpus: int,
                    spot: bool = True, cheap: bool = False) -> builtins.list[CheckResult]:
        """Credentials (zones.get of the zone), then (unless cheap) the zones, the machine types in
        them, the image, the network and its SSH rule, and each region's CPU quota: each a line
        with what to fix. A missing SSH rule is no failure: the first launch makes it."""
        from google.cloud import compute_v1

        try:
            clients = await self._clients("check")
        except ProviderError as err:
            return [CheckResult(PROVIDER, "credentials", "FAIL", str(err))]
        check = _Check(self, clients, await self._call(lambda: _CheckClients(
            clients.make(compute_v1.ZonesClient), clients.make(compute_v1.RegionsClient),
            clients.make(compute_v1.ImagesClient), clients.make(compute_v1.MachineTypesClient))))
        try:
            return await check.run(machine_types, zones, max_instances * cpus, spot, cheap)
        finally:
            await self._call(check.close)


# Image paths `sourceImage` takes: a full or partial URL, `projects/P/global/images/NAME`, or
# `.../images/family/FAMILY` (the family's newest image that is not deprecated); no project: this one.
IMAGE_PATH = re.compile(r"^(?:https?://[^/]+/compute/v1/)?(?:projects/(?P<project>[^/]+)/)?global/images/"
                        r"(?:(?P<family>family)/)?(?P<name>[^/]+)$")
CPU_QUOTA = "CPUS"
SPOT_QUOTA = "PREEMPTIBLE_CPUS"  # once granted (limit above 0), spot VMs count against it instead of CPUS


@dataclass
class _CheckClients:
    zones: Any
    regions: Any
    images: Any
    machine_types: Any


@dataclass
class _Check:
    """One `check` run: the driver, its clients, and the clients only `check` needs."""

    driver: GcpDriver
    clients: _Clients
    extra: _CheckClients

    def close(self) -> None:
        for client in (self.extra.zones, self.extra.regions, self.extra.images, self.extra.machine_types):
            client.transport.close()

    async def _get(self, fn: Callable[..., T], **kwargs: Any) -> T:
        d = self.driver
        return await d._call(fn, project=kwargs.pop("project", d.project_id), retry=self.clients.read_retry,
                             timeout=CALL_TIMEOUT_S, **kwargs)

    async def run(self, machine_types: tuple[str, ...], zones: tuple[str, ...], vcpus: int, spot: bool,
                  cheap: bool) -> builtins.list[CheckResult]:
        d = self.driver
        places = builtins.list(dict.fromkeys(z for z in (d.zone, *zones) if z))
        got = await asyncio.gather(*(self._get(self.extra.zones.get, zone=z) for z in places), return_exceptions=True)
        first = got[0]
        if isinstance(first, BaseException) and not _missing(first, f"zones/{d.zone}"):
            return [_check_fail("credentials", first, f"{NO_CREDENTIALS}; check providers.gcp.project_id "
                                                f"({d.project_id}) and that the Compute Engine API is enabled there")]
        out = [CheckResult(PROVIDER, "credentials", "ok", f"project {d.project_id}")]
        if cheap:
            return out
        found: dict[str, Any] = {}
        for zone, result in zip(places, got, strict=True):
            if not isinstance(result, BaseException):
                found[zone] = result
                if str(result.status) != "UP":
                    out.append(CheckResult(PROVIDER, f"zone {zone}", "warn", f"status {result.status}: VMs may not "
                                           "start there until it is UP"))
            elif _missing(result, f"zones/{zone}"):
                out.append(CheckResult(PROVIDER, f"zone {zone}", "FAIL", f"no such zone in project {d.project_id}: "
                                       "fix providers.gcp.zone / zones (`gcloud compute zones list`)"))
            else:
                out.append(_check_fail(f"zone {zone}", result, "try again, or allow compute.zones.get"))
        if found:
            out += await self._machine_types(machine_types, builtins.list(found))
        out.append(await self._image())
        out += await self._network()
        regions = dict.fromkeys(_name_of(str(z.region)) or zone.rsplit("-", 1)[0] for zone, z in found.items())
        series = {t.split("-", 1)[0].upper() for t in machine_types if t}
        for region in regions:
            out += await self._quota(region, vcpus, series, spot)
        return out

    async def _machine_types(self, types: tuple[str, ...], zones: builtins.list[str]) -> builtins.list[CheckResult]:
        out = []
        for t in dict.fromkeys(types):
            what = f"machine type {t}"
            got = await asyncio.gather(*(self._get(self.extra.machine_types.get, zone=z, machine_type=t)
                                         for z in zones), return_exceptions=True)
            failed = next((r for r in got if isinstance(r, BaseException) and not _missing(r, f"machineTypes/{t}")),
                          None)
            sold = {z: r for z, r in zip(zones, got, strict=True) if not isinstance(r, BaseException)}
            if failed is not None:
                out.append(_check_fail(what, failed, "try again, or allow compute.machineTypes.get"))
            elif not sold:
                out.append(CheckResult(PROVIDER, what, "FAIL", f"not offered in {', '.join(zones)}: fix "
                                       "providers.gcp.machine_type / machine_types (`gcloud compute machine-types "
                                       f"list --zones {zones[0]}`), or add a zone that has it"))
            else:
                mt = next(iter(sold.values()))
                missing = [z for z in zones if z not in sold]
                out.append(CheckResult(PROVIDER, what, "ok", f"{mt.guest_cpus} vCPUs, {int(mt.memory_mb) / 1024:g} GB"
                                       + (f"; not in {', '.join(missing)}" if missing else "")))
        return out

    async def _image(self) -> CheckResult:
        d = self.driver
        image = d.image or DEFAULT_IMAGE
        what = f"image {image}"
        m = IMAGE_PATH.match(image)
        if m is None:
            return CheckResult(PROVIDER, what, "warn", "not a path this check reads: providers.gcp.image takes "
                               "projects/PROJECT/global/images/NAME or projects/PROJECT/global/images/family/FAMILY")
        project, name = m["project"] or d.project_id, m["name"]
        try:
            if m["family"]:
                got = await self._get(self.extra.images.get_from_family, project=project, family=name)
            else:
                got = await self._get(self.extra.images.get, project=project, image=name)
        except Exception as exc:
            if _status(exc) != 404:
                return _check_fail(what, exc, "try again, or allow compute.images.get")
            kind = "image family" if m["family"] else "image"
            return CheckResult(PROVIDER, what, "FAIL", f"no {kind} {name} in project {project}: set "
                               "providers.gcp.image to one that exists (`gcloud compute images list`)")
        state = str(got.deprecated.state or "")
        if state in ("OBSOLETE", "DELETED"):
            return CheckResult(PROVIDER, what, "FAIL", f"{got.name} is {state}: set providers.gcp.image to a current "
                               "image, or to its family (projects/PROJECT/global/images/family/FAMILY)")
        if state == "DEPRECATED":
            return CheckResult(PROVIDER, what, "warn", f"{got.name} is DEPRECATED: it still boots, but move "
                               "providers.gcp.image to its replacement or to a family")
        return CheckResult(PROVIDER, what, "ok", str(got.name))

    async def _network(self) -> builtins.list[CheckResult]:
        """The launch path's own checks (_get_network, _ssh_rules), read-only."""
        d = self.driver
        name = _name_of(d.network)
        try:
            network = await d._get_network(self.clients, "check")
        except ProviderError as err:
            fix = "" if isinstance(err, InvalidRequest) else "; try again, or allow compute.networks.get"
            return [CheckResult(PROVIDER, f"network {name}", "FAIL", f"{err}{fix}")]
        out = []
        if d.subnetwork is None and "auto_create_subnetworks" in network and not network.auto_create_subnetworks:
            out.append(CheckResult(PROVIDER, f"network {name}", "FAIL", "a custom-mode network: set "
                                   "providers.gcp.subnetwork to one of its subnetworks in the zone's region"))
        else:
            out.append(CheckResult(PROVIDER, f"network {name}", "ok", d.subnetwork or ""))
        try:
            rules = await d._ssh_rules(self.clients, d._network_project(), str(network.self_link) or d._network_path())
        except Exception as exc:
            refused = classify(exc, "check")
            if isinstance(refused, ProviderAuthError):
                out.append(CheckResult(PROVIDER, "ssh rule", "warn", f"cannot read the firewall rules ({refused}): "
                                       f"make sure one admits tcp:22 from this host to the network tag {NETWORK_TAG}"))
            else:
                out.append(_check_fail("ssh rule", exc, "try again"))
            return out
        if rules:
            out.append(CheckResult(PROVIDER, "ssh rule", "ok", f"firewall rule {rules[0].name} admits tcp:22"))
        else:
            out.append(CheckResult(PROVIDER, "ssh rule", "ok", f"no rule on {name} admits tcp:22 yet: the first launch "
                                   f"creates {_ssh_rule_name(name)} (tcp:22 from anywhere, to the network tag "
                                   f"{NETWORK_TAG} only)"))
        return out

    async def _quota(self, region: str, vcpus: int, series: set[str], spot: bool) -> builtins.list[CheckResult]:
        """CPUS (or PREEMPTIBLE_CPUS for spot, once granted) and each series' own CPU quota
        (N2_CPUS, C3_CPUS, ...: where the region has one) against max_instances x cpus."""
        try:
            got = await self._get(self.extra.regions.get, region=region)
        except Exception as exc:
            return [CheckResult(PROVIDER, f"quota in {region}", "warn", f"could not read the region's quotas "
                                f"({classify(exc, 'check')}): make sure {CPU_QUOTA} allows {vcpus} vCPUs "
                                "(max_instances x cpus)")]
        quotas = {str(q.metric): q for q in got.quotas}
        spot_quota = quotas.get(SPOT_QUOTA)
        if spot and spot_quota is not None and float(spot_quota.limit) > 0:
            metrics = [SPOT_QUOTA]
        else:
            metrics = [CPU_QUOTA, *sorted(m for s in series if (m := f"{s}_{CPU_QUOTA}") in quotas)]
        out = []
        for metric in metrics:
            what = f"quota {metric} in {region}"
            q = quotas.get(metric)
            if q is None:
                out.append(CheckResult(PROVIDER, what, "warn", f"the region reports no {metric} quota: make sure "
                                       f"{vcpus} vCPUs (max_instances x cpus) may run there"))
                continue
            out.append(quota_result(PROVIDER, what, float(q.limit), float(q.usage), vcpus, where="",
                                    fix="ask for more (console: IAM & Admin > Quotas), or lower "
                                    "providers.gcp.max_instances"))
        return out


def _missing(exc: BaseException, path: str) -> bool:
    """A 404 about this very resource (`zones/us-central1-a`), not the project or the zone above it:
    GCE's message names what was not found."""
    return _status(exc) == 404 and f"{path}' was not found" in str(getattr(exc, "message", exc))


def _check_fail(what: str, exc: BaseException, fix: str) -> CheckResult:
    return CheckResult(PROVIDER, what, "FAIL", f"{classify(exc, 'check')}; {fix}")
