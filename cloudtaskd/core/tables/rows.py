"""Rows read by column name on either connection: the writer's rows are plain tuples (its row
factory is left alone so the hot statements build no Row objects), so a table module asks for named
rows per cursor here."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from cloudtaskd.core.tables.bulk import postgres


def _named(db: sqlite3.Connection) -> Any:
    """A cursor whose rows answer row["column"]: PostgreSQL's rows always do (pg/dbapi.py)."""
    if postgres(db):
        return db
    cur = db.cursor()
    cur.row_factory = sqlite3.Row
    return cur


def one(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    row: sqlite3.Row | None = _named(db).execute(sql, params).fetchone()
    return row


def every(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    rows: list[sqlite3.Row] = _named(db).execute(sql, params).fetchall()
    return rows


# The tasks' columns of a result line: the results pages (tables/tasks.py) and the feed of a job's
# results in the order they finished (tables/events.py) read the same.
RESULT_COLUMNS = "id, key, state, result, error, failures, instance_id, duration_s, finished_at"
