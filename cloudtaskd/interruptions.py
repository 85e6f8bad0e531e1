"""Spot interruptions: what the daemon records when a cloud takes (or threatens to take) an
instance, and the observed rate per offer that steers selection.

Two ways an interruption is learnt: the agent's notice (AWS instance-action, GCP preempted, Azure
Preempt) relayed over its websocket, or a spot instance vanishing at its provider with no notice.
Either way the instance is marked `interrupted_at`: whatever it still holds when its leases run
out goes back to the queue uncounted (queue.requeue_interrupted), because an interruption is never
a task failure. A rebalance recommendation (AWS) only marks it `at_risk_since`: the scaler starts
its replacement, then drains it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from cloudtaskd.errors import TransitionError
from cloudtaskd.orchestrator.selection import interruption_rate
from cloudtaskd.states import InstanceEvent, InstanceState
from cloudtaskd.store import Tx

INTERRUPTION = "interruption"
REBALANCE = "rebalance"
# Rates are observed over this window: a zone that was short of capacity last month says little now.
RATE_WINDOW_S = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Recorded:
    instance_id: str
    offer_key: str
    kind: str
    new: bool  # False: the same notice again (an agent resends it after a reconnect)
    drained: bool  # the instance was moved to draining by this notice


def record(tx: Tx, instance_id: str, kind: str, source: str, deadline: float | None,
           detail: str) -> Recorded | None:
    """Record a notice once per instance and kind; an interruption also drains the instance (it
    takes no new leases, and the scaler counts it out so its replacement starts now)."""
    row = tx.db.execute("SELECT state, offer FROM instances WHERE id = ?", (instance_id,)).fetchone()
    if row is None:
        return None
    state, offer = InstanceState(row[0]), json.loads(row[1] or "{}")
    key = str(offer.get("key") or f"{instance_id.split('-', 1)[0]}/?/?/?")
    cur = tx.db.execute(
        "INSERT OR IGNORE INTO interruptions (instance_id, offer_key, kind, source, noticed_at, deadline, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)", (instance_id, key, kind, source, tx.now, deadline, detail[:200]))
    if cur.rowcount == 0:
        return Recorded(instance_id, key, kind, new=False, drained=False)
    column = "interrupted_at" if kind == INTERRUPTION else "at_risk_since"
    tx.db.execute(f"UPDATE instances SET {column} = coalesce({column}, ?) WHERE id = ?", (tx.now, instance_id))
    when = "" if deadline is None else f" in {max(0.0, deadline - tx.now):.0f} s"
    tx.event(f"spot_{kind}", instance_id=instance_id, detail=f"{source}: {detail}{when} ({key})"[:500])
    drained = False
    if kind == INTERRUPTION and state in (InstanceState.RUNNING, InstanceState.STARTING):
        try:
            tx.transition_instance(instance_id, InstanceEvent.DRAIN)
            drained = True
        except TransitionError:
            pass
    return Recorded(instance_id, key, kind, new=True, drained=drained)


def counts(db: sqlite3.Connection, now: float, window_s: float = RATE_WINDOW_S) -> list[dict[str, Any]]:
    """Per offer, over the instances of the last window: instances, instance-hours (launch to end
    or now), interruptions and rebalance recommendations (each instance counted once)."""
    rows = db.execute(
        "SELECT json_extract(offer, '$.key'), json_extract(offer, '$.spot'), count(*),"
        " sum(max(0.0, coalesce(ended_at, ?) - created_at)) / 3600.0,"
        " sum(interrupted_at IS NOT NULL), sum(at_risk_since IS NOT NULL)"
        " FROM instances WHERE coalesce(ended_at, ?) >= ? AND json_extract(offer, '$.key') IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 5 DESC, 1",
        (now, now, now - window_s),
    ).fetchall()
    return [{"offer": r[0], "spot": bool(r[1]), "instances": r[2], "instance_hours": round(r[3], 3),
             "interruptions": r[4], "rebalances": r[5]} for r in rows]


def rates(db: sqlite3.Connection, now: float, window_s: float = RATE_WINDOW_S) -> dict[str, float]:
    """Interruptions per instance-hour by offer key, smoothed by the selection prior."""
    return {c["offer"]: interruption_rate(c["interruptions"], c["instance_hours"], spot=c["spot"])
            for c in counts(db, now, window_s)}
