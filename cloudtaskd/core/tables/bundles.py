"""The bundles table (PostgreSQL only): each worker bundle's gzip tarball, keyed by its sha256, so
that a replica that did not receive it can materialize it in its own state directory
(cloudtaskd/http/bundles.py). SQLite has no such table: one daemon, one state directory."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx


def put(tx: Tx, digest: str, tarball: bytes) -> None:
    """Store it once: the same digest is the same bytes, so a second upload keeps the first row."""
    tx.db.execute("INSERT INTO bundles (digest, tarball, size, created_at) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT (digest) DO NOTHING", (digest, tarball, len(tarball), tx.now))


def tarball(db: sqlite3.Connection, digest: str) -> bytes | None:
    row = db.execute("SELECT tarball FROM bundles WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else bytes(row[0])


def delete_many(tx: Tx, digests: list[str]) -> None:
    tx.db.executemany("DELETE FROM bundles WHERE digest = ?", [(d,) for d in digests])
