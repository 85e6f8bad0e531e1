"""`submit` and `run`: validate inputs locally, upload the worker, create the job, stream the tasks;
`run` then follows the job to its end (with a daemon of its own when none answers) and writes results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from cloudtask_wire import jsonx
from cloudtaskd.ctl.bundle import clone_worker, load_spec, write_bundle
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.commands import events_cursor, follow_job, job_exit_status
from cloudtaskd.ctl.output import Ctx
from cloudtaskd.ctl.progress import ProgressDisplay, format_duration
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonUnavailable, NotFound

EXIT_INTERRUPTED = 130
CANCEL_TIMEOUT_S = 10.0
RESULTS_FLUSH_LINES = 1000


class _Daemon(Protocol):
    """What `run` needs of cloudtaskd.daemon.Daemon (imported lazily, only when one must be embedded)."""

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
    from cloudtaskd.check import run_checks

    results = await run_checks(ctx.config, cheap=True)
    for r in results:
        if r.status != "ok":
            ctx.note(r.line())
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        raise CloudtaskError("stopped before launching anything: " + "; ".join(
            f"{r.provider}: {r.what}: {r.detail}" for r in failed) + " (`cloudtaskctl check` checks everything)")


async def _submit(ctx: Ctx, api: ApiClient, args: argparse.Namespace, tasks: Path, bundle: Path,
                  state: _RunState | None = None) -> tuple[dict[str, Any], int]:
    worker = await api.upload_worker(bundle)
    job = await api.create_job(args.name or tasks.stem, worker["digest"], max_instances=args.max_instances,
                               max_attempts=args.max_attempts, policy=job_policy(args),
                               max_total_cost=args.max_total_cost)
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
    tasks = _check_tasks_file(args.tasks)
    with tempfile.TemporaryDirectory(prefix="cloudtaskctl-") as tmp:
        bundle = await _prepare_worker(args, Path(tmp))
        async with ctx.client() as api:
            job, accepted = await _submit(ctx, api, args, tasks, bundle)
            job = await api.get_job(job["id"])
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.say(str(job["id"]))
        ctx.note(f"job {job['id']}: {accepted} tasks queued; follow it with `cloudtaskctl watch {job['id']}`")
    return 0


async def _connect(ctx: Ctx, state: _RunState) -> ApiClient:
    """The daemon at the socket, or one started in this process for the duration of the run."""
    api = state.api = ctx.client()
    try:
        await api.health()
        return api
    except DaemonUnavailable as exc:
        if ctx.url:
            raise  # a remote daemon is not started here
        unavailable = exc
    from cloudtaskd import logs  # lazy, like the daemon: other commands never need them

    try:
        from cloudtaskd.daemon import Daemon
    except ImportError as exc:
        raise DaemonUnavailable(f"{unavailable}; and no daemon can start in this process: {exc}") from exc

    state_dir = ctx.config.state_path
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir / "cloudtaskd.log"
    # The daemon's logs go to a file: lines on the terminal would tear through the progress bar.
    state.log_file = await asyncio.to_thread(log_path.open, "a")
    logs.configure(ctx.config.log_level, state.log_file)
    logs.log_config_warnings(ctx.config)
    state.daemon = Daemon(ctx.config)  # set before start(): a half-started daemon must be stopped too
    await state.daemon.start()
    ctx.note(f"no daemon at {ctx.config.socket_path}; running one in this process (log: {log_path})")
    await api.health()
    return api


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
        api = await _connect(ctx, state)
        if state.daemon is not None:
            await _precheck(ctx)
        # Taken before the job exists: a launch that fails while the tasks upload is shown too.
        failures_after: int | None = None
        with contextlib.suppress(NotFound):  # a daemon without an events API
            failures_after = await events_cursor(api)
        job, accepted = await _submit(ctx, api, args, tasks, bundle, state)
    if not ctx.json:
        ctx.note(f"job {job['id']}: {accepted} tasks queued")
    job = await follow_job(api, job["id"], ProgressDisplay(ctx.err), failures_after=failures_after)
    written = await _write_results(api, job["id"], results)
    elapsed_s = time.monotonic() - state.started_at
    if ctx.json:
        ctx.emit_json({"job": job, "results": str(results), "written": written, "elapsed_s": round(elapsed_s, 3)})
    else:
        ctx.say(_summary(job, elapsed_s, results))
    return job_exit_status(job)


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
        if state.api is not None:
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
