"""The commands that only read or nudge an existing daemon: status, watch, results, tasks, retry,
cancel, instances, drain, events. Each returns its exit status; errors are raised and mapped in main."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from cloudtask_wire import jsonx
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.output import Ctx, ago, json_line, printable, shorten, table
from cloudtaskd.ctl.progress import ProgressDisplay, format_duration, format_progress, format_rate
from cloudtaskd.errors import BadInput, NotFound
from cloudtaskd.fleet.orchestrator.failures import key_line

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # the job ended, but not every task succeeded
# The job was paused because no instance can start for it: every offer's launches failed the same
# way, again and again (a bad image, a missing package, refused credentials, a worker setup that fails).
EXIT_BLOCKED = 4
EXIT_REFRESH_FAILED = 3  # a provider's catalog could not be fetched (as main's EXIT_FAILED)

TTY_POLL_S = 0.2  # matches the display's redraw rate: polling faster would not show anything more
PLAIN_POLL_S = 1.0
EVENTS_WAIT_S = 25.0  # each long poll of `events --follow`; the daemon answers at once when one is recorded
EVENTS_PAGE = 1000
EVENTS_EMPTY_PAUSE_S = 0.5  # after an empty answer (a stopping daemon answers at once): never a busy loop
# What `run` and `watch` print as it happens, above the progress bar.
FAILURE_KINDS = ("instance_launch_failed", "instance_start_failed", "offer_blocked")
FAILURES_POLL_S = 1.0


def job_finished(job: dict[str, Any]) -> bool:
    # A job cancelled before any task arrived never becomes `done` (done needs total > 0). A paused
    # one (its max_total_cost reached) waits for `cloudtaskctl resume`: following it stops there.
    return (bool(job.get("done")) or job.get("state") == "paused"
            or (job.get("state") == "cancelled" and not job["counts"].get("total")))


def job_exit_status(job: dict[str, Any]) -> int:
    counts = job["counts"]
    if job.get("state") == "paused" and job.get("pause_cause") == "launch_failures" and not job.get("done"):
        return EXIT_BLOCKED
    return EXIT_OK if counts.get("total") and counts.get("succeeded") == counts.get("total") else EXIT_INCOMPLETE


def format_failure(e: dict[str, Any]) -> str:
    """One line for a failed launch or start, or a blocked offer: the instance, its provider and
    the reason's key line (the whole text is in `cloudtaskctl events` and `instances --logs`)."""
    inst = str(e.get("instance_id") or "")
    reason = key_line(e.get("detail"))
    if e["kind"] == "offer_blocked":
        text = f"launches stopped: {' '.join(str(e.get('detail') or '').split())}"
    else:
        what = "launch failed" if e["kind"] == "instance_launch_failed" else "start failed"
        text = f"{what}: {inst} ({inst.split('-', 1)[0]}): {reason}"
    return printable(text)


class FailureFeed:
    """The job's failed launches and starts as they are recorded, read from the events API with a
    cursor (from the moment it is made: what failed before is in `cloudtaskctl events`)."""

    def __init__(self, api: ApiClient, job_id: int, after: int | None = None) -> None:
        self.api = api
        self.job_id = job_id
        self.cursor = after
        self.next_read = 0.0
        self.off = False

    async def poll(self, now: float) -> list[dict[str, Any]]:
        if self.off or now < self.next_read:
            return []
        self.next_read = now + FAILURES_POLL_S
        try:
            if self.cursor is None:
                self.cursor = await events_cursor(self.api)
                return []
            page = await self.api.events_page(after=self.cursor, limit=EVENTS_PAGE, job_id=self.job_id,
                                              kinds=FAILURE_KINDS)
        except NotFound:
            self.off = True  # a daemon without an events API: the progress bar alone, as before
            return []
        self.cursor = int(page["next"])
        return list(page["events"])


async def events_cursor(api: ApiClient) -> int:
    """The cursor past every event recorded so far."""
    return int((await api.events_page(tail=1))["next"])


