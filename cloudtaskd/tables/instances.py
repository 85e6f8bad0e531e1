"""The instances table: every statement that adds or reads machines for the fleet's bookkeeping.

State changes go through `Tx.transition_instance` (store.py), the one guarded door for an edge of
states.INSTANCE_TRANSITIONS; this module adds rows and answers the reconciler's questions."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from cloudtaskd.states import InstanceState as IS
from cloudtaskd.states import TaskState, sql_lit

if TYPE_CHECKING:  # store.py imports this module for Tx.transition_instance
    from cloudtaskd.store import Tx

EXTERNAL = "external"  # the provider of a machine its owner runs (POST /v1/instances), not the daemon
_LEASED_SQL = sql_lit(TaskState.LEASED)


def add(tx: Tx, instance_id: str, *, provider: str, pool_id: int, state: IS, slots: int, token_hash: str,
        offer: str = "{}", price_per_hour: float = 0.0) -> None:
    """Add a machine: `pending` when the daemon is about to launch it, `starting` when its owner
    registered it and its agent is still to connect. offer and price_per_hour: the schema's defaults
    for a machine the daemon does not pay for."""
    if state not in (IS.PENDING, IS.STARTING):
        raise ValueError(f"an instance starts pending or starting, not {state}")
    tx.db.execute(
        "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer, price_per_hour, created_at,"
        " state_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (instance_id, provider, pool_id, state.value, slots, token_hash, offer, price_per_hour, tx.now, tx.now),
    )


def externals_to_settle(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """External machines the reconciler may have to move on (id, state, state_changed_at, and `holds`:
    whether it holds a lease now)."""
    return db.execute(
        "SELECT i.id, i.state, i.state_changed_at,"
        f" EXISTS (SELECT 1 FROM tasks t WHERE t.state = {_LEASED_SQL} AND t.instance_id = i.id) AS holds"
        " FROM instances i WHERE i.provider = ? AND i.state IN (?, ?, ?)",
        (EXTERNAL, IS.STARTING.value, IS.DRAINING.value, IS.STOPPING.value)).fetchall()


def state_of(db: sqlite3.Connection, instance_id: str) -> str | None:
    row = db.execute("SELECT state FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return None if row is None else str(row[0])


def set_if_state(db: sqlite3.Connection, instance_id: str, current: IS, columns: dict[str, Any]) -> bool:
    """Set columns of one instance if it is still `current`: False when it moved meanwhile. The
    column names come from the daemon's own code (Tx.transition_instance), never from a request."""
    assignments = ", ".join(f"{k} = ?" for k in columns)
    cur = db.execute(f"UPDATE instances SET {assignments} WHERE id = ? AND state = ?",
                     (*columns.values(), instance_id, current.value))
    return cur.rowcount == 1
