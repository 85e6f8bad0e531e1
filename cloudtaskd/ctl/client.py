"""ApiClient: one async method per endpoint of the control API (docs/api.md), over the unix socket.

Error bodies become `cloudtaskd.errors` exceptions so callers never look at status codes, and a
socket nobody answers on becomes DaemonUnavailable (the `run` command starts its own daemon then).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from agent import jsonx
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonUnavailable, NotFound

BASE_URL = "http://cloudtaskd"
UPLOAD_CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0
RATE_LIMIT_RETRIES = 5


async def _file_chunks(path: Path, chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> AsyncIterator[bytes]:
    """The file in chunks, read in a thread: task files can be far larger than memory."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, chunk_bytes):
            yield chunk
    finally:
        f.close()


def _error_from(status: int, body: bytes, path: str) -> CloudtaskError:
    info: dict[str, Any] = {}
    try:
        parsed = jsonx.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            info = parsed["error"]
    except ValueError:
        pass  # not our JSON error body (e.g. aiohttp's own 404 for an unknown route): use the text
    message = str(info.get("message") or body.decode(errors="replace").strip() or f"HTTP {status} from {path}")
    if status == 400:
        line = info.get("line")
        field = info.get("field")
        return BadInput(message, line=line if isinstance(line, int) else None,
                        field=field if isinstance(field, str) else None)
    if status == 404:
        return NotFound(message)
    if status == 401:
        return CloudtaskError(f"{message} — set CLOUDTASK_API_TOKEN (or --token-file) to the daemon's api.token")
    return CloudtaskError(message)


