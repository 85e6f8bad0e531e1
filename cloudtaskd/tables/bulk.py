"""One statement per chunk of rows: the way every table module writes many rows."""

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
