"""ApiClient: one async method per endpoint of the control API (docs/api.md), over the unix socket.

Error bodies become `cloudtaskd.errors` exceptions so callers never look at status codes. Busy is
not down: a 429 or 503 with Retry-After is waited out and sent again, as are connections the daemon
could not take or dropped (a full accept queue, a reset) and answers that took too long, all within
BUSY_BUDGET_S; only then does a call fail, with DaemonBusy. A socket nobody listens on (no file,
connection refused) is DaemonUnavailable at once: the `run` command starts its own daemon then.
"""

from __future__ import annotations

import asyncio
import errno
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from cloudtask_wire import jsonx
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonBusy, DaemonStopping, DaemonUnavailable, NotFound

BASE_URL = "http://cloudtaskd"
UPLOAD_CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # no byte for this long: the daemon is stuck or swamped (a follow stream gets one every 10 s)
BUSY_BUDGET_S = 120.0  # how long a call keeps trying a busy daemon before it gives up (DaemonBusy)
RETRY_AFTER_MAX_S = 30.0  # a Retry-After longer than this is waited this long, then asked again
RETRY_FIRST_S = 0.2  # the first pause after a dropped connection; doubled each time up to RETRY_MAX_S
RETRY_MAX_S = 5.0
RESTART_GRACE_S = 30.0  # a follow stream whose daemon went away waits this long for it to come back
# connect() errors that mean nobody listens: the daemon is down (or not started), not busy.
DOWN_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES})
# Resent after any failure: these change nothing. Others are resent only if the request never left.
SAFE_METHODS = frozenset({"GET", "HEAD"})
Body = Callable[[], Any]  # makes the request body anew for each attempt (a stream can be sent once)
# No total timeout: uploads of big task files and result streams legitimately take long. A read
# that waits READ_TIMEOUT_S for a byte is a daemon too busy to answer.
CALL_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
# A relayed read (`cloudtaskctl status-page`): the browser asks again in a few seconds anyway.
RELAY_TIMEOUT = aiohttp.ClientTimeout(total=15.0, sock_connect=CONNECT_TIMEOUT_S)
# Uploads: the answer comes once the whole file is committed, which can take long on a big one.
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=None)


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
    if status == 503 and info.get("type") == "DaemonStopping":
        return DaemonStopping(message)
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
            timeout = CALL_TIMEOUT
            connector: aiohttp.BaseConnector
            if self.url:
                ssl_ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
                connector = aiohttp.TCPConnector(ssl=ssl_ctx)
            else:
                connector = aiohttp.UnixConnector(path=str(self.socket_path))
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers)
        return self._session

    def _where(self) -> str:
        return str(self.url or self.socket_path)

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return DaemonUnavailable(f"cloudtaskd is not reachable at {self._where()}: {reason}")

    def _busy(self, what: str, why: str) -> DaemonBusy:
        return DaemonBusy(f"cloudtaskd at {self._where()} is running but busy: {what} gave up after"
                          f" {BUSY_BUDGET_S:g} s ({why}); try again in a moment")

    @asynccontextmanager
    async def _open(self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None,
                    body: Body | None = None, headers: dict[str, str] | None = None,
                    timeout: aiohttp.ClientTimeout | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to a request, status < 300, sent again while the daemon is busy (see the module)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_BUDGET_S
        pause = RETRY_FIRST_S
        what = f"{method} {path}"
        while True:
            try:
                resp = await self._http().request(method, self.base + path, params=params, json=json,
                                                  data=body() if body is not None else None, headers=headers,
                                                  timeout=timeout or CALL_TIMEOUT)
            except aiohttp.ClientConnectorError as exc:
                if exc.os_error.errno in DOWN_ERRNOS:
                    raise self._unavailable(exc) from exc
                # Nothing was sent: the accept queue was full (EAGAIN, ENOTCONN on a unix socket) or the
                # connect timed out. Any request may go again.
                why = exc.os_error.strerror or str(exc)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, TimeoutError) as exc:
                why = getattr(exc, "strerror", None) or str(exc) or f"no answer in {READ_TIMEOUT_S:g} s"
                if method not in SAFE_METHODS:
                    raise DaemonBusy(f"cloudtaskd at {self._where()} dropped {what} ({why}): it may or may not"
                                     " have been done; check before sending it again") from exc
            else:
                if resp.status in (429, 503) and "Retry-After" in resp.headers:
                    # Refused before any work (over the rate limit, too many requests at once): wait as told.
                    raw = await resp.read()
                    resp.release()
                    why = str(_error_from(resp.status, raw, path))
                    try:
                        wait = min(RETRY_AFTER_MAX_S, max(0.0, float(resp.headers["Retry-After"])))
                    except ValueError:
                        wait = 1.0
                    wait += random.uniform(0, 0.25 * wait + 0.05)  # many clients told the same must not return at once
                    if loop.time() + wait > deadline:
                        raise self._busy(what, why)
                    await asyncio.sleep(wait)
                    continue
                if resp.status >= 300:
                    raw = await resp.read()
                    resp.release()
                    raise _error_from(resp.status, raw, path)
                try:
                    yield resp
                finally:
                    resp.release()
                return
            if loop.time() + pause > deadline:
                raise self._busy(what, why)
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))
            pause = min(RETRY_MAX_S, pause * 2)

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    json: Any = None, body: Body | None = None, headers: dict[str, str] | None = None,
                    timeout: aiohttp.ClientTimeout | None = None) -> Any:
        async with self._open(method, path, params=params, json=json, body=body, headers=headers,
                              timeout=timeout) as resp:
            try:
                raw = await resp.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise DaemonBusy(f"cloudtaskd at {self._where()} cut its answer to {method} {path}: {exc}") from exc
            return jsonx.loads(raw) if raw else None

    async def _lines(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """The JSON lines of a streamed answer. A cut stream raises aiohttp's error (ClientPayloadError,
        a disconnect, a read timeout): the caller knows how to resume it."""
        async with self._open("GET", path, params=params) as resp:
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

    async def relay(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        """GET `path` once, as it is: (status, body, headers), whatever the status. For
        `cloudtaskctl status-page`, whose page polls again on its own: no busy retries here.
        Raises DaemonUnavailable, or DaemonBusy when the daemon dropped the request or took too long."""
        try:
            async with self._http().get(self.base + path, timeout=RELAY_TIMEOUT) as resp:
                return resp.status, await resp.read(), dict(resp.headers)
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno in DOWN_ERRNOS:
                raise self._unavailable(exc) from exc
            raise DaemonBusy(f"cloudtaskd at {self._where()} did not take the connection: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DaemonBusy(f"cloudtaskd at {self._where()} did not answer GET {path}:"
                             f" {str(exc) or type(exc).__name__}") from exc

    # ---- endpoints --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/health")
        return result

    async def upload_worker(self, bundle: Path | bytes) -> dict[str, Any]:
        """Upload a gzip'd tar (a file is streamed, not read whole); returns {"digest", "spec"}."""
        body: Body = (lambda: _file_chunks(bundle)) if isinstance(bundle, Path) else (lambda: bundle)
        result: dict[str, Any] = await self._call("POST", "/v1/workers", body=body,
                                                  headers={"Content-Type": "application/gzip"}, timeout=UPLOAD_TIMEOUT)
        return result

    async def create_job(self, name: str, worker: str, *, max_instances: int | None = None,
                         max_attempts: int | None = None, timeout_s: float | None = None,
                         policy: dict[str, Any] | None = None, max_total_cost: float | None = None,
                         run: dict[str, str] | None = None, open_: bool = False) -> dict[str, Any]:
        """run: {"id", "owner", "submission"} of the `cloudtaskctl run` submitting it (cloudtaskd/http/runs.py);
        open_: a standing queue, active until closed (close_job)."""
        body: dict[str, Any] = {"name": name, "worker": worker}
        if open_:
            body["open"] = True
        for key, value in (("max_instances", max_instances), ("max_attempts", max_attempts),
                           ("timeout_s", timeout_s), ("policy", policy), ("max_total_cost", max_total_cost),
                           ("run", run)):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", json=body)
        return result

    async def upload_tasks(self, job_id: int, tasks_file: Path, *, source: str | None = None) -> int:
        """Stream a task file; returns how many tasks were accepted. `source` names it in errors."""
        params = {"source": source if source is not None else tasks_file.name}
        result = await self._call("POST", f"/v1/jobs/{job_id}/tasks", params=params,
                                  body=lambda: _file_chunks(tasks_file),
                                  headers={"Content-Type": "application/octet-stream"}, timeout=UPLOAD_TIMEOUT)
        return int(result["accepted"])

    async def enqueue(self, job_id: int, task: bytes, *, copies: int | None = None) -> dict[str, Any]:
        """One task object (JSON text) queued in the job: {"id", "key"}; with copies, that many
        copies: {"ids", "keys"}."""
        params = {"copies": str(copies)} if copies is not None else None
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/tasks", params=params,
                                                  body=lambda: task, headers={"Content-Type": "application/json"})
        return result

    async def close_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/close")
        return result

    async def status(self) -> dict[str, Any]:
        """The status page's data: recent jobs, live instances, cost, errors, the daemon and its database."""
        result: dict[str, Any] = await self._call("GET", "/v1/status")
        return result

    async def list_jobs(self, *, submission: str | None = None) -> list[dict[str, Any]]:
        """The newest jobs; with `submission`, only those `cloudtaskctl run` submitted with that hash."""
        result = await self._call("GET", "/v1/jobs", params={"submission": submission} if submission else None)
        jobs: list[dict[str, Any]] = result["jobs"]
        return jobs

    async def attach_run(self, run_id: str, owner: str, job_id: int | None) -> dict[str, Any]:
        """Register (or renew) a `cloudtaskctl run` with the daemon; {"ttl_s", "resumed", "runs"}."""
        result: dict[str, Any] = await self._call("PUT", f"/v1/runs/{quote(run_id, safe='')}",
                                                  json={"owner": owner, "job": job_id})
        return result

    async def detach_run(self, run_id: str) -> None:
        await self._call("DELETE", f"/v1/runs/{quote(run_id, safe='')}")

    async def list_runs(self) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/runs")
        runs: list[dict[str, Any]] = result["runs"]
        return runs

    async def get_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def cancel_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    async def withdraw_job(self, job_id: int) -> None:
        """Remove a job that never received a task (its upload refused)."""
        await self.delete_job(job_id)

    async def delete_job(self, job_id: int) -> dict[str, Any]:
        """Delete a job that is over, with its tasks, results and events (refused while it has
        unfinished tasks: cancel it first)."""
        result: dict[str, Any] = await self._call("DELETE", f"/v1/jobs/{job_id}")
        return result

    async def resume_job(self, job_id: int, *, max_total_cost: float | None = None) -> dict[str, Any]:
        body = {"max_total_cost": max_total_cost} if max_total_cost is not None else {}
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/resume", json=body)
        return result

    async def retry_job(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/retry")
        return result

    async def list_tasks(self, job_id: int, *, state: str | None = None, limit: int | None = None,
                         after: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """One page of a job's tasks, and the `after` of the next page (None: this was the last)."""
        params = {k: str(v) for k, v in (("state", state), ("limit", limit), ("after", after)) if v is not None}
        result = await self._call("GET", f"/v1/jobs/{job_id}/tasks", params=params)
        tasks: list[dict[str, Any]] = result["tasks"]
        following = result.get("next")
        return tasks, int(following) if following is not None else None

    async def results(self, job_id: int, *, top: int | None = None,
                      after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Result objects as the daemon streams them; memory stays flat however many there are. A stream
        in task order that breaks is resumed after the last task received: nothing twice, nothing lost."""
        path = f"/v1/jobs/{job_id}/results"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_BUDGET_S
        resumable = True
        while True:
            params = {k: str(v) for k, v in (("top", top), ("after", after)) if v is not None}
            try:
                async for result in self._lines(path, params):
                    if top is None and isinstance(result.get("task"), int):
                        after = result["task"]
                        deadline = loop.time() + BUSY_BUDGET_S  # progress: the budget starts again
                    else:
                        resumable = False  # newest first, or lines without their rowid: no cursor
                    yield result
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                if not resumable or loop.time() + RETRY_MAX_S > deadline:
                    raise DaemonBusy(f"cloudtaskd at {self._where()} cut the results of job {job_id}: {exc}") from exc
                await asyncio.sleep(RETRY_FIRST_S)

    async def follow_results(self, job_id: int, *, cursor: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Each result as its task finishes (in that order), until the job is finished: one stream the
        daemon feeds from one read per job for all its followers. A stream that breaks, or a daemon that
        restarts, is resumed from the cursor of the last line received (its `seq`): nothing twice,
        nothing lost. The `seq` is taken out of the results yielded."""
        path = f"/v1/jobs/{job_id}/results"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_BUDGET_S
        down_since: float | None = None
        pause = RETRY_FIRST_S
        while True:
            try:
                async for result in self._lines(path, {"follow": "1", "cursor": str(cursor)}):
                    cursor = int(result.pop("seq"))
                    deadline, down_since, pause = loop.time() + BUSY_BUDGET_S, None, RETRY_FIRST_S
                    yield result
                return  # ended cleanly: the job is finished
            except DaemonUnavailable:
                # Gone (a restart?): give it a moment to come back, then say it is down.
                down_since = down_since or loop.time()
                if loop.time() - down_since > RESTART_GRACE_S:
                    raise
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                if loop.time() + pause > deadline:
                    raise self._busy(f"following the results of job {job_id}", str(exc)) from exc
            await asyncio.sleep(pause)
            pause = min(RETRY_MAX_S, pause * 2)

    async def list_instances(self, *, include_stopped: bool = False) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/instances", params={"all": "1"} if include_stopped else None)
        instances: list[dict[str, Any]] = result["instances"]
        return instances

    async def instance_logs(self, instance_id: str) -> str:
        """The bootstrap (and local agent) log the daemon kept for an instance, as text."""
        path = f"/v1/instances/{quote(instance_id, safe='')}/logs"
        async with self._open("GET", path) as resp:
            return (await resp.read()).decode(errors="replace")

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

    async def prices(self, params: dict[str, str]) -> dict[str, Any]:
        """{"candidates": [...], "why": reason when there is none}."""
        result: dict[str, Any] = await self._call("GET", "/v1/prices", params=params)
        return result

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
                          wait_s: float | None = None, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
        """{"events": [...], "next": cursor}: events after a cursor (held up to wait_s for new ones),
        or the newest `tail`; only these `kinds` when given."""
        params = {k: str(v) for k, v in (("after", after), ("tail", tail), ("limit", limit), ("job", job_id),
                                         ("instance", instance), ("wait", wait_s)) if v is not None}
        if kinds:
            params["kind"] = ",".join(kinds)
        result: dict[str, Any] = await self._call("GET", "/v1/events", params=params)
        return result
