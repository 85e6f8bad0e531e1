"""Spot interruption watchers: AWS IMDSv2, GCP metadata, Azure Scheduled Events.

`watch(source, on_notice)` polls the instance's metadata service until cancelled and calls
`on_notice` once per distinct notice; what a notice means (drain, hand work back) is the caller's.

Invariants:
- Metadata trouble never ends a watch: the service can be briefly away (GCP answers 503 during host
  maintenance) and the notice matters most exactly then. Each kind of error is logged once until a
  poll succeeds again, so a dead endpoint does not flood the log every few seconds.
- A notice is reported once: the same AWS action and time, the same Azure EventId, GCP's TRUE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from agent import logline
from agent.compat import SLOTS, UTC
from cloudtask_wire import jsonx
from cloudtask_wire.messages import Notice

SOURCES = ("aws", "gcp", "azure")
DEFAULT_METADATA_URLS: dict[str, str] = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                                          "azure": "http://169.254.169.254"}
# AWS advises polling every 5 s (two minutes' notice); Azure every second (Preempt gives 30 s);
# GCP is a long poll that answers on change, so its interval only paces retries.
POLL_S = {"aws": 5.0, "gcp": 5.0, "azure": 1.0}
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0  # a local metadata service answers in milliseconds: longer means it is stuck
ERROR_BACKOFF_FACTOR = 3  # after errors, at most poll_s * 3 between tries: 15 s, half the shortest notice
AWS_TOKEN_TTL_S = 21600  # the longest IMDSv2 grants
AWS_TOKEN_MARGIN_S = 60.0  # a new token this long before the old one dies, so no GET races its expiry
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_WAIT_S = 60  # wait_for_change's timeout_sec: a silently dropped connection is noticed within this
GCP_NOTICE_S = 30.0  # GCP powers the VM off about 30 s after setting preempted
AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
AZURE_FIRST_CALL_TIMEOUT_S = 150.0  # the first call turns Scheduled Events on and may take up to two minutes


class _MetadataError(Exception):
    def __init__(self, kind: str, what: str, body: str | None = None) -> None:
        self.kind = kind  # what rate-limits the log: one line per kind until a poll succeeds
        self.detail = what if body is None else f"{what}: {body[:120]!r}"
        super().__init__(f"{kind}: {self.detail}")


class _Watch:
    """What the three clouds share: the HTTP session, notices, error logging and backoff."""

    def __init__(self, source: str, base: str, http: aiohttp.ClientSession, on_notice: Callable[[Notice], None],
                 poll_s: float, log: Callable[..., None], clock: Callable[[], float]) -> None:
        self.source, self.base, self.http = source, base, http
        self.on_notice, self.poll_s, self.log, self.clock = on_notice, poll_s, log, clock
        self._logged: set[str] = set()
        self._delay_s = poll_s

    async def request(self, method: str, path: str, headers: dict[str, str],
                      timeout_s: float | None = None) -> tuple[int, str, str | None]:
        timeout_s = READ_TIMEOUT_S if timeout_s is None else timeout_s
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        try:
            async with self.http.request(method, self.base + path, headers=headers, timeout=timeout,
                                         allow_redirects=False) as resp:
                return resp.status, await resp.text(errors="replace"), resp.headers.get("ETag")
        except TimeoutError as exc:  # before ClientError: aiohttp's timeouts are both
            raise _MetadataError("timeout", f"{method} {path}: no answer within {timeout_s} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _MetadataError("unreachable", f"{method} {path}: {str(exc) or type(exc).__name__}") from exc

    def notify(self, notice: Notice) -> None:
        self.log("interruption_notice", source=notice.source, kind=notice.kind, deadline=notice.deadline,
                 detail=notice.detail)
        self.on_notice(notice)

    async def run(self, step: Callable[[], Awaitable[float]]) -> None:
        """Run `step` (which returns the pause before the next one) until cancelled."""
        while True:
            try:
                pause_s = await step()
            except _MetadataError as exc:
                if exc.kind not in self._logged:
                    self._logged.add(exc.kind)
                    self.log("interruption_watch_error", source=self.source, kind=exc.kind, error=exc.detail,
                             retry_in_s=round(self._delay_s, 3))
                await asyncio.sleep(self._delay_s)
                self._delay_s = min(self._delay_s * 2, self.poll_s * ERROR_BACKOFF_FACTOR)
                continue
            if self._logged:
                self.log("interruption_watch_recovered", source=self.source, errors=sorted(self._logged))
                self._logged.clear()
            self._delay_s = self.poll_s
            if pause_s > 0:
                await asyncio.sleep(pause_s)


def _json_object(body: str, what: str) -> dict[str, Any]:
    try:
        doc = jsonx.loads(body)
    except ValueError:  # jsonx.JSONDecodeError included
        doc = None
    if not isinstance(doc, dict):
        raise _MetadataError("bad_body", f"{what}: not a JSON object", body)
    return doc


def _deadline(text: object, parse: Callable[[str], datetime]) -> float | None:
    """Epoch seconds of a cloud's UTC time; None when absent (Azure blanks NotBefore once an event has
    started) or unreadable: the notice counts either way."""
    try:
        when = parse(str(text)) if text else None
    except (TypeError, ValueError):
        return None
    return None if when is None else (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(**SLOTS)
class _Aws:
    w: _Watch
    token: str | None = None
    renew_at: float = 0.0  # time.monotonic(): the token's TTL is no business of the injected wall clock
    reported: tuple[str, Any] | None = None
    rebalance_reported: bool = False

    async def _get(self, path: str) -> tuple[int, str]:
        for _ in range(2):
            if self.token is None or time.monotonic() >= self.renew_at:
                status, body, _etag = await self.w.request(
                    "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
                if status != 200 or not body.strip():
                    raise _MetadataError(f"token_http_{status}", "PUT /latest/api/token", body)
                self.token = body.strip()
                self.renew_at = time.monotonic() + AWS_TOKEN_TTL_S - min(AWS_TOKEN_MARGIN_S, AWS_TOKEN_TTL_S / 2)
            status, body, _etag = await self.w.request("GET", path, {"X-aws-ec2-metadata-token": self.token})
            if status != 401:
                return status, body
            self.token = None  # expired early or the service restarted: one fresh token, then give up this poll
        raise _MetadataError("unauthorized", f"GET {path}: 401 even with a fresh token")

    async def step(self) -> float:
        # Either item exists only once EC2 has decided (404 until then): any JSON object there is the
        # signal, even with fields we do not expect.
        status, body = await self._get(AWS_ACTION_PATH)
        if status == 200:
            doc = _json_object(body, AWS_ACTION_PATH)
            key = (str(doc.get("action") or "unknown"), doc.get("time"))
            if key != self.reported:
                self.reported = key
                self.w.notify(Notice("interruption", "aws", _deadline(key[1], datetime.fromisoformat), key[0]))
        elif status != 404:
            raise _MetadataError(f"http_{status}", f"GET {AWS_ACTION_PATH}", body)
        status, body = await self._get(AWS_REBALANCE_PATH)
        if status == 200:
            _json_object(body, AWS_REBALANCE_PATH)
            if not self.rebalance_reported:
                self.rebalance_reported = True
                self.w.notify(Notice("rebalance", "aws", None, "rebalance"))
        elif status != 404:
            raise _MetadataError(f"http_{status}", f"GET {AWS_REBALANCE_PATH}", body)
        return self.w.poll_s


@dataclass(**SLOTS)
class _Gcp:
    w: _Watch
    etag: str | None = None
    reported: bool = False

    async def step(self) -> float:
        path, timeout_s = GCP_PREEMPTED_PATH, READ_TIMEOUT_S
        if self.etag is not None:
            # last_etag: a change made after our previous read answers at once. Without it the server
            # waits for the next change, and a TRUE set in between would be seen only at timeout_sec.
            path += f"?wait_for_change=true&timeout_sec={GCP_WAIT_S}&last_etag={quote(self.etag, safe='')}"
            timeout_s = GCP_WAIT_S + READ_TIMEOUT_S
        status, body, etag = await self.w.request("GET", path, {"Metadata-Flavor": "Google"}, timeout_s)
        if status != 200:
            raise _MetadataError(f"http_{status}", f"GET {GCP_PREEMPTED_PATH}", body)
        value = body.strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise _MetadataError("bad_body", f"{GCP_PREEMPTED_PATH}: neither TRUE nor FALSE", body)
        if value == "TRUE" and not self.reported:
            self.reported = True
            self.w.notify(Notice("interruption", "gcp", self.w.clock() + GCP_NOTICE_S, "preempted"))
        self.etag = etag
        return 0.0 if etag else self.w.poll_s  # no ETag, no safe long poll: plain polling


@dataclass(**SLOTS)
class _Azure:
    w: _Watch
    woken: bool = False
    vm_name: str | None = None
    reported: set[str] = field(default_factory=set)

    async def step(self) -> float:
        headers = {"Metadata": "true"}
        # The events call comes first, even before the VM name is known: the first call is what turns
        # the service on (it is off until called, and again after 24 h without calls).
        status, body, _etag = await self.w.request(
            "GET", AZURE_EVENTS_PATH, headers, None if self.woken else AZURE_FIRST_CALL_TIMEOUT_S)
        self.woken = True
        if status != 200:
            raise _MetadataError(f"http_{status}", f"GET {AZURE_EVENTS_PATH}", body)
        events = _json_object(body, AZURE_EVENTS_PATH).get("Events")
        if not isinstance(events, list):
            raise _MetadataError("bad_body", f"{AZURE_EVENTS_PATH}: no Events list", body)
        if self.vm_name is None:
            # Events of a whole availability set or scale-set placement group reach every VM in it:
            # without our name we cannot tell ours apart, so we act on none.
            status, body, _etag = await self.w.request("GET", AZURE_NAME_PATH, headers)
            if status != 200 or not body.strip():
                raise _MetadataError(f"name_http_{status}", f"GET {AZURE_NAME_PATH}", body)
            self.vm_name = body.strip()
        ours = self.vm_name.casefold()  # Azure resource names are case-insensitive
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue  # Freeze, Reboot, Redeploy leave the VM ours; Terminate is a scale-in, not spot
            resources = event.get("Resources")
            if not isinstance(resources, list) or ours not in {str(r).casefold() for r in resources}:
                continue
            event_id = str(event.get("EventId", ""))
            if event_id not in self.reported:
                self.reported.add(event_id)
                deadline = _deadline(event.get("NotBefore"), parsedate_to_datetime)  # RFC 1123, GMT
                self.w.notify(Notice("interruption", "azure", deadline, f"Preempt {event_id}"))
        return self.w.poll_s


async def watch(source: str, on_notice: Callable[[Notice], None], *, base_url: str | None = None,
                poll_s: float | None = None, log: Callable[..., None] | None = None,
                clock: Callable[[], float] = time.time) -> None:
    """Runs until cancelled. Calls on_notice once per distinct notice. Never raises for metadata
    errors (unreachable, 5xx, garbage bodies): logs each kind once and keeps polling, backing off up
    to poll_s * ERROR_BACKOFF_FACTOR. Raises ValueError at once for an unknown source or a poll_s <= 0.
    An exception from on_notice is the caller's bug and ends the watch."""
    if source not in SOURCES:
        raise ValueError(f"unknown interruption source {source!r}: expected one of {', '.join(SOURCES)}")
    poll_s = POLL_S[source] if poll_s is None else poll_s
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, not {poll_s}")
    base = (base_url or DEFAULT_METADATA_URLS[source]).rstrip("/")
    emit = log or logline.log
    # trust_env=False: an HTTP(S)_PROXY from the environment must never carry metadata requests.
    async with aiohttp.ClientSession(trust_env=False) as http:
        w = _Watch(source, base, http, on_notice, poll_s, emit, clock)
        cloud = _Aws(w) if source == "aws" else _Gcp(w) if source == "gcp" else _Azure(w)
        emit("interruption_watch_started", source=source, base_url=base, poll_s=poll_s)
        await w.run(cloud.step)
