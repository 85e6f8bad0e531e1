"""The daemon's work per task, counted rather than timed: function calls and SQL statements per task,
on each thread, for one dispatch run of each checkout given. Counts do not swing with the machine's
load as wall-clock figures do (±30 % on a shared VM), so a change that adds work per task shows even
when the wall clock cannot tell it from noise. (Batching still depends on timing: per-round work is
spread over fewer or more tasks; the per-task lines are what a regression would move.)

    python benchmarks/callcount.py [--tasks 50000] CHECKOUT [CHECKOUT ...]
    e.g. git worktree add --detach ../before 1e4e21e && (cd ../before && python3 -m venv .venv &&
         .venv/bin/pip install -e '.[dev]') && python benchmarks/callcount.py ../before .

Each checkout runs its own benchmarks/dispatch.py with its own .venv; every thread of every process
is profiled (cProfile, through a sitecustomize given on PYTHONPATH) and the daemon's profiles are
read back. Functions are counted by name, not module, so a function that moved between modules
keeps its count. Under the profiler the run is several times slower: the rates it prints mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HOOK = '''
import os
_out = os.environ.get("CALLCOUNT_DIR")
if _out:
    import atexit, cProfile, threading
    _main = cProfile.Profile()
    _main.enable()
    def _dump():
        _main.disable()
        _main.dump_stats(os.path.join(_out, f"{os.getpid()}-main.prof"))
    atexit.register(_dump)
    _run = threading.Thread.run
    def _profiled_run(self):
        p = cProfile.Profile()
        p.enable()
        try:
            _run(self)
        finally:
            p.disable()
            kind = self.name.split()[-1].strip("()")
            p.dump_stats(os.path.join(_out, f"{os.getpid()}-thread-{id(self)}-{kind}.prof"))
    threading.Thread.run = _profiled_run
'''

# The SQLite calls a statement costs; aiosqlite's worker thread is where the daemon's writer runs them.
SQL_CALLS = ("<method 'execute' of 'sqlite3.Connection' objects>", "<method 'executemany' of 'sqlite3.Connection'"
             " objects>", "<method 'execute' of 'sqlite3.Cursor' objects>")


def run(checkout: Path, tasks: int, out: Path) -> str:
    hook = out / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    prof = out / "prof"
    prof.mkdir()
    env = {**os.environ, "CALLCOUNT_DIR": str(prof),
           "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([str(checkout / ".venv/bin/python"), "benchmarks/dispatch.py", "--tasks", str(tasks)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{checkout}: dispatch.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def daemon_threads(prof: Path) -> dict[str, pstats.Stats]:
    """The daemon's profiles by thread kind: the one process whose threads ran aiosqlite's worker."""
    pid = next((p.name.split("-")[0] for p in prof.glob("*-thread-*-_connection_worker_thread.prof")), None)
    if pid is None:
        sys.exit(f"no daemon profile in {prof}: {sorted(p.name for p in prof.iterdir())}")
    kinds: dict[str, pstats.Stats] = {}
    for f in sorted(prof.glob(f"{pid}-*.prof")):
        kind = "event loop" if f.name.endswith("-main.prof") else re.sub(r"^\d+-thread-\d+-", "", f.stem)
        kind = {"_connection_worker_thread": "database"}.get(kind, kind)
        if kind in kinds:
            kinds[kind].add(str(f))
        else:
            kinds[kind] = pstats.Stats(str(f))
    return kinds


def counts(stats: pstats.Stats) -> collections.Counter[str]:
    c: collections.Counter[str] = collections.Counter()
    for (_path, _line, func), (_cc, ncalls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        # By function name, not module: a function that moved between modules is still itself.
        c[re.sub(r" at 0x[0-9a-f]+", "", func)] += ncalls
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("checkouts", nargs="+", type=Path)
    args = ap.parse_args()
    per: dict[Path, dict[str, collections.Counter[str]]] = {}
    for checkout in args.checkouts:
        with tempfile.TemporaryDirectory(prefix="callcount-") as tmp:
            stdout = run(checkout.resolve(), args.tasks, Path(tmp))
            threads = {kind: counts(s) for kind, s in daemon_threads(Path(tmp) / "prof").items()}
        per[checkout] = threads
        rate = next((line for line in stdout.splitlines() if "dispatched end to end" in line), "")
        print(f"{checkout}: {rate.strip()}  (profiled: the rate means nothing)")
        for kind in ("event loop", "database"):
            c = threads.get(kind, collections.Counter())
            sql = sum(c[k] for k in SQL_CALLS)
            print(f"  {kind:10s} {sum(c.values()) / args.tasks:8.2f} calls/task"
                  f"  {1000 * sql / args.tasks:7.2f} SQL statements per 1000 tasks")
    if len(args.checkouts) < 2:
        return
    first = args.checkouts[0]
    for other in args.checkouts[1:]:
        print(f"\nper task, {first} -> {other} (functions whose calls per task differ by 0.05 or more):")
        for kind in ("event loop", "database"):
            a, b = per[first].get(kind, collections.Counter()), per[other].get(kind, collections.Counter())
            moved = sorted((k for k in set(a) | set(b) if abs(b[k] - a[k]) / args.tasks >= 0.05),
                           key=lambda k: (b[k] - a[k]), reverse=True)
            print(f"  {kind}: {sum(a.values()) / args.tasks:.2f} -> {sum(b.values()) / args.tasks:.2f} calls/task")
            for k in moved:
                print(f"    {a[k] / args.tasks:6.2f} -> {b[k] / args.tasks:6.2f}  {k}")


if __name__ == "__main__":
    main()
