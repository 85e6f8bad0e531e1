"""`submit` and `run`: validate inputs locally, upload the worker, create the job, stream the tasks;
`run` then follows the job to its end (with a daemon of its own when none answers) and writes results.

A `run` attaches to its daemon (PUT /v1/runs/ID, renewed every third of the daemon's ttl;
cloudtaskd/http/runs.py). That is what lets:
- the same command started again find its unfinished job (the task file's and worker's hash, stored
  as the job's `submission`) and resume it, where it used to queue the work twice;
- the daemon hold the job of a run that is gone, instead of running it silently ahead of the next;
- several runs share one state directory: the run whose process holds the daemon stops it only
  once no other run is attached, and a run whose daemon went away (its run was killed, or stopped
  just as this one came) starts one of its own and carries on with the same job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from cloudtask_wire import jsonx
from cloudtaskd.ctl.bundle import clone_worker, load_spec, write_bundle
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.commands import events_cursor, follow_job, job_exit_status
from cloudtaskd.ctl.output import Ctx
from cloudtaskd.ctl.progress import ProgressDisplay, format_duration
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonBusy, DaemonUnavailable, NotFound, StateDirBusy

EXIT_INTERRUPTED = 130
CANCEL_TIMEOUT_S = 10.0
RESULTS_FLUSH_LINES = 1000
# How long a run keeps trying to attach to the daemon on its state directory or start its own, while
# another run's daemon holds the directory's lock (starting at the same instant, or stopping).
ATTACH_TIMEOUT_S = 60.0
LOCK_RETRY_S = 0.2
OTHERS_POLL_S = 0.5  # how often the run that holds the daemon looks whether other runs still need it
RUN_GONE = "run_gone"  # a job's pause_cause when the daemon held it because no run was attached (runs.py)
HASH_CHUNK_BYTES = 1 << 20
T = TypeVar("T")


class _Runs(Protocol):
    def close_if_alone(self, run_id: str) -> list[Any]: ...


class _Daemon(Protocol):
    """What `run` needs of cloudtaskd.daemon.Daemon (imported lazily, only when one must be embedded)."""

    @property
    def runs(self) -> _Runs: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class _RunState:
    """Resources a run holds, so an interruption at any await can still release them in order."""

    api: ApiClient | None = None
    daemon: _Daemon | None = None
    log_file: IO[str] | None = None
    job_id: int | None = None
    interrupted: bool = False
    started_at: float = field(default_factory=time.monotonic)
    # This run as the daemon knows it (cloudtaskd/http/runs.py).
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str = field(default_factory=lambda: f"pid {os.getpid()} on {socket.gethostname()}")
    ttl_s: float = 15.0  # the daemon's api.run_attach_ttl_s, as its answer to the attachment says
    attached: bool = False  # False against a daemon without /v1/runs
    daemon_embedded: bool = False  # the daemon attached to was started by a `cloudtaskctl run`
    heartbeat: asyncio.Task[None] | None = None
    exit_status: int | None = None  # set once the results are written: the run's work is done


def _check_tasks_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise BadInput(f"{raw}: {'is not a file' if path.exists() else 'no such file'} (--tasks)")
    if not os.access(path, os.R_OK):
        raise BadInput(f"{raw}: not readable (--tasks)")
    return path


def _check_results_path(raw: str) -> Path:
    # Checked before the run, not after hours of work.
    path = Path(raw)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"{raw}: directory {parent} does not exist (--results)")
    if path.is_dir():
        raise BadInput(f"{raw}: is a directory (--results)")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"{raw}: directory {parent} is not writable (--results)")
    return path


async def _prepare_worker(args: argparse.Namespace, tmp: Path) -> Path:
    """Validate the worker and pack it into a temp file; returns the bundle's path."""
    if args.worker_repo:
        worker_dir = await clone_worker(args.worker_repo, tmp / "repo", ref=args.worker_ref)
    else:
        worker_dir = Path(args.worker)
    load_spec(worker_dir)  # raises with the file and key before anything is sent
    bundle = tmp / "worker.tar.gz"

    def pack() -> None:
        with bundle.open("wb") as f:
            write_bundle(worker_dir, f)

    await asyncio.to_thread(pack)
    return bundle


