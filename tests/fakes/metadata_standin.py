"""Local stand-ins for the clouds' instance metadata services (aiohttp), for the interruption watchers.

One app per cloud on 127.0.0.1, serving the real paths and refusing what the real service refuses:
- AWS IMDSv2: `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` between 1 and
  21600 (else 400) and no `X-Forwarded-For` (else 403); it answers a random token. A GET needs a live
  token in `X-aws-ec2-metadata-token` (else 401). Tokens die at the end of their TTL, or all at once
  when the test calls `aws_expire_tokens()`. `spot/instance-action` and
  `events/recommendations/rebalance` answer 404 until the test sets a notice.
- GCP: `/computeMetadata/v1/instance/preempted` needs `Metadata-Flavor: Google` (else 403) and answers
  FALSE or TRUE with an ETag; `wait_for_change=true` answers at once when `last_etag` differs from
  the current ETag, else holds until the value changes or `timeout_sec` passes.
- Azure: `/metadata/scheduledevents` and `/metadata/instance/compute/name` need `Metadata: true` and
  an `api-version` (else 400); events are never approved here (a POST is refused with 405).

Faults for the next requests (of one route, or any): `fail_next` (an HTTP status), `garbage_next` (200
with a body no parser accepts), `hang_next` (no answer until `release_hung()`
or the stand-in closes, then 503; `after` requests served first); `n=None` lasts until
`clear_faults()`. Read `requests` and `refused` (per route) and `calls` (routes in order).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
from aiohttp import web

CLOUDS = ("aws", "gcp", "azure")
HOLD_MAX_S = 30.0  # a hung request or a long poll answers by itself after this at most
AZURE_EVENT_VERSIONS = {"2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01", "2020-07-01"}
GARBAGE = "<html>\x00{not json, not TRUE"


def iso_z(when: datetime) -> str:
    """AWS's format: "2026-11-23T10:02:00Z"."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc1123(when: datetime) -> str:
    """Azure's NotBefore format: "Mon, 19 Sep 2016 18:29:47 GMT"."""
    return format_datetime(when.astimezone(UTC), usegmt=True)


@dataclass
class _Fault:
    route: str | None  # None: any route
    mode: str  # "fail" | "garbage" | "hang"
    status: int
    left: int | None  # None: until cleared
    skip: int = 0  # matching requests served normally first


