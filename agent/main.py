"""cloudtask-agent: the process that runs on each instance.

    cloudtask-agent --url ws://daemon:port/v1/agent [--url ws://replica2:port/v1/agent ...]
                    --instance ID --worker-dir DIR [--slots N]
                    [--interruption-source aws|gcp|azure [--metadata-url URL]] [--max-message-bytes N]

Several --url (or one with a comma-separated list): every replica's agent URL; the agent dials them
in turn and moves to another when its session ends (agent/failover.py).

The token comes from $CLOUDTASK_AGENT_TOKEN (never argv: every local user can read argv).

Exit codes: 0 drained or stopped; 1 an unexpected error; 2 the daemon refused us for good (a wrong
or revoked token); 3 no daemon reachable for --give-up-after seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from agent import interruption
from agent.connection import (
    DEFAULT_GIVE_UP_AFTER_S,
    DEFAULT_INTERRUPTION_MARGIN_S,
    EXIT_GAVE_UP,
    Agent,
    FatalAgentError,
    default_slots,
    load_spec,
)
from agent.failover import parse_urls
from agent.logline import log
from cloudtask_wire import jsonx
from cloudtask_wire.messages import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES

SETUP_MARKER = ".cloudtask-setup-done"


def run_setup(command: str, worker_dir: Path, marker_dir: Path) -> None:
    """Run the worker's one-time `setup` command; a marker makes a restarted agent skip it."""
    marker = marker_dir / SETUP_MARKER
    if marker.exists():
        return
    log("setup_started", command=command)
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=worker_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        log("setup_failed", exit_code=proc.returncode, stderr=proc.stderr[-4000:])
        raise SystemExit(f"setup command failed with exit code {proc.returncode}")
    marker.write_text("ok\n")
    log("setup_done")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cloudtask-agent")
    parser.add_argument("--url", required=True, action="append",
                        help="a daemon's agent websocket URL; repeat it (or separate by commas) for every replica's")
    parser.add_argument("--instance", required=True, help="this instance's id")
    parser.add_argument("--worker-dir", required=True, type=Path)
    parser.add_argument("--slots", type=int, default=0, help="concurrent tasks (default: CPUs / cpus_per_task)")
    parser.add_argument("--prefetch", type=int, default=None, help="extra leases held ready (default: slots)")
    parser.add_argument("--token-file", type=Path, help="read the token from this file (mode 600)")
    parser.add_argument("--url-file", type=Path,
                        help="read the URL(s) from this file before each connection, one a line (a tunnel's "
                             "port may change)")
    parser.add_argument("--give-up-after", type=float, default=DEFAULT_GIVE_UP_AFTER_S,
                        help=f"exit (code {EXIT_GAVE_UP}) after this many seconds without reaching the daemon "
                             f"(default {DEFAULT_GIVE_UP_AFTER_S:g}; 0: never)")
    parser.add_argument("--ca-file", type=Path, help="the daemon's CA certificate (PEM): trust only it for wss://")
    parser.add_argument("--stats-file", type=Path, help="write lease round-trip times and counts here at exit")
    parser.add_argument("--drain-grace", type=float, default=60.0, help="seconds to finish work on SIGTERM")
    parser.add_argument("--interruption-source", choices=interruption.SOURCES,
                        help="watch this cloud's spot interruption notices (default: none)")
    parser.add_argument("--metadata-url", help="the instance metadata service's base URL (default: the cloud's own)")
    parser.add_argument("--interruption-margin", type=float, default=DEFAULT_INTERRUPTION_MARGIN_S,
                        help="seconds before the cloud's deadline at which running tasks are handed back")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="the largest frame read from the daemon, in bytes (the daemon that starts the agent "
                             "sets it to fit its largest task)")
    args = parser.parse_args(argv)
    if not MIN_MESSAGE_BYTES <= args.max_message_bytes <= MAX_MESSAGE_BYTES:
        parser.error(f"--max-message-bytes must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES}")
    if args.give_up_after < 0:
        parser.error("--give-up-after must be 0 (never) or more seconds")
    urls = parse_urls(args.url)
    if not urls:
        parser.error("--url: give at least one daemon URL")
    token = os.environ.pop("CLOUDTASK_AGENT_TOKEN", "")
    if not token and args.token_file:
        token = args.token_file.read_text().strip()
    if not token:
        parser.error("no token: set CLOUDTASK_AGENT_TOKEN or pass --token-file")
    worker_dir = args.worker_dir.resolve()
    spec = load_spec(worker_dir)
    if spec.setup:
        run_setup(spec.setup, worker_dir, Path.cwd())
    slots = args.slots or default_slots(spec)
    agents: list[Agent] = []

    async def serve() -> int:
        # Made inside the loop: before 3.10 an asyncio.Event binds to the loop current when it is
        # made, and asyncio.run() starts a new one (the agent runs on 3.9 images).
        agent = Agent(urls, args.instance, token, worker_dir, slots, prefetch=args.prefetch,
                      drain_grace_s=args.drain_grace, spec=spec, interruption_source=args.interruption_source or "",
                      metadata_url=args.metadata_url, interruption_margin_s=args.interruption_margin,
                      ca_file=args.ca_file, max_message_bytes=args.max_message_bytes, url_file=args.url_file,
                      give_up_after_s=args.give_up_after)
        agents.append(agent)
        return await agent.run()

    log("agent_started", instance=args.instance, slots=slots, mode=spec.mode, pid=os.getpid())
    try:
        code = asyncio.run(serve())
    except FatalAgentError:
        code = 2
    completed = agents[0].completed if agents else 0
    log("agent_exited", code=code, completed=completed)
    if args.stats_file:
        args.stats_file.write_text(jsonx.dumps({"completed": completed,
                                                "lease_rtts_s": list(agents[0].lease_rtts_s) if agents else []}))
    sys.stdout.flush()
    # os._exit: a sync python-mode call that timed out may still hold a thread we cannot stop,
    # and interpreter shutdown would wait for it forever.
    os._exit(code)


if __name__ == "__main__":
    main()