def job_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job's policy from the command line; None when no flag asks for one."""
    policy: dict[str, Any] = {}
    for key in ("providers", "regions"):
        value = getattr(args, key, None)
        if value:
            policy[key] = [x.strip() for x in value.split(",") if x.strip()]
    if getattr(args, "no_spot", False):
        policy["spot"] = False
    if getattr(args, "no_on_demand_fallback", False):
        policy["on_demand_fallback"] = False
    if getattr(args, "max_price_per_hour", None):
        policy["max_price_per_hour"] = args.max_price_per_hour
    return policy or None


async def _precheck(ctx: Ctx) -> None:
    """The cheap part of `cloudtaskctl check` (config, agents' address, credentials) before a daemon
    of this run's own launches anything: a refused credential stops the run here, not after boots."""
    from cloudtaskd.fleet.check import run_checks

    results = await run_checks(ctx.config, cheap=True)
    for r in results:
        if r.status != "ok":
            ctx.note(r.line())
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        raise CloudtaskError("stopped before launching anything: " + "; ".join(
            f"{r.provider}: {r.what}: {r.detail}" for r in failed) + " (`cloudtaskctl check` checks everything)")


async def _submit(ctx: Ctx, api: ApiClient, args: argparse.Namespace, tasks: Path, bundle: Path,
                  state: _RunState | None = None, *, digest: str | None = None,
                  run: dict[str, str] | None = None) -> tuple[dict[str, Any], int]:
    if digest is None:
        digest = str((await api.upload_worker(bundle))["digest"])
    job = await api.create_job(args.name or tasks.stem, digest, max_instances=args.max_instances,
                               max_attempts=args.max_attempts, policy=job_policy(args),
                               max_total_cost=args.max_total_cost, run=run, open_=getattr(args, "open", False))
    if state is not None:
        state.job_id = job["id"]
    try:
        # source= as the user typed it, so a refusal reads "tasks.json:12: ..." about their file.
        accepted = await api.upload_tasks(job["id"], tasks, source=args.tasks)
    except CloudtaskError:
        # Nothing of the upload was queued: withdraw the empty job, so nothing of a refused submission
        # stays visible; a daemon without withdrawal (or one that refuses it) gets it cancelled instead,
        # rather than left waiting forever.
        try:
            await api.withdraw_job(job["id"])
        except CloudtaskError:
            try:
                await api.cancel_job(job["id"])
            except CloudtaskError as exc:
                ctx.note(f"could not cancel the empty job {job['id']}: {exc}")
        raise
    return job, accepted


async def cmd_submit(ctx: Ctx, args: argparse.Namespace) -> int:
    tasks = _check_tasks_file(args.tasks) if args.tasks is not None else None
    with tempfile.TemporaryDirectory(prefix="cloudtaskctl-") as tmp:
        bundle = await _prepare_worker(args, Path(tmp))
        async with ctx.client() as api:
            if tasks is None:  # --open alone: an empty standing queue, fed by `cloudtaskctl enqueue`
                digest = str((await api.upload_worker(bundle))["digest"])
                job = await api.create_job(args.name or "queue", digest, max_instances=args.max_instances,
                                           max_attempts=args.max_attempts, policy=job_policy(args),
                                           max_total_cost=args.max_total_cost, open_=True)
                accepted = 0
            else:
                job, accepted = await _submit(ctx, api, args, tasks, bundle)
            job = await api.get_job(job["id"])
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.say(str(job["id"]))
        if job.get("open"):
            ctx.note(f"job {job['id']}: open, {accepted} tasks queued; add more with `cloudtaskctl enqueue"
                     f" {job['id']} --data TASK`, end it with `cloudtaskctl close {job['id']}`")
        else:
            ctx.note(f"job {job['id']}: {accepted} tasks queued; follow it with `cloudtaskctl watch {job['id']}`")
    return 0