async def follow_job(api: ApiClient, job_id: int, display: ProgressDisplay | None,
                     on_change: Callable[[dict[str, Any]], None] | None = None,
                     on_failure: Callable[[dict[str, Any]], None] | None = None,
                     failures_after: int | None = None) -> dict[str, Any]:
    """Poll the job until it is finished; returns its final state. Each failed launch or start of
    an instance for it goes to `on_failure`, else is printed above the progress bar."""
    poll_s = TTY_POLL_S if display is not None and display.tty else PLAIN_POLL_S
    last_key: tuple[Any, ...] | None = None
    failures = FailureFeed(api, job_id, failures_after) if display is not None or on_failure is not None else None
    while True:
        if failures is not None:
            for event in await failures.poll(time.monotonic()):
                if on_failure is not None:
                    on_failure(event)
                elif display is not None:
                    display.message(format_failure(event))
        job = await api.get_job(job_id)
        key = _progress_key(job)
        if on_change is not None and key != last_key:
            on_change(job)
        last_key = key
        if job_finished(job):
            if display is not None:
                display.finish(job)
            return job
        if display is not None:
            display.update(job)
        await asyncio.sleep(poll_s)


def job_state(job: dict[str, Any]) -> str:
    """What a person should read: the outcome once the job is over (succeeded, failed, cancelled),
    else its state (active, open for more tasks, paused, cancelling while its tasks are cancelled in
    chunks, cancelled while its leases end)."""
    if not job.get("outcome") and job.get("cancelling"):
        return "cancelling"
    if job.get("open") and job.get("state") == "active":
        return "open"  # a standing queue: active until `cloudtaskctl close`
    return str(job.get("outcome") or job.get("state"))


def outcome_counts(job: dict[str, Any]) -> str:
    c = job["counts"]
    return (f"{c.get('succeeded', 0)} succeeded, {c.get('dead', 0)} dead, {c.get('cancelled', 0)} cancelled"
            f" of {c.get('total', 0)}")


def _progress_key(job: dict[str, Any]) -> tuple[Any, ...]:
    return (job.get("state"), job.get("done"), tuple(sorted(job["counts"].items())), job.get("instances"))


def _job_row(job: dict[str, Any]) -> list[Any]:
    c = job["counts"]
    finished = c.get("succeeded", 0) + c.get("dead", 0) + c.get("cancelled", 0)
    return [job["id"], shorten(job.get("name"), 24), job_state(job), f"{finished}/{c.get('total', 0)}",
            c.get("succeeded", 0), c.get("dead", 0), c.get("cancelled", 0), c.get("leased", 0),
            c.get("queued", 0) + c.get("staged", 0) + c.get("failed", 0),
            format_rate(float(job.get("rate_per_s") or 0.0)), job.get("instances", 0), ago(job.get("created_at"))]


JOB_HEADERS = ("ID", "NAME", "STATE", "FINISHED", "OK", "DEAD", "CANCELLED", "LEASED", "WAITING", "RATE", "INSTANCES",
               "CREATED")


