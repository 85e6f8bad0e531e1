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

from cloudtaskd.core.states import InstanceEvent, InstanceState
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import instances
from cloudtaskd.core.tables import interruptions as table
from cloudtaskd.errors import TransitionError
from cloudtaskd.fleet.orchestrator.selection import interruption_rate

INTERRUPTION = table.INTERRUPTION
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
    row = instances.state_and_offer(tx, instance_id)
    if row is None:
        return None
    state, offer = row.state, json.loads(row.offer)
    key = str(offer.get("key") or f"{instance_id.split('-', 1)[0]}/?/?/?")
    if not table.add(tx, instance_id, key, kind, source, deadline, detail[:200]):
        return Recorded(instance_id, key, kind, new=False, drained=False)
    if kind == INTERRUPTION:
        instances.mark_interrupted(tx, instance_id)
    else:
        instances.mark_at_risk(tx, instance_id)
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
    return [{"offer": r["offer"], "spot": bool(r["spot"]), "instances": r["n"], "instance_hours": round(r["hours"], 3),
             "interruptions": r["interrupted"], "rebalances": r["at_risk"]}
            for r in instances.offer_history(db, now, now - window_s)]


def rates(db: sqlite3.Connection, now: float, window_s: float = RATE_WINDOW_S) -> dict[str, float]:
    """Interruptions per instance-hour by offer key, smoothed by the selection prior."""
    return {c["offer"]: interruption_rate(c["interruptions"], c["instance_hours"], spot=c["spot"])
            for c in counts(db, now, window_s)}