async def _attach(ctx: Ctx, state: _RunState, *, again: bool = False) -> ApiClient:
    """Attach to the daemon at the socket, or start one in this process for the duration of the run.
    Tried until attached (within ATTACH_TIMEOUT_S): the state directory's lock may be held by another
    run's daemon that is starting (both runs came at the same instant: it answers in a moment) or
    stopping (its run finished just as this one came: it refuses new runs, and frees the lock soon).
    again: the daemon this run used went away. Only one that another run embedded is replaced by one
    of ours; a standalone daemon (a service restarting) is waited for, never raced for its lock."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ATTACH_TIMEOUT_S
    told = False
    while True:
        if state.api is not None:
            await state.api.close()
        api = state.api = ctx.client()
        try:
            await _register(api, state)
            return api
        except DaemonUnavailable as exc:  # nobody listens, or a daemon that is stopping
            if ctx.url:
                raise  # a remote daemon is not started here
            unavailable = exc
        if again and not state.daemon_embedded:
            if loop.time() > deadline:
                raise DaemonUnavailable(f"{unavailable} (waited {ATTACH_TIMEOUT_S:g} s for it to come back)")
            if not told:
                ctx.note(f"{unavailable}: waiting for it to come back")
                told = True
            await asyncio.sleep(LOCK_RETRY_S)
            continue
        try:
            await _start_daemon(ctx, state, unavailable)
        except StateDirBusy as exc:
            if loop.time() > deadline:
                raise CloudtaskError(f"{exc}, and its control socket {ctx.config.socket_path} did not answer for"
                                     f" {ATTACH_TIMEOUT_S:g} s: is a cloudtaskd stuck there?") from None
            if not told:
                ctx.note("another cloudtaskd holds the state directory (another `cloudtaskctl run` starting or"
                         " stopping): waiting to attach to it, or to start one when it is gone")
                told = True
            await asyncio.sleep(LOCK_RETRY_S)
            continue
        await _register(api, state)
        return api


async def _register(api: ApiClient, state: _RunState) -> None:
    """Health, then attach this run (following its job, once it has one): the daemon keeps the job
    going while the run lives, and resumes it if it was held meanwhile."""
    health = await api.health()
    state.daemon_embedded = bool(health.get("embedded"))
    try:
        answer = await api.attach_run(state.run_id, state.owner, state.job_id)
    except NotFound:  # a daemon from before /v1/runs: no attachment, as before
        state.attached = False
        return
    state.attached = True
    state.ttl_s = float(answer.get("ttl_s") or state.ttl_s)


async def _start_daemon(ctx: Ctx, state: _RunState, unavailable: Exception) -> None:
    """A daemon in this process; StateDirBusy when another one holds the state directory."""
    from cloudtaskd import logs  # lazy, like the daemon: other commands never need them

    try:
        from cloudtaskd.daemon import Daemon
    except ImportError as exc:
        raise DaemonUnavailable(f"{unavailable}; and no daemon can start in this process: {exc}") from exc

    state_dir = ctx.config.state_path
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir / "cloudtaskd.log"
    if state.log_file is None:
        # The daemon's logs go to a file: lines on the terminal would tear through the progress bar.
        state.log_file = await asyncio.to_thread(log_path.open, "a")
        logs.configure(ctx.config.log_level, state.log_file)
        logs.log_config_warnings(ctx.config)
    # embedded: every other run's unfinished job is held at once, before it takes the fleet.
    # Set before start(): a half-started daemon must be stopped too.
    daemon = state.daemon = Daemon(ctx.config, embedded=True)
    try:
        await daemon.start()
    except StateDirBusy:
        state.daemon = None  # refused at the lock, before anything started
        raise
    if state.job_id is None:
        ctx.note(f"no daemon at {ctx.config.socket_path}; running one in this process (log: {log_path})")
    else:
        ctx.note(f"the daemon went away ({unavailable}); running one in this process (log: {log_path})"
                 f" and carrying on with job {state.job_id}")


async def _heartbeat(state: _RunState) -> None:
    """Renew the attachment every third of the ttl. A daemon that does not answer is the main
    loop's business (it starts another); this only keeps trying."""
    while True:
        await asyncio.sleep(max(0.2, state.ttl_s / 3))
        if state.api is None or not state.attached:
            continue
        with contextlib.suppress(CloudtaskError):  # DaemonUnavailable, DaemonBusy: the main loop sees them too
            await state.api.attach_run(state.run_id, state.owner, state.job_id)


