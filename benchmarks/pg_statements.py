"""Where a dispatch round's time goes on PostgreSQL: benchmarks/dispatch.py's run on a server of its own
with pg_stat_statements and auto_explain loaded, counted over the dispatch phase only.

    python benchmarks/pg_statements.py [--tasks 50000] [--agents 2] [--slots 64] [--explain-ms 40]

Prints the run's figures, then the statements by total time (calls, total and mean ms, rows, buffers
hit, WAL bytes), and where the server's log with the plans of the statements slower than
--explain-ms (EXPLAIN ANALYZE with buffers and WAL, from auto_explain) was copied. The counting
itself costs time: compare rates with dispatch.py's, not with these.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
from _common import ROOT, percentile
from dispatch import new_database, postgres_server, run_dispatch

TOP = 15
STATEMENTS = (
    "SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 2), rows,"
    " shared_blks_hit, wal_bytes, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)"
    " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    f" ORDER BY total_exec_time DESC LIMIT {TOP}")


def instrument(server: Any, explain_ms: int) -> None:
    """Load pg_stat_statements and auto_explain (a restart), then set auto_explain's threshold."""
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER SYSTEM SET shared_preload_libraries = pg_stat_statements, auto_explain")
        c.execute("ALTER SYSTEM SET log_min_messages = 'log'")
        c.execute("ALTER SYSTEM SET log_autovacuum_min_duration = 0")
    server.restart()
    with psycopg.connect(dsn, autocommit=True) as c:  # auto_explain's settings exist once it is loaded
        c.execute(f"ALTER SYSTEM SET auto_explain.log_min_duration = {int(explain_ms)}")
        c.execute("ALTER SYSTEM SET auto_explain.log_analyze = on")
        c.execute("ALTER SYSTEM SET auto_explain.log_buffers = on")
        c.execute("ALTER SYSTEM SET auto_explain.log_wal = on")
        c.execute("SELECT pg_reload_conf()")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=512)
    ap.add_argument("--explain-ms", type=int, default=40, help="log the plans of statements slower than this")
    args = ap.parse_args()
    with ExitStack() as stack:
        server = postgres_server(stack)
        instrument(server, args.explain_ms)
        dsn = new_database(server)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_stat_statements")

        def reset() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_stat_statements_reset()")

        r = await run_dispatch(tasks=args.tasks, agents=args.agents, slots=args.slots, prefetch=args.prefetch,
                               database=dsn, on_queued=reset)
        with psycopg.connect(dsn, autocommit=True) as c:
            rows = c.execute(STATEMENTS).fetchall()
        log = Path(tempfile.gettempdir()) / f"pg_statements-{os.getpid()}.log"
        shutil.copy(server.log_path, log)
    print(f"dispatched {r.succeeded} in {r.dispatch_s:.2f} s = {r.tasks_per_s:,.0f} tasks/s; lease p50"
          f" {percentile(r.lease_rtts_s, 50) * 1000:.0f} ms, p99 {percentile(r.lease_rtts_s, 99) * 1000:.0f} ms,"
          f" without each agent's first {percentile(r.later_rtts_s, 99) * 1000:.0f} ms;"
          f" daemon CPU {r.daemon_cpu_s:.1f} s")
    print("calls | total ms | mean ms | rows | buffers hit | WAL bytes | statement (dispatch phase)")
    for row in rows:
        print(" | ".join(map(str, row)))
    print(f"plans over {args.explain_ms} ms and autovacuum's runs: {log}")


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
