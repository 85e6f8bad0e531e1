"""One owner per table: every SQL statement whose main table (the one written, or the FROM of a
read) is an owned table lives in that table's module in cloudtaskd/tables/, and nowhere else. The
rest of the daemon calls the module's named functions (docs/architecture.md, "The tables")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests import paths

PACKAGE = paths.ROOT / "cloudtaskd"
# Table -> the one module allowed to hold its statements. A table listed here has an owner; one line
# per table, so that each step of issue 16 adds its own.
OWNERS = {
    "instances": "tables/instances.py",
    "events": "tables/events.py",
    "interruptions": "tables/interruptions.py",
    "catalog": "tables/catalog.py",
    "host_keys": "tables/host_keys.py",
}
# The PostgreSQL store keeps its own dialect of every statement (cloudtaskd/pg/).
SKIPPED_DIRS = {PACKAGE / "pg"}
# A string that begins a statement (a fragment of a WHERE, whose subquery reads another table, is
# part of its own table's statement and is not one).
STATEMENT = re.compile(r"\s*(SELECT|UPDATE|INSERT|DELETE)\b")
# The main table: the first FROM (a FROM of a subquery in parentheses skips to the inner one), the
# target of INSERT INTO or of UPDATE.
MAIN_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+([a-z_][a-z0-9_]*)")


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string in the module, an f-string's literal parts joined with {} for each value."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return out


def misplaced(root: Path, owners: dict[str, str]) -> list[str]:
    """`path:line: table in '...'` for each statement on an owned table outside its owner."""
    found: dict[tuple[str, int], str] = {}  # an f-string's first part is a string of its own: one hit a line
    for path in sorted(root.rglob("*.py")):
        if any(d in path.parents for d in SKIPPED_DIRS):
            continue
        rel = path.relative_to(root).as_posix()
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            if not STATEMENT.match(text):
                continue
            m = MAIN_TABLE.search(text)
            if m and m.group(1) in owners and owners[m.group(1)] != rel:
                found.setdefault((rel, line), f"{rel}:{line}: {m.group(1)} (owned by {owners[m.group(1)]})"
                                                f" in {text[:90]!r}")
    return [found[k] for k in sorted(found)]


def test_every_statement_on_an_owned_table_is_in_its_module() -> None:
    found = misplaced(PACKAGE, OWNERS)
    assert not found, ("SQL on a table outside the module that owns it: add a named function to the owner"
                       " (cloudtaskd/tables/) and call it:\n" + "\n".join(found))


def test_every_owner_exists() -> None:
    assert all((PACKAGE / module).is_file() for module in OWNERS.values())


def test_the_check_sees_a_statement(tmp_path: Path) -> None:
    # The shapes the statements are written in: adjacent literals, an f-string, a subquery in FROM,
    # INSERT OR IGNORE; a statement whose main table is another one, prose and a fragment are not hits.
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "events.py").write_text('A = "SELECT * FROM events"\n')
    (tmp_path / "m.py").write_text(
        'A = ("SELECT id FROM instances"\n     " WHERE state = ?")\n'
        'B = f"UPDATE instances SET {1} = ? WHERE id = ?"\n'
        'C = "SELECT e.id FROM (SELECT id FROM events WHERE job_id = ?) AS e JOIN tasks t ON t.id = e.task_id"\n'
        'D = "INSERT OR IGNORE INTO host_keys (address) VALUES (?)"\n'
        'E = "SELECT p.id FROM pools p WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.pool_id = p.id)"\n'
        'F = "one UPDATE per job, and the instances FROM which it came"\n'
        'G = " AND (job_id = ? OR instance_id IN (SELECT i.id FROM instances i))"\n')
    hits = misplaced(tmp_path, {"instances": "tables/instances.py", "events": "tables/events.py",
                                "host_keys": "tables/host_keys.py"})
    assert [h.split(":")[1] for h in hits] == ["1", "3", "4", "5"]