class ApiClient:
    """A client of one daemon. Use as `async with ApiClient(path) as api:`."""

    def __init__(self, socket_path: str | Path, *, url: str = "", token: str = "",
                 ca_file: Path | None = None) -> None:
        """The unix socket, or with `url` (https://host:port) the daemon's TCP listener: TLS,
        trusting `ca_file` (the daemon's CA) if given, and the bearer `token`."""
        self.socket_path = Path(socket_path)
        self.url = url.rstrip("/")
        self.base = self.url or BASE_URL
        self._headers = {"Authorization": f"Bearer {token}"} if url and token else {}
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use so the client can be built outside a running loop.
        if self._session is None:
            # No total timeout: uploads of big task files and result streams legitimately take long.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
            connector: aiohttp.BaseConnector
            if self.url:
                ssl_ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
                connector = aiohttp.TCPConnector(ssl=ssl_ctx)
            else:
                connector = aiohttp.UnixConnector(path=str(self.socket_path))
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers)
        return self._session

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return DaemonUnavailable(f"cloudtaskd is not reachable at {self.url or self.socket_path}: {reason}")

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    json: Any = None, data: Any = None, headers: dict[str, str] | None = None) -> Any:
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                async with self._http().request(method, self.base + path, params=params, json=json, data=data,
                                                headers=headers) as resp:
                    body = await resp.read()
                    if resp.status == 429 and attempt < RATE_LIMIT_RETRIES and not isinstance(data, AsyncIterator):
                        # Over the daemon's rate limit: wait as told, then again (a stream cannot be resent).
                        await asyncio.sleep(min(10.0, float(resp.headers.get("Retry-After", "1"))))
                        continue
                    if resp.status >= 300:
                        raise _error_from(resp.status, body, path)
                    return jsonx.loads(body) if body else None
            except aiohttp.ClientConnectionError as exc:
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    # ---- endpoints --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/health")
        return result

    async def upload_worker(self, bundle: Path | bytes) -> dict[str, Any]:
        """Upload a gzip'd tar (a file is streamed, not read whole); returns {"digest", "spec"}."""
        data = _file_chunks(bundle) if isinstance(bundle, Path) else bundle
        result: dict[str, Any] = await self._call("POST", "/v1/workers", data=data,
                                                  headers={"Content-Type": "application/gzip"})
        return result

    async def create_job(self, name: str, worker: str, *, max_instances: int | None = None,
                         max_attempts: int | None = None, timeout_s: float | None = None,
                         policy: dict[str, Any] | None = None, max_total_cost: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "worker": worker}
        for key, value in (("max_instances", max_instances), ("max_attempts", max_attempts),
                           ("timeout_s", timeout_s), ("policy", policy), ("max_total_cost", max_total_cost)):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", json=body)
        return result

    async def upload_tasks(self, job_id: int, tasks_file: Path, *, source: str | None = None) -> int:
        """Stream a task file; returns how many tasks were accepted. `source` names it in errors."""
        params = {"source": source if source is not None else tasks_file.name}
        result = await self._call("POST", f"/v1/jobs/{job_id}/tasks", params=params, data=_file_chunks(tasks_file),
                                  headers={"Content-Type": "application/octet-stream"})
        return int(result["accepted"])

    async def list_jobs(self) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/jobs")
        jobs: list[dict[str, Any]] = result["jobs"]
        return jobs

    async def get_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def cancel_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    async def resume_job(self, job_id: int, *, max_total_cost: float | None = None) -> dict[str, Any]:
        body = {"max_total_cost": max_total_cost} if max_total_cost is not None else {}
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/resume", json=body)
        return result

    async def retry_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/retry")
        return result

    async def list_tasks(self, job_id: int, *, state: str | None = None, limit: int | None = None,
                         after: int | None = None) -> list[dict[str, Any]]:
        params = {k: str(v) for k, v in (("state", state), ("limit", limit), ("after", after)) if v is not None}
        result = await self._call("GET", f"/v1/jobs/{job_id}/tasks", params=params)
        tasks: list[dict[str, Any]] = result["tasks"]
        return tasks

    async def results(self, job_id: int, *, top: int | None = None,
                      after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Result objects as the daemon streams them; memory stays flat however many there are."""
        params = {k: str(v) for k, v in (("top", top), ("after", after)) if v is not None}
        path = f"/v1/jobs/{job_id}/results"
        try:
            async with self._http().get(self.base + path, params=params) as resp:
                if resp.status >= 300:
                    raise _error_from(resp.status, await resp.read(), path)
                # Split lines ourselves: StreamReader.readline refuses lines over its buffer limit,
                # and a task's result can be large. A line's parts are joined once, when it ends.
                parts: list[bytes] = []
                async for chunk in resp.content.iter_any():
                    if b"\n" not in chunk:
                        parts.append(chunk)
                        continue
                    head, *lines, tail = chunk.split(b"\n")
                    parts.append(head)
                    for line in (b"".join(parts), *lines):
                        if line.strip():
                            yield jsonx.loads(line)
                    parts = [tail]
                last = b"".join(parts)
                if last.strip():
                    yield jsonx.loads(last)
        except aiohttp.ClientConnectionError as exc:
            raise self._unavailable(exc) from exc

    async def list_instances(self, *, include_stopped: bool = False) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/instances", params={"all": "1"} if include_stopped else None)
        instances: list[dict[str, Any]] = result["instances"]
        return instances

    async def instance_logs(self, instance_id: str) -> str:
        """The bootstrap (and local agent) log the daemon kept for an instance, as text."""
        path = f"/v1/instances/{quote(instance_id, safe='')}/logs"
        try:
            async with self._http().get(self.base + path) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise _error_from(resp.status, body, path)
                return body.decode(errors="replace")
        except aiohttp.ClientConnectionError as exc:
            raise self._unavailable(exc) from exc

    async def cost(self, job_id: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/cost" if job_id is None else f"/v1/jobs/{job_id}/cost")
        return result

    async def refresh_catalog(self) -> list[dict[str, Any]]:
        result = await self._call("POST", "/v1/catalog/refresh")
        providers: list[dict[str, Any]] = result["providers"]
        return providers

    async def catalog(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/catalog")
        return result

    async def prices(self, params: dict[str, str]) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/prices", params=params)
        candidates: list[dict[str, Any]] = result["candidates"]
        return candidates

    async def interruptions(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/interruptions")
        return result

    async def drain_instance(self, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/instances/{quote(instance_id, safe='')}/drain")
        return result

    async def events(self, *, after: int | None = None, limit: int | None = None,
                     job_id: int | None = None) -> list[dict[str, Any]]:
        params = {k: str(v) for k, v in (("after", after), ("limit", limit), ("job", job_id)) if v is not None}
        result = await self._call("GET", "/v1/events", params=params)
        events: list[dict[str, Any]] = result["events"]
        return events

    async def events_page(self, *, after: int | None = None, tail: int | None = None, limit: int | None = None,
                          job_id: int | None = None, instance: str | None = None,
                          wait_s: float | None = None) -> dict[str, Any]:
        """{"events": [...], "next": cursor}: events after a cursor (held up to wait_s for new ones),
        or the newest `tail`."""
        params = {k: str(v) for k, v in (("after", after), ("tail", tail), ("limit", limit), ("job", job_id),
                                         ("instance", instance), ("wait", wait_s)) if v is not None}
        result: dict[str, Any] = await self._call("GET", "/v1/events", params=params)
        return result
