"""cloudtaskctl's entry point: arguments, config, and one place that turns errors into exit statuses.

Exit statuses (EXIT_STATUSES, also in --help): 0 all succeeded / done, 1 a job ended with tasks that did
not succeed, 2 bad input (arguments, config, worker, task file, a job or instance that does not exist),
3 daemon unavailable or any other failure, 4 the job was paused because no instance can start for it
(launches fail the same way every time), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

from cloudtask_wire.workerspec import WorkerSpecError
from cloudtaskd.config import load_config
from cloudtaskd.core.states import TASK_STATE_NAMES
from cloudtaskd.ctl import commands
from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.output import Ctx, printable
from cloudtaskd.ctl.run import EXIT_INTERRUPTED, cmd_run, cmd_submit
from cloudtaskd.ctl.status_page import cmd_status_page
from cloudtaskd.errors import BadInput, CloudtaskError, ConfigError, DaemonUnavailable, NotFound
from cloudtaskd.fleet.check import run_checks
from cloudtaskd.http.params import decimal_number, whole_number

EXIT_BAD_INPUT = 2
EXIT_FAILED = 3
EXIT_CHECK_FAILED = 1  # `check`: some check failed
TASK_STATES = TASK_STATE_NAMES
DEFAULT_RESULTS = "results.jsonl"

EXIT_STATUSES = """exit status:
  0    done: every task succeeded (or the command did what it was asked)
  1    the job ended with tasks that did not succeed (`check`: some check failed)
  2    bad input: arguments, config, worker, task file, or a job or instance that does not exist
  3    the daemon is unreachable, or any other failure
  4    no instance could start for the job: it was paused with the reason
  130  interrupted"""

# The API names its fields; a person typed flags. A refusal the daemon names by field (one the
# flag's own check cannot see: a cap below what is already spent) is reported under the flag.
FLAG_FOR_FIELD = {
    "max_instances": "--max-instances", "max_attempts": "--max-attempts", "max_total_cost": "--max-total-cost",
    "policy.providers": "--providers", "policy.regions": "--regions",
    "policy.max_price_per_hour": "--max-price-per-hour", "max_price_per_hour": "--max-price-per-hour",
    "cpus_per_task": "--cpus-per-task", "memory_per_task": "--memory-per-task", "gpus_per_task": "--gpus-per-task",
    "state": "--state", "limit": "--limit", "after": "--after", "top": "--top", "name": "--name",
    "copies": "--copies",
}


def _as_flag(exc: BadInput) -> str:
    text = str(exc)
    flag = FLAG_FOR_FIELD.get(exc.field or "")
    if flag is not None:
        for prefix in (f"{exc.field}: ", f"query parameter {exc.field} "):
            if text.startswith(prefix):
                return f"{flag}: {text[len(prefix):]}"
    return text


Command = Callable[[Ctx, ApiClient, argparse.Namespace], Awaitable[int]]


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    # As the daemon reads numbers (params.py): `+7`, `0_7`, `007`, ` 7` or a full-width 7 is refused
    # here, not quietly taken as 7.
    def parse(raw: str) -> int:
        value = whole_number(raw)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected a whole number in ASCII digits without leading zeros,"
                                             f" got {raw!r}")
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number between {lo} and {hi}, got {value}")
        return value

    return parse


_job_arg = _int_in(1, 2**63 - 1)


def _number(*, lo: float = 0.0, above: bool = False) -> Callable[[str], float]:
    # Checked here, as the daemon would, so the error names the flag and quotes what was typed
    # (the daemon's named its query field and the float it was sent: `cpus_per_task: ... got '0.0'`).
    def parse(raw: str) -> float:
        value = decimal_number(raw)
        if value is None or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number in ASCII digits (like 0.5), got {raw!r}")
        if value < lo or (above and value == lo):
            raise argparse.ArgumentTypeError(f"expected a number {'above' if above else 'of at least'} {lo:g},"
                                             f" got {raw!r}")
        return value

    return parse


_usd = _number(above=True)


def _global_options(*, suppress: bool) -> argparse.ArgumentParser:
    # SUPPRESS in the subcommands: an option not given there must not reset what was given before.
    # Each parser gets its own copy: argparse shares a parent's action objects, defaults included.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=default(None),
                        help="YAML config file (the daemon's; gives the state directory and socket)")
    common.add_argument("--socket", metavar="PATH", default=default(None),
                        help="the daemon's control socket (default: <state_dir>/cloudtaskd.sock)")
    common.add_argument("--url", metavar="URL", default=default(None),
                        help="the daemon's TCP listener, https://HOST:PORT (default: $CLOUDTASK_URL, else the socket);"
                             " its token comes from $CLOUDTASK_API_TOKEN or --token-file")
    common.add_argument("--token-file", metavar="FILE", default=default(None),
                        help="a file holding the API token (never pass the token itself on a command line)")
    common.add_argument("--ca-file", metavar="FILE", default=default(None),
                        help="the daemon's CA certificate (default: $CLOUDTASK_CA_FILE, else <state_dir>/tls/ca.pem"
                             " when readable, else the system's CAs)")
    common.add_argument("--json", action="store_true", default=default(False),
                        help="machine output: the API's objects as JSON")
    return common


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the command (`cloudtaskctl status --json`).
    parser = argparse.ArgumentParser(prog="cloudtaskctl", parents=[_global_options(suppress=False)],
                                     description="Run and inspect cloudtask jobs.", epilog=EXIT_STATUSES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = _global_options(suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    for name, help_text in (("run", "submit a job, follow it to the end, write its results"),
                            ("submit", "submit a job and print its id at once")):
        p = add(name, help_text)
        if name == "submit":
            p.add_argument("--tasks", metavar="FILE", help="tasks as a JSON array or JSON Lines (optional with --open)")
            p.add_argument("--open", action="store_true",
                           help="a standing queue: the job stays active when its tasks are done, taking more"
                                " (`cloudtaskctl enqueue`), until `cloudtaskctl close JOB`")
        else:
            p.add_argument("--tasks", required=True, metavar="FILE", help="tasks as a JSON array or JSON Lines")
        worker = p.add_mutually_exclusive_group(required=True)
        worker.add_argument("--worker", metavar="DIR", help="worker directory holding cloudtask.yaml")
        worker.add_argument("--worker-repo", metavar="URL", help="git repository holding cloudtask.yaml")
        p.add_argument("--worker-ref", metavar="REF", help="branch or tag of --worker-repo")
        p.add_argument("--max-instances", type=_int_in(1, 100_000), metavar="N",
                       help="at most N instances at once for this job, 1 to 100000 (default: no limit of its own;"
                            " the config's scaling.max_instances applies to all jobs)")
        p.add_argument("--max-attempts", type=_int_in(1, 100), metavar="N",
                       help="attempts per task before it is dead (default: the config's queue.max_attempts)")
        p.add_argument("--name", help="job name (default: the task file's name)")
        p.add_argument("--providers", metavar="A,B", help="only these providers (e.g. aws,gcp)")
        p.add_argument("--regions", metavar="R1,R2", help="only these regions or zones")
        p.add_argument("--no-spot", action="store_true", help="on-demand instances only")
        p.add_argument("--no-on-demand-fallback", action="store_true",
                       help="spot only: wait for spot capacity rather than fall back to on-demand")
        p.add_argument("--max-price-per-hour", type=_usd, metavar="USD", help="no instance dearer than this")
        p.add_argument("--max-total-cost", type=_usd, metavar="USD",
                       help="pause the job before its instances cost more than this")
        if name == "run":
            p.add_argument("--results", default=DEFAULT_RESULTS, metavar="FILE",
                           help=f"where to write one JSON line per task (default: {DEFAULT_RESULTS})")
            p.add_argument("--fresh", action="store_true",
                           help="start a new job even when an earlier run of the same task file and worker left one"
                                " unfinished (that one is cancelled); without it, that job is resumed")

    add("check", "before anything is spent: whether each enabled provider can work (no daemon needed)")
    add("status", "all jobs, or one").add_argument("job", nargs="?", type=_job_arg, metavar="JOB")
    add("watch", "show a job's progress until it is done").add_argument("job", type=_job_arg, metavar="JOB")
    p = add("results", "finished tasks' results as JSON lines")
    p.add_argument("job", type=_job_arg, metavar="JOB")
    p.add_argument("--top", type=_int_in(0, 10_000_000), metavar="N", help="the N most recently finished")
    p.add_argument("--follow", action="store_true", help="keep printing results as tasks finish, until done")
    p = add("tasks", "list a job's tasks")
    p.add_argument("job", type=_job_arg, metavar="JOB")
    p.add_argument("--state", choices=TASK_STATES)
    p.add_argument("--after", type=_int_in(0, 2**63 - 1), metavar="TASK",
                   help="the tasks after this TASK number (the first column; a page's last)")
    pages = p.add_mutually_exclusive_group()
    pages.add_argument("--limit", type=_int_in(1, 10_000), default=100, metavar="N",
                       help="at most N tasks (default: 100); when there are more, it says how to see them")
    pages.add_argument("--all", action="store_true", help="every task, read page by page")
    add("retry", "queue a job's dead and cancelled tasks again").add_argument("job", type=_job_arg, metavar="JOB")
    p = add("resume", "let a paused job go on (its max_total_cost reached, launches blocked, or its run gone)")
    p.add_argument("job", type=_job_arg, metavar="JOB")
    p.add_argument("--max-total-cost", type=_usd, metavar="USD", help="the new cap (above what is spent)")
    p = add("enqueue", "queue one task in a job (a standing queue's enqueue) and print its task number")
    p.add_argument("job", type=_job_arg, metavar="JOB")
    p.add_argument("--data", required=True, metavar="TASK",
                   help='the task object, as one line of a task file: {"id": ..., "data": ...} ("id" may be left'
                        " out: the task is then named by its number); - reads it from stdin")
    p.add_argument("--copies", type=_int_in(1, 10_000), metavar="N",
                   help="queue N copies (ids suffixed -1 .. -N); prints N task numbers")
    add("close", "close an open job: it takes no more tasks and finishes once those it has are done").add_argument(
        "job", type=_job_arg, metavar="JOB")
    add("cancel", "cancel what is unfinished in a job").add_argument("job", type=_job_arg, metavar="JOB")
    add("delete", "delete a job that is over (succeeded, failed or cancelled) with its tasks, results and events;"
        " a job with unfinished tasks must be cancelled first").add_argument("job", type=_job_arg, metavar="JOB")
    p = add("instances", "list instances, or show one's bootstrap log")
    p.add_argument("--all", action="store_true", help="include stopped ones")
    p.add_argument("--logs", metavar="ID", help="print the bootstrap/agent log kept for instance ID")
    add("drain", "let an instance finish its tasks, then stop it").add_argument("instance", metavar="INSTANCE")
    add("cost", "what the fleet has cost, and a job's spend and estimate to finish").add_argument(
        "job", nargs="?", type=_job_arg, metavar="JOB")
    p = add("catalog", "show the offers and prices the daemon knows, or fetch them anew from the clouds")
    p.add_argument("action", nargs="?", choices=("show", "refresh"), default="show")
    add("interruptions", "spot interruptions per offer, and the latest notices")
    p = add("events", "the daemon's event log: the newest events, or with --follow each new one until Ctrl-C")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing events as they are recorded")
    p.add_argument("--job", type=_int_in(0, 2**62), metavar="JOB", help="only this job's events")
    p.add_argument("--instance", metavar="ID", help="only this instance's events")
    p.add_argument("--after", type=_int_in(0, 2**62), metavar="ID",
                   help="events after this event id (default: the newest --limit)")
    p.add_argument("--limit", type=_int_in(1, 10_000), default=50, metavar="N",
                   help="how many events to show before following (default: 50)")
    p = add("status-page", "serve the status page on http://127.0.0.1:PORT, relayed to the daemon (no CA, no token"
                           " to enter), until Ctrl-C")
    p.add_argument("--port", type=_int_in(0, 65535), default=0, metavar="PORT",
                   help="the local port (default: 0, any free one; the address is printed)")
    p.add_argument("--open", action="store_true", help="open the page in this machine's browser")
    p = add("prices", "rank what the daemon would buy for tasks of this size, cheapest task-slot-hour first")
    p.add_argument("--cpus-per-task", type=_number(lo=0.01), default=1.0, metavar="C",
                   help="CPUs each task needs, 0.01 or more (default: 1)")
    p.add_argument("--memory-per-task", type=_int_in(0, 10_000_000), default=0, metavar="MIB")
    p.add_argument("--gpus-per-task", type=_int_in(0, 64), default=0, metavar="N")
    market = p.add_mutually_exclusive_group()
    market.add_argument("--spot", dest="spot", action="store_true", default=None, help="spot offers only")
    market.add_argument("--on-demand", dest="spot", action="store_false", help="on-demand offers only")
    p.add_argument("--max-price-per-hour", type=_usd, default=0.0, metavar="USD",
                   help="no instance dearer than this (default: no limit)")
    return parser


COMMANDS: dict[str, Command] = {
    "status": commands.cmd_status,
    "watch": commands.cmd_watch,
    "results": commands.cmd_results,
    "tasks": commands.cmd_tasks,
    "retry": commands.cmd_retry,
    "resume": commands.cmd_resume,
    "cancel": commands.cmd_cancel,
    "enqueue": commands.cmd_enqueue,
    "close": commands.cmd_close,
    "delete": commands.cmd_delete,
    "instances": commands.cmd_instances,
    "drain": commands.cmd_drain,
    "catalog": commands.cmd_catalog,
    "cost": commands.cmd_cost,
    "prices": commands.cmd_prices,
    "interruptions": commands.cmd_interruptions,
    "events": commands.cmd_events,
    "status-page": cmd_status_page,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A combination refused is the subcommand's usage error: its usage is printed, not the top level's.
    sub = _subparser(parser, args.command)
    if args.command in ("run", "submit") and args.worker_ref and not args.worker_repo:
        sub.error("--worker-ref needs --worker-repo")
    if args.command in ("run", "submit") and args.no_spot and args.no_on_demand_fallback:
        sub.error("--no-spot and --no-on-demand-fallback together allow nothing to run on")
    if args.command == "submit" and args.tasks is None and not args.open:
        sub.error("--tasks is required (or --open, for a standing queue fed by `cloudtaskctl enqueue`)")
    if args.command == "results" and args.follow and args.top is not None:
        sub.error("--top and --follow cannot be combined (--top is newest first, --follow in task order)")
    return args


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():  # argparse has no public way
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


async def cmd_check(ctx: Ctx, args: argparse.Namespace) -> int:
    results = await run_checks(ctx.config)
    if ctx.json:
        ctx.emit_json({"checks": [asdict(r) for r in results]})
    else:
        for r in results:
            ctx.say(printable(r.line()))
    return EXIT_CHECK_FAILED if any(r.status == "FAIL" for r in results) else 0


async def _dispatch(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.command == "check":
        return await cmd_check(ctx, args)
    if args.command == "run":
        return await cmd_run(ctx, args)
    if args.command == "submit":
        return await cmd_submit(ctx, args)
    async with ctx.client() as api:
        return await COMMANDS[args.command](ctx, api, args)


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse's way out: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT

    def fail(status: int, message: str) -> int:
        # An error may quote the daemon, a worker or a cloud: its controls are shown, not obeyed.
        err.write(f"cloudtaskctl: {printable(message, lines=True)}\n")
        return status

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(EXIT_BAD_INPUT, str(exc))
    if args.socket:
        config = replace(config, api=replace(config.api, socket=args.socket))
    url = args.url or os.environ.get("CLOUDTASK_URL", "")
    token = os.environ.get("CLOUDTASK_API_TOKEN", "")
    ca_file: Path | None = None
    if url:
        if not url.startswith("https://"):
            return fail(EXIT_BAD_INPUT, f"--url: expected https://HOST:PORT (the listener is TLS only), got {url!r}")
        if args.token_file:
            try:
                token = Path(args.token_file).read_text().strip()
            except OSError as exc:
                return fail(EXIT_BAD_INPUT, f"--token-file: cannot read {args.token_file}: {exc.strerror}")
        ca = args.ca_file or os.environ.get("CLOUDTASK_CA_FILE") or str(config.state_path / "tls" / "ca.pem")
        ca_file = Path(ca) if os.access(ca, os.R_OK) else None
        if ca_file is None and (args.ca_file or os.environ.get("CLOUDTASK_CA_FILE")):
            return fail(EXIT_BAD_INPUT, f"--ca-file: cannot read {ca}")
    ctx = Ctx(config=config, json=args.json, out=out, err=err, url=url, token=token, ca_file=ca_file)
    try:
        return asyncio.run(_dispatch(ctx, args))
    except KeyboardInterrupt:
        if err.isatty():
            err.write("\n")  # end a progress line the interrupt left behind
        return EXIT_INTERRUPTED
    except BadInput as exc:
        return fail(EXIT_BAD_INPUT, _as_flag(exc))
    except (ConfigError, WorkerSpecError, NotFound) as exc:
        return fail(EXIT_BAD_INPUT, str(exc))
    except DaemonUnavailable as exc:
        return fail(EXIT_FAILED, f"{exc}\n  start it (`cloudtaskd --config FILE`), point at it with --socket or "
                                 f"--config, or use `cloudtaskctl run`, which starts one for its duration")
    except CloudtaskError as exc:
        return fail(EXIT_FAILED, str(exc))
    except BrokenPipeError:
        # The reader went away (`| head`): not a failure to report. Point stdout at /dev/null so
        # the interpreter's final flush does not complain about the broken pipe either.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        return fail(EXIT_FAILED, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))


if __name__ == "__main__":
    sys.exit(main())