async def _carrying_on(ctx: Ctx, state: _RunState, step: Callable[[ApiClient], Awaitable[T]]) -> T:
    """`step` against the daemon; when the daemon goes away in the middle (the run that held it was
    killed), attach again (starting a daemon here if none answers) and do the step again."""
    while True:
        assert state.api is not None
        try:
            return await step(state.api)
        except (DaemonUnavailable, DaemonBusy) as exc:
            if ctx.url or (isinstance(exc, DaemonBusy) and "dropped" not in str(exc)):
                raise
            await _attach(ctx, state, again=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _submission(tasks_sha256: str, worker_digest: str) -> str:
    """What makes two runs the same submission: the task file's bytes and the worker bundle's digest
    (a --worker-repo clone of the same commit packs to the same digest)."""
    return hashlib.sha256(f"tasks {tasks_sha256}\nworker {worker_digest}\n".encode()).hexdigest()


def _done_of(job: dict[str, Any]) -> tuple[int, int]:
    c = job["counts"]
    return int(c.get("succeeded", 0)) + int(c.get("dead", 0)) + int(c.get("cancelled", 0)), int(c.get("total", 0))


async def _resume_or_submit(ctx: Ctx, api: ApiClient, args: argparse.Namespace, state: _RunState, tasks: Path,
                            bundle: Path, tasks_sha256: str) -> tuple[dict[str, Any], bool]:
    """The unfinished job of this very submission (same task file, same worker) when there is one
    and --fresh is not given, attached and resumed; else a new job. Returns (job, resumed)."""
    digest = str((await api.upload_worker(bundle))["digest"])  # content-addressed: no copy if it is there
    submission = _submission(tasks_sha256, digest)
    if state.job_id is not None:  # the daemon went away in the middle of this run's own submission
        with contextlib.suppress(CloudtaskError):
            job = await api.get_job(state.job_id)
            if job["counts"]["total"]:
                return await _follow_again(api, state, job), False
            await api.withdraw_job(state.job_id)  # its upload never committed
        state.job_id = None
    # A daemon without /v1/runs knows no submissions either (it would ignore the filter): no lookup.
    found = await api.list_jobs(submission=submission) if state.attached else []
    earlier = [j for j in found if j.get("submission") == submission and not j.get("done")
               and j["state"] != "cancelled"]
    for j in [j for j in earlier if not j["counts"]["total"]]:
        # An earlier run that died while its tasks uploaded: nothing of it was queued.
        with contextlib.suppress(CloudtaskError):
            await api.withdraw_job(j["id"])
    earlier = [j for j in earlier if j["counts"]["total"]]
    others = {r["job"]: r for r in await _other_runs(api, state)}
    if earlier and not args.fresh:
        job = earlier[0]  # the newest
        done, total = _done_of(job)
        other = others.get(job["id"])
        if other is not None:
            ctx.note(f"job {job['id']} ({done} of {total} done) of the same tasks and worker is being followed by"
                     f" another `cloudtaskctl run` ({other['owner']}): following it too; --fresh to start over")
        else:
            ctx.note(f"resuming job {job['id']} ({done} of {total} done) from an earlier run; --fresh to start over")
        job = await _follow_again(api, state, job)
        if job["state"] == "paused" and job.get("pause_cause") != RUN_GONE:
            ctx.note(f"job {job['id']} {job.get('state_reason') or 'is paused'}")
        return job, True
    for j in earlier:  # --fresh: the earlier attempt at the same work goes, unless a live run follows it
        other = others.get(j["id"])
        if other is not None:
            ctx.note(f"--fresh: job {j['id']} of the same tasks and worker is left running: another"
                     f" `cloudtaskctl run` ({other['owner']}) follows it")
            continue
        await api.cancel_job(j["id"])
        done, total = _done_of(j)
        ctx.note(f"--fresh: cancelled job {j['id']} ({done} of {total} done), an earlier run of the same tasks and"
                 " worker; starting over")
    run = {"id": state.run_id, "owner": state.owner, "submission": submission}
    job, accepted = await _submit(ctx, api, args, tasks, bundle, state, digest=digest, run=run)
    with contextlib.suppress(NotFound):
        await api.attach_run(state.run_id, state.owner, job["id"])
    if not ctx.json:
        ctx.note(f"job {job['id']}: {accepted} tasks queued")
    return job, False


async def _follow_again(api: ApiClient, state: _RunState, job: dict[str, Any]) -> dict[str, Any]:
    """Attach to an existing job (which resumes it if the daemon held it) and read it anew."""
    state.job_id = job["id"]
    if state.attached:
        await api.attach_run(state.run_id, state.owner, job["id"])
    return await api.get_job(job["id"])


async def _other_runs(api: ApiClient, state: _RunState) -> list[dict[str, Any]]:
    if not state.attached:
        return []
    return [r for r in await api.list_runs() if r["id"] != state.run_id]


async def _report_held(ctx: Ctx, api: ApiClient, state: _RunState) -> None:
    """Name the jobs of earlier runs that are gone: held, not run, and what to do about them."""
    for j in await api.list_jobs():
        if j["id"] == state.job_id or j["state"] != "paused" or j.get("pause_cause") != RUN_GONE:
            continue
        done, total = _done_of(j)
        owner = (j.get("run") or {}).get("owner")
        ctx.note(f"job {j['id']} ({j['name']}, {done} of {total} done) was left by an earlier `cloudtaskctl run`"
                 f"{f' ({owner})' if owner else ''} that is gone; it is held, not run: `cloudtaskctl resume {j['id']}`"
                 f" lets it go on, `cloudtaskctl cancel {j['id']}` drops it")


async def _follow(ctx: Ctx, state: _RunState, display: ProgressDisplay, failures_after: int | None) -> dict[str, Any]:
    """Follow this run's job to its end, through a daemon that went away and one that held the job
    while this run could not renew its attachment (a stopped process, a daemon started anew)."""
    assert state.job_id is not None
    job_id = state.job_id
    cursor = failures_after
    while True:
        assert state.api is not None
        try:
            job = await follow_job(state.api, job_id, display, failures_after=cursor)
        except (DaemonUnavailable, DaemonBusy) as exc:
            if ctx.url or (isinstance(exc, DaemonBusy) and "dropped" not in str(exc)):
                raise
            await _attach(ctx, state, again=True)  # attached with job_id: a job held meanwhile goes on
            # The new daemon held the jobs of runs that are gone with the old one: say which.
            await _carrying_on(ctx, state, lambda api: _report_held(ctx, api, state))
            cursor = None
            continue
        if job["state"] == "paused" and job.get("pause_cause") == RUN_GONE and state.attached:
            await _carrying_on(ctx, state, lambda api: api.attach_run(state.run_id, state.owner, job_id))
            continue
        return job


async def _wait_for_other_runs(ctx: Ctx, state: _RunState) -> None:
    """The daemon this run holds stays while other runs attached to it have work: stopping it
    would leave their jobs without a daemon (they would start one of their own, but only after
    their fleet was put away with this one)."""
    assert state.daemon is not None
    shown: set[str] = set()
    while True:
        others = state.daemon.runs.close_if_alone(state.run_id)
        if not others:
            return
        ids = {r.id for r in others}
        if ids - shown:
            what = "; ".join(f"{r.owner}" + (f", job {r.job_id}" if r.job_id is not None else "") for r in others)
            ctx.note(f"waiting for {len(others)} other `cloudtaskctl run` attached to this run's daemon before"
                     f" stopping it: {what} (Ctrl-C stops it now; they carry on with a daemon of their own)")
        shown = ids
        await asyncio.sleep(OTHERS_POLL_S)


def _result_record(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": result["id"], "status": result["status"]}
    if result["status"] == "succeeded":
        out["result"] = result.get("result")
    else:
        out["error"] = result.get("error")
    out.update(attempts=result.get("attempts"), instance=result.get("instance"), duration_s=result.get("duration_s"))
    return out


async def _write_results(api: ApiClient, job_id: int, path: Path) -> int:
    """Stream results into a temp file beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = await asyncio.to_thread(tmp.open, "w")
    n = 0
    try:
        lines: list[str] = []
        async for result in api.results(job_id):
            lines.append(jsonx.dumps(_result_record(result)) + "\n")
            n += 1
            if len(lines) >= RESULTS_FLUSH_LINES:
                await asyncio.to_thread(f.writelines, lines)
                lines = []
        await asyncio.to_thread(f.writelines, lines)
        await asyncio.to_thread(f.close)
        await asyncio.to_thread(os.replace, tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    return n


def _summary(job: dict[str, Any], elapsed_s: float, results: Path) -> str:
    c = job["counts"]
    line = (f"job {job['id']}: {c.get('succeeded', 0)} succeeded, {c.get('dead', 0)} dead, "
            f"{c.get('cancelled', 0)} cancelled in {format_duration(elapsed_s)}; results in {results}")
    if job.get("state") == "paused":
        line += f"\njob {job['id']} {job.get('state_reason') or 'paused'}"
    return line


async def _run(ctx: Ctx, args: argparse.Namespace, state: _RunState) -> int:
    tasks = _check_tasks_file(args.tasks)
    results = _check_results_path(args.results)
    with tempfile.TemporaryDirectory(prefix="cloudtaskctl-") as tmp:
        bundle = await _prepare_worker(args, Path(tmp))
        tasks_sha256 = await asyncio.to_thread(_sha256_file, tasks)
        api = await _attach(ctx, state)
        state.heartbeat = asyncio.get_running_loop().create_task(_heartbeat(state), name="run_heartbeat")
        if state.daemon is not None:
            await _precheck(ctx)
        # Taken before the job exists: a launch that fails while the tasks upload is shown too.
        failures_after: int | None = None
        with contextlib.suppress(NotFound):  # a daemon without an events API
            failures_after = await events_cursor(api)
        job, resumed = await _carrying_on(
            ctx, state, lambda api: _resume_or_submit(ctx, api, args, state, tasks, bundle, tasks_sha256))
    await _carrying_on(ctx, state, lambda api: _report_held(ctx, api, state))
    job = await _follow(ctx, state, ProgressDisplay(ctx.err), failures_after)
    written = await _carrying_on(ctx, state, lambda api: _write_results(api, job["id"], results))
    elapsed_s = time.monotonic() - state.started_at
    if ctx.json:
        ctx.emit_json({"job": job, "results": str(results), "written": written, "elapsed_s": round(elapsed_s, 3),
                       "resumed": resumed})
    else:
        ctx.say(_summary(job, elapsed_s, results))
    state.exit_status = job_exit_status(job)
    if state.daemon is not None:
        await _wait_for_other_runs(ctx, state)
    return state.exit_status


async def cmd_run(ctx: Ctx, args: argparse.Namespace) -> int:
    state = _RunState()
    loop = asyncio.get_running_loop()
    body = asyncio.current_task()
    assert body is not None

    def on_sigint() -> None:
        state.interrupted = True
        # Only the first Ctrl-C is ours: a second one falls through to Python's default and
        # aborts the clean-up, for whoever does not want to wait for it.
        loop.remove_signal_handler(signal.SIGINT)
        body.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handler_installed = True
    except (RuntimeError, ValueError):
        handler_installed = False  # not the main thread (embedded in another program): plain Ctrl-C
    try:
        return await _run(ctx, args, state)
    except asyncio.CancelledError:
        if not state.interrupted:
            raise
        body.uncancel()
        if ctx.err.isatty():
            ctx.err.write("\n")  # end the progress line
        if state.exit_status is not None:  # interrupted while waiting for other runs: this one is done
            ctx.note("interrupted: stopping this run's daemon; the other runs carry on with one of their own")
            return state.exit_status
        if state.job_id is not None and state.api is not None:
            ctx.note(f"interrupted: cancelling job {state.job_id}")
            try:
                # Asked once: if the daemon does not answer, the job is left to `cloudtaskctl cancel`.
                await asyncio.wait_for(state.api.cancel_job(state.job_id), CANCEL_TIMEOUT_S)
            except (CloudtaskError, TimeoutError) as exc:
                ctx.note(f"could not cancel job {state.job_id}: {exc or 'no answer'}")
        else:
            ctx.note("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if handler_installed and not state.interrupted:
            loop.remove_signal_handler(signal.SIGINT)
        await _release(ctx, state)


async def _release(ctx: Ctx, state: _RunState) -> None:
    try:
        if state.heartbeat is not None:
            state.heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.heartbeat
        if state.api is not None:
            if state.attached and state.daemon is None:
                # Detached at once: the run holding the daemon need not wait out our ttl to stop it.
                with contextlib.suppress(CloudtaskError):
                    await asyncio.wait_for(state.api.detach_run(state.run_id), CANCEL_TIMEOUT_S)
            await state.api.close()
        if state.daemon is not None:
            if state.interrupted:
                ctx.note("stopping the embedded daemon (Ctrl-C again to abort)")
            await state.daemon.stop()
    finally:
        if state.log_file is not None:
            from cloudtaskd import logs

            # Point logging away from the file before closing it: a late line must not hit a closed file.
            logs.configure(ctx.config.log_level, sys.stderr)
            state.log_file.close()