async def cmd_status(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    if args.job is None:
        jobs = await api.list_jobs()
        database = (await api.status()).get("database", "")  # which one: host and name, never a password
        if ctx.json:
            ctx.emit_json({"jobs": jobs, "database": database})
        else:
            ctx.say(table(JOB_HEADERS, [_job_row(j) for j in jobs]) if jobs else "no jobs")
            ctx.note(f"database: {database}")  # stderr: the table stays what scripts parse
        return EXIT_OK
    job = await api.get_job(args.job)
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.say(printable(f"job {job['id']} {job.get('name')!r}: {job_state(job)} ({outcome_counts(job)}), created"
                          f" {ago(job.get('created_at'))}, worker {str(job.get('worker'))[:12]}"))
        ctx.say(format_progress(job, 100))
    return EXIT_OK


async def cmd_watch(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    if ctx.json:
        # Scripts get each change as one JSON line instead of a redrawn bar.
        job = await follow_job(api, args.job, None, on_change=ctx.emit_json, on_failure=ctx.emit_json)
    else:
        job = await follow_job(api, args.job, ProgressDisplay(ctx.err))
        if job.get("state") == "paused" and job.get("state_reason"):
            ctx.note(f"job {job['id']} {job['state_reason']}")
    return job_exit_status(job)


async def follow_results(api: ApiClient, job_id: int, emit: Callable[[dict[str, Any]], None]) -> None:
    """Emit each finished task once, as it finishes, until the job is finished.

    One stream from the daemon, which reads a job's new results once for all its followers (they
    used to poll: a job read, four task reads and a results stream each, every second). The stream
    is resumed from its cursor if it breaks, without repeating or losing a line (ApiClient)."""
    async for result in api.follow_results(job_id):
        emit(result)


async def cmd_results(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    # Always JSON lines, --json or not: results are data, and a table of arbitrary JSON helps nobody.
    def emit(result: dict[str, Any]) -> None:
        ctx.out.write(json_line(result) + "\n")

    if args.follow:
        await follow_results(api, args.job, emit)
    else:
        async for result in api.results(args.job, top=args.top):
            emit(result)
    return EXIT_OK


TASKS_PAGE = 10_000  # the API's largest page: what `tasks --all` reads at a time


async def cmd_tasks(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    tasks, following = await api.list_tasks(args.job, state=args.state, after=args.after,
                                            limit=TASKS_PAGE if args.all else args.limit)
    while args.all and following is not None:
        page, following = await api.list_tasks(args.job, state=args.state, after=following, limit=TASKS_PAGE)
        tasks.extend(page)
    if ctx.json:
        ctx.emit_json({"tasks": tasks, "next": following})
    elif not tasks:
        ctx.say("no tasks" + (f" in state {args.state}" if args.state else ""))
    else:
        # The id escaped before it is cut: a CR or tab in it is shown, not folded into a space.
        rows = [[t.get("task"), shorten(printable(t.get("id")), 24), t.get("state"), t.get("attempts"),
                 t.get("priority"), t.get("instance"),
                 "-" if t.get("duration_s") is None else f"{t['duration_s']:.2f}s",
                 shorten(t.get("error") if "error" in t else jsonx.dumps(t.get("result")), 50)] for t in tasks]
        ctx.say(table(("TASK", "ID", "STATE", "ATTEMPTS", "PRIORITY", "INSTANCE", "DURATION", "RESULT/ERROR"), rows))
    if following is not None and not ctx.json:
        # On stderr: the table stays data for a pipe, and the hint is still seen.
        ctx.note(f"more tasks: the next page with --after {following}, or all of them with --all")
    return EXIT_OK


def _job_done(ctx: Ctx, verb: str, job: dict[str, Any]) -> int:
    """What a command that changed one job answers: the job as JSON, or `job N VERB: progress`."""
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.say(f"job {job['id']} {verb}: {format_progress(job, 100)}")
    return EXIT_OK


async def cmd_resume(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    return _job_done(ctx, "resumed", await api.resume_job(args.job, max_total_cost=args.max_total_cost))


async def cmd_retry(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    return _job_done(ctx, "retried", await api.retry_job(args.job))


async def cmd_enqueue(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    # `-`: the task from stdin (a script's pipe, or a task too big for a command line).
    raw = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
    try:
        answer = await api.enqueue(args.job, raw, copies=args.copies)
    except BadInput as exc:
        # The daemon names what it read ("task: ..."); here the user typed a flag (--copies is
        # checked before sending).
        what, sep, why = str(exc).partition(": ")
        if what == "task" and sep:
            raise BadInput(f"--data{' (stdin)' if args.data == '-' else ''}: {why}") from None
        raise
    if ctx.json:
        ctx.emit_json(answer)
    else:
        for task_id in answer.get("ids") or [answer["id"]]:
            ctx.say(str(task_id))
    return EXIT_OK


async def cmd_close(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    return _job_done(ctx, "closed", await api.close_job(args.job))


async def cmd_cancel(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    job = await api.cancel_job(args.job)
    if job.get("cancelling") and not ctx.json:
        # A big job: no lease is granted for it any more, and its tasks are cancelled in the background.
        c = job["cancelling"]
        ctx.say(f"job {job['id']} cancelling: {c['cancelled']} of {c['total']} tasks cancelled so far; no task"
                f" of it is started any more, the rest are cancelled in the background"
                f" (cloudtaskctl status {job['id']} shows how far)")
        return EXIT_OK
    return _job_done(ctx, "cancelled", job)


async def cmd_delete(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    answer = await api.delete_job(args.job)
    if ctx.json:
        ctx.emit_json(answer)
    elif answer.get("purging"):
        n = int(answer.get("tasks") or 0)
        ctx.say(f"job {args.job} deleted: its {n} task{'s' if n != 1 else ''}, results and events are being removed")
    else:
        ctx.say(f"job {args.job} deleted (it held no tasks)")
    return EXIT_OK


async def cmd_instances(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    if args.logs:
        text = await api.instance_logs(args.logs)
        if ctx.json:
            ctx.emit_json({"instance": args.logs, "logs": text})
        else:
            # A log keeps its lines and tabs; every other control is shown escaped, and a CR that
            # ends a line (CRLF) is dropped rather than shown on every line.
            ctx.say(text.replace("\r\n", "\n").rstrip("\n"))
        return EXIT_OK
    instances = await api.list_instances(include_stopped=args.all)
    if ctx.json:
        ctx.emit_json({"instances": instances})
    elif not instances:
        ctx.say("no instances" + ("" if args.all else " running (--all shows stopped ones)"))
    else:
        rows = [[i["id"], i.get("provider"), i.get("state"), i.get("slots"), i.get("leases"),
                 ago(i.get("created_at")), "connected" if i.get("connected") else ago(i.get("last_seen_at")),
                 "-" if i.get("price_per_hour") is None else f"{i['price_per_hour']:.4f}",
                 shorten(i.get("last_error"), 40)] for i in instances]
        ctx.say(table(("ID", "PROVIDER", "STATE", "SLOTS", "LEASES", "CREATED", "SEEN", "PRICE/H", "LAST ERROR"),
                      rows))
    return EXIT_OK


async def cmd_drain(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    inst = await api.drain_instance(args.instance)
    if ctx.json:
        ctx.emit_json(inst)
    else:
        ctx.say(printable(f"instance {inst['id']}: {inst.get('state')}"))
    return EXIT_OK


async def cmd_catalog(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    if args.action == "refresh":
        results = await api.refresh_catalog()
        if ctx.json:
            ctx.emit_json({"providers": results})
        elif not results:
            ctx.say("no cloud provider is enabled: nothing to fetch (local and ssh offers are free)")
        for r in results if not ctx.json else []:
            ctx.say(f"{r['provider']}: " + (f"refresh failed, the previous catalog is kept: {r['error']}"
                                             if r.get("error") else f"{r['offers']} offers"))
        return EXIT_REFRESH_FAILED if any(r.get("error") for r in results) else EXIT_OK
    cat = await api.catalog()
    if ctx.json:
        ctx.emit_json(cat)
        return EXIT_OK
    for provider, age in sorted(cat.get("age_s", {}).items()):
        ctx.say(f"{provider}: fetched {format_duration(age)} ago")
    ctx.say(table(("PROVIDER", "REGION", "ZONE", "TYPE", "MARKET", "CPUS", "MEM GB", "$/H"),
                  [[o["provider"], o["region"] or "-", o["zone"], o["machine_type"],
                    "spot" if o["spot"] else "on-demand", o["cpus"], _num(o["memory_gb"], 1),
                    _num(o["price_per_hour"], 4)] for o in cat["offers"]]))
    return EXIT_OK


async def cmd_prices(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    params = {"cpus_per_task": str(args.cpus_per_task)}
    if args.memory_per_task:
        params["memory_per_task"] = str(args.memory_per_task)
    if args.gpus_per_task:
        params["gpus_per_task"] = str(args.gpus_per_task)
    if args.spot is not None:
        params["spot"] = "true" if args.spot else "false"
    if args.max_price_per_hour:
        params["max_price_per_hour"] = str(args.max_price_per_hour)
    answer = await api.prices(params)
    candidates = answer["candidates"]
    if ctx.json:
        ctx.emit_json(answer)
    elif not candidates:
        ctx.say(f"no offer: {answer.get('why') or 'none fits a task of this size under these limits'}")
    else:
        ctx.say(table(("PROVIDER", "REGION", "ZONE", "TYPE", "MARKET", "SLOTS", "$/H", "INT/H", "$/SLOT-H"),
                      [[c["provider"], c["region"] or "-", c["zone"], c["machine_type"],
                        "spot" if c["spot"] else "on-demand", c["slots"], _num(c["price_per_hour"], 4),
                        _num(c.get("interruptions_per_hour"), 3), _num(c["cost_per_slot_hour"], 5)]
                       for c in candidates]))
        ctx.say("INT/H: interruptions expected per instance-hour (observed, else the prior); $/SLOT-H weighs them in")
    return EXIT_OK


async def cmd_interruptions(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    report = await api.interruptions()
    if ctx.json:
        ctx.emit_json(report)
        return EXIT_OK
    days = report["window_s"] / 86400
    if not report["offers"]:
        ctx.say(f"no instances in the last {days:.0f} days")
        return EXIT_OK
    ctx.say(f"the last {days:.0f} days, per offer:")
    ctx.say(table(("OFFER", "INSTANCES", "HOURS", "INTERRUPTED", "REBALANCE"),
                  [[o["offer"], o["instances"], f"{o['instance_hours']:.2f}", o["interruptions"], o["rebalances"]]
                   for o in report["offers"]]))
    if report["recent"]:
        ctx.say("\nlatest notices:")
        ctx.say(table(("WHEN", "INSTANCE", "KIND", "SOURCE", "DETAIL"),
                      [[ago(r["noticed_at"]), r["instance_id"], r["kind"], r["source"], shorten(r["detail"], 60)]
                       for r in report["recent"]]))
    return EXIT_OK


async def follow_events(api: ApiClient, emit: Callable[[dict[str, Any]], None], *, after: int | None, limit: int,
                        job_id: int | None, instance: str | None, follow: bool) -> None:
    """The newest `limit` events (or those after `after`), then with `follow` each new one as it is
    recorded: a long poll, so an event shows within a round trip, not a polling interval."""
    if after is None:
        page = await api.events_page(tail=limit, job_id=job_id, instance=instance)
    else:
        page = await api.events_page(after=after, limit=limit, job_id=job_id, instance=instance)
    for event in page["events"]:
        emit(event)
    while follow:
        cursor = page["next"]
        page = await api.events_page(after=cursor, limit=EVENTS_PAGE, job_id=job_id, instance=instance,
                                     wait_s=EVENTS_WAIT_S)
        for event in page["events"]:
            emit(event)
        if not page["events"]:
            await asyncio.sleep(EVENTS_EMPTY_PAUSE_S)


def format_event(e: dict[str, Any]) -> str:
    ts = float(e.get("ts") or 0.0)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"
    # The task as the user knows it (its id in the task file), the row id only when that is unknown.
    task_key = "task_key" if e.get("task_key") is not None else "task_id"
    where = " ".join(f"{label}={e[key]}" for label, key in (("job", "job_id"), ("task", task_key),
                                                             ("instance", "instance_id")) if e.get(key) is not None)
    detail = " ".join(str(e["detail"]).split()) if e.get("detail") else ""  # one line, whatever it holds
    return printable("  ".join(part for part in (when, f"#{e['id']}", e["kind"], where, detail) if part))


async def cmd_events(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    def emit(event: dict[str, Any]) -> None:
        ctx.out.write((json_line(event) if ctx.json else format_event(event)) + "\n")
        ctx.out.flush()  # a follower's reader (a pipe, a file) sees each event as it comes

    await follow_events(api, emit, after=args.after, limit=args.limit, job_id=args.job, instance=args.instance,
                        follow=args.follow)
    return EXIT_OK


def _num(value: float | None, digits: int) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


async def cmd_cost(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    fleet = await api.cost()
    job = await api.cost(args.job) if args.job is not None else None
    if ctx.json:
        ctx.emit_json({"fleet": fleet, "job": job})
        return EXIT_OK
    ctx.say(f"fleet: ${fleet['spent']:.4f} spent, ${fleet['rate_per_hour']:.4f}/h now")
    for name, p in sorted(fleet["providers"].items()):
        ctx.say(f"  {name}: {p['instances']} instances, ${p['spent']:.4f} spent, ${p['rate_per_hour']:.4f}/h now")
    if job is not None:
        estimate = job["estimate_to_finish"]
        ctx.say(f"job {job['job']}: ${job['spent']:.4f} of task time (x{job['overhead_factor']:.2f} with boot and idle"
                f" time), {job['remaining_tasks']} tasks to go, "
                + ("estimate to finish unknown until a task finishes" if estimate is None
                   else f"~${estimate:.4f} to finish, ~${job['estimate_total']:.4f} in all"))
    return EXIT_OK