class MetadataStandin:
    def __init__(self, cloud: str) -> None:
        if cloud not in CLOUDS:
            raise ValueError(f"unknown cloud {cloud!r}")
        self.cloud = cloud
        self.url = ""
        self.requests: Counter[str] = Counter()  # per route, refused ones included
        self.refused: Counter[str] = Counter()  # per route: protocol refusals (400/401/403)
        self.calls: list[str] = []
        self._faults: list[_Fault] = []
        self._release = asyncio.Event()  # replaced at each release: held requests hold the old one
        # AWS
        self.tokens: dict[str, float] = {}  # token -> time.monotonic() when it dies
        self.tokens_issued = 0
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        # GCP
        self.preempted = False
        self._changed = asyncio.Event()  # replaced at each change: waiters hold the old one
        # Azure
        self.azure_vm_name = "ctvm-1"
        self.events: list[dict[str, Any]] = []
        self.incarnation = 1

    # ---- what tests set ----

    def aws_interrupt(self, action: str = "terminate", time_: str | None = None) -> None:
        self.instance_action = {"action": action,
                                "time": time_ or iso_z(datetime.now(UTC) + timedelta(minutes=2))}

    def aws_rebalance(self, notice_time: str | None = None) -> None:
        self.rebalance = {"noticeTime": notice_time or iso_z(datetime.now(UTC))}

    def aws_expire_tokens(self) -> None:
        self.tokens.clear()

    def gcp_preempt(self) -> None:
        self.preempted = True
        self._changed.set()
        self._changed = asyncio.Event()

    def azure_event(self, event_type: str = "Preempt", resources: list[str] | None = None,
                    not_before: str | None = None, event_id: str | None = None,
                    status: str = "Scheduled") -> str:
        """Add (or, with a known event_id, replace) an event; returns its EventId."""
        event_id = event_id or str(uuid.uuid4()).upper()
        event = {"EventId": event_id, "EventType": event_type, "ResourceType": "VirtualMachine",
                 "Resources": [self.azure_vm_name] if resources is None else resources, "EventStatus": status,
                 "NotBefore": rfc1123(datetime.now(UTC) + timedelta(seconds=30)) if not_before is None else not_before,
                 "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}
        self.events = [e for e in self.events if e["EventId"] != event_id] + [event]
        self.incarnation += 1
        return event_id

    def fail_next(self, n: int | None = 1, status: int = 500, route: str | None = None) -> None:
        self._faults.append(_Fault(route, "fail", status, n))

    def garbage_next(self, n: int | None = 1, route: str | None = None) -> None:
        self._faults.append(_Fault(route, "garbage", 200, n))

    def hang_next(self, n: int | None = 1, route: str | None = None, *, after: int = 0) -> None:
        self._faults.append(_Fault(route, "hang", 0, n, after))

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults_pending(self) -> int:
        """Faults not yet served (a hang counts as served once its request arrives)."""
        return len(self._faults)

    def release_hung(self) -> None:
        """Let the hung requests answer (503)."""
        self._release.set()
        self._release = asyncio.Event()

    def close(self) -> None:
        """Release every held request, so the server stops at once."""
        self._release.set()
        self._changed.set()

    # ---- serving ----

    def app(self) -> web.Application:
        app = web.Application()
        routes: dict[str, list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]]] = {
            "aws": [("PUT", "/latest/api/token", self._aws_token),
                    ("GET", "/latest/meta-data/spot/instance-action", self._aws_action),
                    ("GET", "/latest/meta-data/events/recommendations/rebalance", self._aws_rebalance)],
            "gcp": [("GET", "/computeMetadata/v1/instance/preempted", self._gcp_preempted)],
            "azure": [("*", "/metadata/scheduledevents", self._azure_events),
                      ("GET", "/metadata/instance/compute/name", self._azure_name)],
        }
        for method, path, handler in routes[self.cloud]:
            app.router.add_route(method, path, self._guarded(handler))
        return app

    def _guarded(self, handler: Callable[[web.Request], Awaitable[web.Response]]
                 ) -> Callable[[web.Request], Awaitable[web.Response]]:
        route = handler.__name__.lstrip("_")

        async def serve(request: web.Request) -> web.Response:
            self.requests[route] += 1
            self.calls.append(route)
            fault = next((f for f in self._faults if f.route in (None, route)), None)
            if fault is not None and fault.skip > 0:
                fault.skip -= 1
                fault = None
            if fault is not None:
                if fault.left is not None:
                    fault.left -= 1
                    if fault.left <= 0:
                        self._faults.remove(fault)
                if fault.mode == "fail":
                    return web.Response(status=fault.status, text=f"injected {fault.status}")
                if fault.mode == "garbage":
                    return web.Response(text=GARBAGE, content_type="application/json")
                await self._hold(self._release)
                return web.Response(status=503, text="released")
            response = await handler(request)
            if response.status in (400, 401, 403):
                self.refused[route] += 1
            return response

        return serve

    async def _hold(self, event: asyncio.Event, timeout_s: float = HOLD_MAX_S) -> None:
        try:
            await asyncio.wait_for(event.wait(), min(timeout_s, HOLD_MAX_S))
        except TimeoutError:
            pass

    # AWS

    async def _aws_token(self, request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Forbidden")
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="Missing or Invalid Parameters")
        token = secrets.token_urlsafe(42)
        self.tokens[token] = time.monotonic() + int(ttl)
        self.tokens_issued += 1
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def _aws_authorized(self, request: web.Request) -> bool:
        dies_at = self.tokens.get(request.headers.get("X-aws-ec2-metadata-token", ""))
        return dies_at is not None and time.monotonic() < dies_at

    async def _aws_action(self, request: web.Request) -> web.Response:
        return self._aws_item(request, self.instance_action)

    async def _aws_rebalance(self, request: web.Request) -> web.Response:
        return self._aws_item(request, self.rebalance)

    def _aws_item(self, request: web.Request, item: dict[str, str] | None) -> web.Response:
        if not self._aws_authorized(request):
            return web.Response(status=401, text="Unauthorized")
        if item is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=json.dumps(item))  # text/plain, as IMDS serves its JSON items

    # GCP

    def _gcp_value(self) -> tuple[str, str]:
        value = "TRUE" if self.preempted else "FALSE"
        return value, hashlib.sha256(value.encode()).hexdigest()[:16]

    async def _gcp_preempted(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        if request.query.get("wait_for_change", "").lower() == "true":
            timeout = request.query.get("timeout_sec", "60")
            if not timeout.isdigit():
                return web.Response(status=400, text="timeout_sec must be an integer")
            last_etag = request.query.get("last_etag")
            if last_etag is None or last_etag == self._gcp_value()[1]:
                await self._hold(self._changed, float(timeout))
        value, etag = self._gcp_value()
        return web.Response(text=value, content_type="application/text", headers={"ETag": etag})

    # Azure

    def _azure_refusal(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Metadata") != "true":
            return web.json_response({"error": "Bad request. Required metadata header not specified"}, status=400)
        if "api-version" not in request.query:
            return web.json_response({"error": "Bad request. api-version was not specified in the request"},
                                     status=400)
        return None

    async def _azure_events(self, request: web.Request) -> web.Response:
        refusal = self._azure_refusal(request)
        if refusal is not None:
            return refusal
        if request.query["api-version"] not in AZURE_EVENT_VERSIONS:
            return web.json_response({"error": "Bad request. api-version is invalid"}, status=400)
        if request.method != "GET":
            return web.Response(status=405, text="this stand-in takes no approvals")
        return web.json_response({"DocumentIncarnation": self.incarnation, "Events": self.events})

    async def _azure_name(self, request: web.Request) -> web.Response:
        refusal = self._azure_refusal(request)
        if refusal is not None:
            return refusal
        if request.query.get("format") == "text":
            return web.Response(text=self.azure_vm_name)
        return web.json_response(self.azure_vm_name)


@asynccontextmanager
async def metadata_standin(cloud: str, *, port: int = 0) -> AsyncIterator[MetadataStandin]:
    """A stand-in serving on 127.0.0.1 (`port` 0: any free one) until the block ends."""
    standin = MetadataStandin(cloud)
    # handler_cancellation: a client that gives up (the watcher timed out or was cancelled) ends the
    # held handler too, as the real service would not keep answering a closed connection.
    runner = web.AppRunner(standin.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        standin.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield standin
    finally:
        standin.close()
        await runner.cleanup()


class MetadataFleet:
    """One stand-in per instance behind one address, `{url}/{instance}/<metadata path>`: the local
    provider's `metadata_url: http://127.0.0.1:P/{instance}` gives each local agent its own cloud."""

    def __init__(self, cloud: str) -> None:
        self.cloud = cloud
        self.url = ""
        self._stack = AsyncExitStack()
        self._standins: dict[str, MetadataStandin] = {}
        self._lock = asyncio.Lock()

    async def get(self, instance: str) -> MetadataStandin:
        async with self._lock:
            if instance not in self._standins:
                self._standins[instance] = await self._stack.enter_async_context(metadata_standin(self.cloud))
            return self._standins[instance]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        standin = await self.get(request.match_info["instance"])
        url = f"{standin.url}/{request.match_info['tail']}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._http.request(request.method, url, params=request.query, headers=headers,
                                      data=await request.read()) as resp:
            body = await resp.read()
            keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "etag")}
            return web.Response(status=resp.status, body=body, headers=keep)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[MetadataFleet]:
        app = web.Application()
        app.router.add_route("*", "/{instance}/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        async with self._stack, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            self._http = http
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                yield self
            finally:
                await runner.cleanup()
