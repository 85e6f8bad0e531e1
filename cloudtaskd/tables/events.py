"""The events table: the rows a transaction buffered (Tx.event), written at its commit."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from cloudtaskd.tables.bulk import bulk, postgres

# (ts, kind, job_id, task_id, instance_id, detail): the order Tx.event buffers a row in.
_INSERT = ("INSERT INTO events (ts, kind, job_id, task_id, instance_id, detail) SELECT r.value->>0,"
           " r.value->>1, r.value->>2, r.value->>3, r.value->>4, r.value->>5 FROM json_each(?) AS r")
_INSERT_PG = ("INSERT INTO events (ts, kind, job_id, task_id, instance_id, detail) SELECT (r.value->>0)::float8,"
              " r.value->>1, (r.value->>2)::bigint, (r.value->>3)::bigint, r.value->>4, r.value->>5"
              " FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS r(value, n) ORDER BY n")


def insert_many(db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
    bulk(db, _INSERT_PG if postgres(db) else _INSERT, rows)
