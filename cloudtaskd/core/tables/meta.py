"""The meta table: the daemon's own facts as key/value text (its id, the highest deleted job id)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx

DAEMON_ID = "daemon_id"  # this state directory's daemon, as the API and the agents know it
LAST_JOB_ID = "last_job_id"  # the highest id a deleted job had: job ids are not reused (tables/jobs.create)
# On PostgreSQL, the fingerprints every replica must share (core/pg/shared_identity.py): the TLS CA's,
# and per cloud provider the SSH key it logs in to its VMs with.
TLS_CA_SHA256 = "tls_ca_sha256"
SSH_KEY_SHA256_PREFIX = "ssh_key_sha256:"


def ssh_key_sha256(provider: str) -> str:
    """The key under which the replicas' SSH key for this provider's VMs is recorded."""
    return f"{SSH_KEY_SHA256_PREFIX}{provider}"


def forget_sql(key: str) -> str:
    """Run by hand (psql) to forget a recorded fingerprint, so that the next replica to start records its own."""
    assert "'" not in key, key  # our own constant keys: quoted as they are
    return f"DELETE FROM meta WHERE key = '{key}';"


FORGET_TLS_CA_SQL = forget_sql(TLS_CA_SHA256)


def get(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def add(tx: Tx, key: str, value: str) -> None:
    tx.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))


def claim(tx: Tx, key: str, value: str) -> tuple[str, bool]:
    """The key's value, and whether this call set it: `value` if the key had none, else the one
    already there. Two transactions claiming at once get the same answer: the second's insert waits
    for the first's commit on the key's unique index and then does nothing, and the read that
    follows (a statement of its own: READ COMMITTED on PostgreSQL) sees the first's row."""
    cur = tx.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
    inserted = cur.rowcount == 1
    row = tx.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    assert row is not None  # inserted above or already there, and no statement deletes it
    return str(row[0]), inserted


def raise_last_job_id(tx: Tx, job_id: int) -> None:
    """meta.last_job_id is at least job_id from now on."""
    # Compared as numbers: the column is text, and in SQLite any text sorts above any number, so a
    # plain max() once lowered '41' to '7' and a deleted job's id could come back.
    tx.db.execute("INSERT INTO meta (key, value) VALUES ('last_job_id', ?) ON CONFLICT (key) DO UPDATE"
                  " SET value = CASE WHEN CAST(excluded.value AS BIGINT) > CAST(meta.value AS BIGINT)"
                  " THEN excluded.value ELSE meta.value END", (str(job_id),))
