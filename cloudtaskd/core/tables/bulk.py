"""One statement per chunk of rows: the way every table module writes many rows; and which database
a table function runs on, where its SQL must differ."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from cloudtask_wire import jsonx

BULK_CHUNK = 20_000


def bulk(db: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """executemany as one statement per chunk: `sql` reads its rows as r.value->>0, r.value->>1, ...
    from `json_each(?) AS r`. sqlite3 lets go of the GIL around every step, and executemany takes a
    step per row; with the event loop busy on thousands of agent connections, each time the writer
    thread wants the GIL back it can wait out a switch interval, and a dispatch round of 4,000 tasks
    took a second (benchmarks/scale.py). One statement is one step."""
    for i in range(0, len(rows), BULK_CHUNK):
        db.execute(sql, (jsonx.dumps(rows[i:i + BULK_CHUNK]),))


def sqlite_hint(db: sqlite3.Connection, hint: str) -> str:
    """An SQLite planner hint (` INDEXED BY x`, ` NOT INDEXED`) in this statement on SQLite; nothing on
    PostgreSQL, which has no such hints and plans these statements well by itself."""
    return "" if postgres(db) else hint


def postgres(db: sqlite3.Connection) -> bool:
    """Does this connection lead to PostgreSQL (cloudtaskd.core.pg.dbapi.PgDb) rather than SQLite? Where a
    statement cannot be written once for both, the table module keeps the two forms side by side
    and picks with this. On PostgreSQL `bulk` statements read the same JSON array as
    `jsonb_array_elements(?::jsonb) AS r(value)`, with casts (->> gives text there)."""
    return type(db) is not sqlite3.Connection
