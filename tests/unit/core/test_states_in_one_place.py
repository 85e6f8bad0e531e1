"""Task states are written down once, in cloudtaskd/core/states.py: no SQL outside the table modules
(cloudtaskd/core/tables/) types a task state as a string literal, and every hand list of states is gone.
A new state is then states.py plus a migration (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cloudtaskd.core import states
from cloudtaskd.core.states import COUNTER, TASK_STATE_LABELS, TaskState
from cloudtaskd.ctl import progress
from cloudtaskd.ctl.main import TASK_STATES as CTL_TASK_STATES
from tests import paths

PACKAGE = paths.ROOT / "cloudtaskd"
ALLOWED = {PACKAGE / "core" / "states.py"}
ALLOWED_DIRS = {PACKAGE / "core" / "tables"}
SQL = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE|WHERE)\b|\b(AND|IN|OR|SET)\b")
LITERAL = re.compile("'(" + "|".join(s.value for s in TaskState) + ")'")


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string in the module, an f-string's literal parts joined (Python has already joined the
    adjacent literals that spell one statement over several lines)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
    return out


def sql_state_literals(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path in ALLOWED or any(d in path.parents for d in ALLOWED_DIRS):
            continue
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            if SQL.search(text) and (m := LITERAL.search(text)):
                found.append(f"{path.relative_to(root.parent)}:{line}: {m.group(0)} in {text[:80]!r}")
    return found


def test_no_task_state_literal_in_sql_outside_the_tables() -> None:
    found = sql_state_literals(PACKAGE)
    assert not found, ("task states typed into SQL: build them from cloudtaskd/core/states.py (states.sql_in,"
                       " states.sql_lit) or move the statement into cloudtaskd/core/tables/:\n" + "\n".join(found))


def test_the_check_sees_a_literal(tmp_path: Path) -> None:
    # The scan itself must catch the shapes the SQL is written in: one literal, and an f-string.
    (tmp_path / "m.py").write_text('A = ("SELECT count(*) FROM tasks"\n     " WHERE state = \'leased\'")\n'
                                   'B = f"UPDATE tasks SET x = {1} WHERE state IN (\'dead\', \'cancelled\')"\n')
    assert {hit.split(':')[1] for hit in sql_state_literals(tmp_path)} == {'1', '3'}


def test_every_list_of_states_comes_from_states_py() -> None:
    assert tuple(CTL_TASK_STATES) == tuple(s.value for s in TaskState)
    assert set(COUNTER) == set(TaskState)
    assert set(TASK_STATE_LABELS) == set(TaskState)
    for segment, _, _ in TASK_STATE_LABELS.values():
        assert segment in progress.LONG_LABELS and segment in progress.SHORT_LABELS
    assert set(states.TERMINAL_TASK_STATES) | set(states.WAITING_TASK_STATES) == set(TaskState)
    assert states.sql_in(states.OPEN_TASK_STATES) == "('queued', 'leased', 'failed')"
