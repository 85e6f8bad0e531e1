"""The meta table: the daemon's own facts as key/value text (its id, the highest deleted job id)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx

DAEMON_ID = "daemon_id"  # this state directory's daemon, as the API and the agents know it
LAST_JOB_ID = "last_job_id"  # the highest id a deleted job had: job ids are not reused (tables/jobs.create)


def get(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def add(tx: Tx, key: str, value: str) -> None:
    tx.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))


def raise_last_job_id(tx: Tx, job_id: int) -> None:
    """meta.last_job_id is at least job_id from now on."""
    # Compared as numbers: the column is text, and in SQLite any text sorts above any number, so a
    # plain max() once lowered '41' to '7' and a deleted job's id could come back.
    tx.db.execute("INSERT INTO meta (key, value) VALUES ('last_job_id', ?) ON CONFLICT (key) DO UPDATE"
                  " SET value = CASE WHEN CAST(excluded.value AS BIGINT) > CAST(meta.value AS BIGINT)"
                  " THEN excluded.value ELSE meta.value END", (str(job_id),))
