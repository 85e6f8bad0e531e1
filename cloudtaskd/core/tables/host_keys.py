"""The host_keys table: the SSH host key pinned per address and port, for the `ssh` provider's fixed
hosts (a cloud VM's key is pinned on its instance row: tables/instances.host_key)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudtaskd.core.tables.tx import Tx


def get(db: sqlite3.Connection, address: str, port: int) -> str | None:
    row = db.execute("SELECT key FROM host_keys WHERE address = ? AND port = ?", (address, port)).fetchone()
    return str(row["key"]) if row is not None else None


def pin(tx: Tx, address: str, port: int, key: str) -> None:
    """Pin a key unless one is pinned for this address: the first pin stays."""
    tx.db.execute("INSERT INTO host_keys (address, port, key, pinned_at) VALUES (?, ?, ?, ?)"
                  " ON CONFLICT (address, port) DO NOTHING", (address, port, key, tx.now))
