"""The instances table: every statement that adds or reads machines for the fleet's bookkeeping.

State changes go through `Tx.transition_instance` (store.py), the one guarded door for an edge of
states.INSTANCE_TRANSITIONS; this module adds rows and answers the reconciler's questions."""

from __future__ import annotations

import sqlite3

from cloudtaskd.states import InstanceState as IS
from cloudtaskd.states import TaskState, sql_lit
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
