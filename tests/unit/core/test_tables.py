"""Each table's SQL lives in its owning module (docs/architecture.md, "The tables"), and the table
functions do what their names say, on a real SQLite store and a real PostgreSQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import cancels, jobs, meta, pools, purges, rows, uploads
from tests import paths

PACKAGE = paths.ROOT / "cloudtaskd"
# table -> the module (under cloudtaskd/) that holds every statement whose main table it is: the one
# written, or the FROM of a read. One line per table.
OWNERS = {
    "jobs": "core/tables/jobs.py",
    "uploads": "core/tables/uploads.py",
    "pools": "core/tables/pools.py",
    "cancels": "core/tables/cancels.py",
    "purges": "core/tables/purges.py",
    "meta": "core/tables/meta.py",
    "instances": "core/tables/instances.py",
    "events": "core/tables/events.py",
    "interruptions": "core/tables/interruptions.py",
    "catalog": "core/tables/catalog.py",
    "host_keys": "core/tables/host_keys.py",
    "tasks": "core/tables/tasks.py",
    "bundles": "core/tables/bundles.py",  # PostgreSQL only (test_pg_base.PG_ONLY)
}
PG_ONLY = {"bundles"}
NOT_SCANNED = ("core/pg/",)  # the PostgreSQL backend's own statements (its schema twins, locks, notify)
_WRITTEN = re.compile(r"\b(?:UPDATE|INSERT(?: OR \w+)? INTO|REPLACE INTO|DELETE FROM)\s+(\w+)")
_READ = re.compile(r"\bFROM\s+(\w+)")


def main_table(sql: str) -> str | None:
    """The table a statement writes, else the first one a SELECT reads FROM (a subquery's tables are
    not the statement's); None when the text is not a statement."""
    if m := _WRITTEN.search(sql):
        return m.group(1)
    # A fragment (" WHERE ... IN (SELECT ...)") is part of a statement whose head is nearby: its
    # subquery's table is not the statement's.
    if re.match(r"\s*(SELECT|WITH)\b", sql):
        return _top_from(sql)
    return None


def _top_from(sql: str) -> str | None:
    """The table after the statement's own FROM, not a subquery's in its select list or WHERE; a FROM
    over a subquery in parentheses is that subquery's."""
    depth = 0
    for m in re.finditer(r"\(|\)|\bFROM\s+", sql):
        if m.group() == "(":
            depth += 1
        elif m.group() == ")":
            depth -= 1
        elif depth == 0:
            rest = sql[m.end():]
            if not rest.startswith("("):
                word = _READ.match("FROM " + rest)
                return word.group(1) if word else None
            return _top_from(rest[1:])
    m = _READ.search(sql)
    return m.group(1) if m else None


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string, an f-string whole (its literal parts are not statements of their own)."""
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return out


def misplaced(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.as_posix().startswith(NOT_SCANNED):
            continue
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            table = main_table(text)
            if table in OWNERS and rel.as_posix() != OWNERS[table]:
                found.append(f"{rel}:{line}: a statement on {table} belongs in {OWNERS[table]}: {text[:80]!r}")
    return found


def test_every_statement_is_in_its_tables_module() -> None:
    found = misplaced(PACKAGE)
    assert not found, ("SQL outside its table's module: make it a named function there and call that:\n"
                       + "\n".join(found))


async def test_every_table_has_an_owner(tmp_path: Path) -> None:
    """A table a migration adds gets its module (and its line in OWNERS) with it."""
    store = Store(tmp_path / "cloudtask.db")
    await store.open()
    try:
        names = await store.read(lambda db: [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")])
    finally:
        await store.close()
    assert sorted(names) == sorted(set(OWNERS) - PG_ONLY)


def test_every_owner_exists() -> None:
    assert all((PACKAGE / module).is_file() for module in OWNERS.values())


def test_the_check_sees_a_statement_and_its_main_table(tmp_path: Path) -> None:
    (tmp_path / "core" / "tables").mkdir(parents=True)
    (tmp_path / "core" / "tables" / "jobs.py").write_text('A = "SELECT 1 FROM jobs WHERE id = ?"\n')
    # A subquery in the select list reads another table; the statement is the instances module's.
    (tmp_path / "core" / "tables" / "instances.py").write_text(
        'A = "SELECT i.id, EXISTS (SELECT 1 FROM jobs j WHERE j.pool_id = i.pool_id) FROM instances i"\n')
    (tmp_path / "m.py").write_text(
        'A = ("SELECT j.id FROM jobs j"\n     " WHERE j.state = ?")\n'
        'B = f"UPDATE pools SET created_at = {1} WHERE id = ?"\n'
        'C = "SELECT * FROM sqlite_master WHERE name IN (SELECT name FROM jobs)"\n'  # not a jobs statement
        'D = "INSERT INTO meta (key, value) VALUES (?, ?)"\n'
        '"""A docstring saying jobs are read from the jobs table."""\n')
    assert [hit.split(":")[:2] for hit in misplaced(tmp_path)] == [["m.py", "1"], ["m.py", "3"], ["m.py", "5"]]


# ---- the table functions on a real store ----------------------------------------------------------


@pytest.fixture
def store(both_stores: Store) -> Store:
    """The table functions run on SQLite and on PostgreSQL."""
    return both_stores


def _job(tx: Tx, pool_id: int, name: str = "j") -> int:
    return jobs.create(tx, name=name, pool_id=pool_id, max_attempts=3, timeout_s=None, max_instances=None,
                       policy="{}", max_total_cost=None, run_id="r1", run_owner="pid 1 on h", submission=None)


async def test_jobs_ids_are_not_reused_and_rows_are_named_on_the_writer(store: Store) -> None:
    def make(tx: Tx) -> tuple[int, int, int]:
        pool_id = pools.add(tx, "d1", "{}", "/w")
        first = _job(tx, pool_id)
        meta.raise_last_job_id(tx, 7)
        meta.raise_last_job_id(tx, 41)
        meta.raise_last_job_id(tx, 7)  # a lower id deleted later: compared as numbers, 41 stays
        return pool_id, first, _job(tx, pool_id)

    pool_id, first, second = await store.write(make, now=5.0)
    assert (first, second) == (1, 42)
    # The writer's rows are plain tuples; a table function still answers by column name.
    row = await store.write(lambda tx: jobs.counters(tx.db, second))
    assert row is not None
    assert (row["id"], row["state"], row["pool_id"], row["n_queued"]) == (42, "active", pool_id, 0)
    assert await store.read(lambda db: meta.get(db, meta.LAST_JOB_ID)) == "41"
    assert [r["digest"] for r in await store.read(lambda db: jobs.newest_with_worker(db))] == ["d1", "d1"]
    assert await store.read(lambda db: jobs.active_ids(db, pool_id)) == [1, 42]


async def test_jobs_pause_only_an_active_job_and_resume_only_its_cause(store: Store) -> None:
    job_id = await store.write(lambda tx: _job(tx, pools.add(tx, "d", "{}", "/")))
    assert await store.write(lambda tx: jobs.pause(tx, job_id, "over budget", jobs.BUDGET)) is True
    assert await store.write(lambda tx: jobs.pause(tx, job_id, "again", jobs.LAUNCH_FAILURES)) is False
    await store.write(lambda tx: jobs.resume_held(tx, job_id, "run_gone"))  # another cause: stays paused
    row = await store.read(lambda db: jobs.run_of(db, job_id))
    assert row is not None and (row["state"], row["pause_cause"], row["run_id"]) == ("paused", "budget", "r1")
    await store.write(lambda tx: jobs.resume_held(tx, job_id, jobs.BUDGET))
    assert await store.read(lambda db: jobs.state_of(db, job_id)) == "active"
    await store.write(lambda tx: jobs.resume_with_cap(tx, job_id, 2.5))
    budget = await store.read(lambda db: jobs.budget(db, job_id))
    assert budget is not None and budget["max_total_cost"] == 2.5
    assert await store.read(lambda db: jobs.run_of(db, job_id)["run_id"]) is None  # type: ignore[index]


async def test_jobs_counts_by_state_name_their_columns(store: Store) -> None:
    def make(tx: Tx) -> None:
        pool_id = pools.add(tx, "d", "{}", "/")
        done, running = _job(tx, pool_id), _job(tx, pool_id)
        jobs.add_to_counters(tx.db, done, {"n_succeeded": 3, "n_dead": 1})
        jobs.add_to_counters(tx.db, running, {"n_queued": 2, "n_leased": 1, "n_succeeded": 1})

    await store.write(make)
    by_state = {r["state"]: r for r in await store.read(jobs.count_by_state)}
    assert set(by_state) == {"done", "active"}
    assert (by_state["done"]["jobs"], by_state["done"]["n_succeeded"], by_state["done"]["n_dead"]) == (1, 3, 1)
    totals = await store.read(jobs.totals)
    assert (totals["succeeded"], totals["dead"], totals["queued"], totals["leased"]) == (4, 1, 2, 1)


async def test_pools_unused_are_those_no_job_or_instance_names(store: Store) -> None:
    def make(tx: Tx) -> tuple[int, int]:
        used, unused = pools.add(tx, "used", "{}", "/u"), pools.add(tx, "unused", "{}", "/n")
        _job(tx, used)
        return used, unused

    used, unused = await store.write(make, now=10.0)
    assert await store.read(lambda db: pools.id_of(db, "used")) == used
    assert [r["digest"] for r in await store.read(lambda db: pools.unused_before(db, 11.0))] == ["unused"]
    await store.write(lambda tx: pools.touch(tx, unused), now=20.0)  # uploaded again: young again
    assert await store.read(lambda db: pools.unused_before(db, 11.0)) == []
    await store.write(lambda tx: pools.delete_many(tx, [unused]))
    assert await store.read(lambda db: pools.by_digest(db, "unused")) is None


async def test_uploads_receiving_until_they_end_and_where_a_job_starts(store: Store) -> None:
    job_id = await store.write(lambda tx: _job(tx, pools.add(tx, "d", "{}", "/")))
    first = await store.write(lambda tx: uploads.create(tx, job_id))
    await store.write(lambda tx: uploads.add_staged(tx, job_id, 5, 100))
    await store.write(lambda tx: uploads.add_staged(tx, job_id, 5, 90))
    assert await store.read(lambda db: (uploads.receiving(db, job_id), uploads.n_tasks(db, first),
                                        uploads.start_after(db, first))) == (True, 10, 90)
    assert [r["id"] for r in await store.read(uploads.unfinished)] == [first]
    await store.write(lambda tx: uploads.set_committing(tx, first, job_id))
    await store.write(lambda tx: uploads.set_state(tx, first, uploads.COMMITTED))
    assert await store.read(lambda db: (uploads.receiving(db, job_id), uploads.state_of(db, first))) == (
        False, "committed")
    assert await store.read(lambda db: uploads.job_start(db, job_id)) == 90
    await store.write(lambda tx: uploads.create(tx, job_id))  # nothing staged yet: no start known
    assert await store.read(lambda db: uploads.job_start(db, job_id)) is None
    await store.write(lambda tx: uploads.delete_of_job(tx, job_id))
    assert await store.read(uploads.unfinished) == []


async def test_cancels_and_purges_keep_their_cursors(store: Store) -> None:
    def make(tx: Tx) -> None:
        cancels.start(tx, 1, 10, 100)
        cancels.advance(tx, 1, 50, 30)
        purges.start(tx, 2, task_cursor=5, task_last=500, event_last=900, tasks=77)
        purges.set_task_cursor(tx, 2, 500)
        purges.set_event_cursor(tx, 2, 40)

    await store.write(make)
    assert await store.read(lambda db: cancels.pending(db, 1)) == cancels.Pending(cursor=50, total=100, done=30)
    assert await store.read(lambda db: purges.cursors(db, 2)) == purges.Cursors(500, 500, 40, 900)
    assert await store.read(cancels.jobs) == [1] and await store.read(purges.jobs) == [2]
    assert await store.write(lambda tx: purges.finish(tx, 2)) == 77
    await store.write(lambda tx: cancels.finish(tx, 1))
    assert await store.read(lambda db: (cancels.pending(db, 1), purges.cursors(db, 2))) == (None, None)


async def test_meta_keeps_a_key_once(store: Store) -> None:
    assert await store.read(lambda db: meta.get(db, meta.DAEMON_ID)) is None
    await store.write(lambda tx: meta.add(tx, meta.DAEMON_ID, "abc"))
    assert await store.read(lambda db: meta.get(db, meta.DAEMON_ID)) == "abc"
    row = await store.read(lambda db: rows.one(db, "SELECT key, value FROM meta"))
    assert row is not None and dict(row) == {"key": "daemon_id", "value": "abc"}
