"""The instances table: every statement that adds, reads or marks the fleet's machines.

State changes go through `Tx.transition_instance` (store.py), the one guarded door for an edge of
states.INSTANCE_TRANSITIONS; this module adds rows, sets the columns that are not the state (last
seen, last error, a pinned host key, a spot notice's time) and answers everyone's questions about the
fleet. Functions taking `Tx` run on the writer, whose rows are plain tuples: what they read comes back
as a small NamedTuple. Reads on the reader connection return sqlite3.Row, read by column name."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, NamedTuple

from cloudtaskd.core.pg import locks
from cloudtaskd.core.states import ACTIVE_INSTANCE_STATES, AGENT_INSTANCE_STATES, TaskState, sql_in, sql_lit
from cloudtaskd.core.states import InstanceState as IS
from cloudtaskd.core.tables.bulk import postgres
from cloudtaskd.errors import FleetFull

if TYPE_CHECKING:  # store.py imports this module for Tx.transition_instance
    from cloudtaskd.core.tables.tx import Tx

EXTERNAL = "external"  # the provider of a machine its owner runs (POST /v1/instances), not the daemon
_LEASED_SQL = sql_lit(TaskState.LEASED)
_STOPPED = sql_lit(IS.STOPPED)
_RUNNING = sql_lit(IS.RUNNING)
_PENDING = sql_lit(IS.PENDING)
_EXTERNAL = f"'{EXTERNAL}'"
_ACTIVE = sql_in(ACTIVE_INSTANCE_STATES)
_AGENTS = sql_in(AGENT_INSTANCE_STATES)


def _offer(db: sqlite3.Connection, key: str) -> str:
    """A field of the offer an instance was launched on, as SQL: SQLite's JSON text through json_extract
    (true is 1 there), PostgreSQL's JSONB column through ->> (text), spot cast to 0/1 as SQLite gives it."""
    if not postgres(db):
        return f"json_extract(offer, '$.{key}')"
    if key == "spot":
        return "CAST(CAST(offer->>'spot' AS BOOLEAN) AS INTEGER)"
    return f"(offer->>'{key}')"


def _larger(db: sqlite3.Connection) -> str:
    return "greatest" if postgres(db) else "max"  # SQLite's two-argument max() is PostgreSQL's greatest()


# ---- one machine ------------------------------------------------------------------------------


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


def get(db: sqlite3.Connection, instance_id: str) -> sqlite3.Row | None:
    """Every column of one instance (the API's instance object)."""
    row: sqlite3.Row | None = db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return row


def exists(db: sqlite3.Connection, instance_id: str) -> bool:
    return db.execute("SELECT 1 FROM instances WHERE id = ?", (instance_id,)).fetchone() is not None


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


def set_last_error(tx: Tx, instance_id: str, message: str) -> None:
    """Why the last attempt on it failed (a terminate, say), without moving its state."""
    tx.db.execute("UPDATE instances SET last_error = ? WHERE id = ?", (message, instance_id))


# ---- agents: authentication and liveness ------------------------------------------------------


class Auth(NamedTuple):
    state: IS
    token_hash: str
    pool_id: int


def token_hash_of(db: sqlite3.Connection, instance_id: str) -> str | None:
    """The hash of the instance's agent token (empty once revoked); None: no such instance."""
    row = db.execute("SELECT token_hash FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return None if row is None else str(row["token_hash"])


def auth_of(tx: Tx, instance_id: str) -> Auth | None:
    """What a hello is checked against, on the writer (the check and the move to running are one
    transaction)."""
    row = tx.db.execute("SELECT state, token_hash, pool_id FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return None if row is None else Auth(IS(row[0]), row[1], row[2])


def touch(tx: Tx, instance_id: str) -> None:
    """Its agent was heard now (at hello and at disconnect only: not a write per frame)."""
    tx.db.execute("UPDATE instances SET last_seen_at = ? WHERE id = ?", (tx.now, instance_id))


def touch_many(tx: Tx, instance_ids: list[str]) -> None:
    """These agents are connected to this replica now. On PostgreSQL each replica writes this for its
    own agents every few seconds, so the leader knows which agents live on another replica."""
    if instance_ids:
        tx.db.execute(f"UPDATE instances SET last_seen_at = ? WHERE id IN ({','.join('?' * len(instance_ids))})",
                      (tx.now, *instance_ids))


def reserve_place(tx: Tx, provider: str, *, max_total: int, max_provider: int) -> None:
    """Refuse a launch over scaling.max_instances or the provider's max_instances (FleetFull), counting
    every live instance in the database, whoever launched it. Run in the transaction that inserts the
    row: on PostgreSQL under a transaction-scoped advisory lock, so two replicas launching at once
    (even two leaders for a moment) count each other's rows; SQLite has a single writer already."""
    if postgres(tx.db):
        tx.db.execute("SELECT pg_advisory_xact_lock(?)", (locks.QUOTA,))
    live, mine = tx.db.execute(
        "SELECT count(*), coalesce(sum(CASE WHEN provider = ? THEN 1 ELSE 0 END), 0)"
        f" FROM instances WHERE state != {_STOPPED} AND provider != {_EXTERNAL}", (provider,)).fetchone()
    if live >= max_total:
        raise FleetFull("scaling.max_instances", max_total, int(live))
    if mine >= max_provider:
        raise FleetFull(f"providers.{provider}.max_instances", max_provider, int(mine))


def with_agents(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """(id, provider, state, last_seen_at) of the instances whose agent is out there or coming:
    starting, running, draining (last_seen_at: when a replica last wrote it connected, touch_many)."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT id, provider, state, last_seen_at FROM instances WHERE state IN {_AGENTS}").fetchall()
    return rows


# ---- host keys and spot notices ---------------------------------------------------------------


def host_key(db: sqlite3.Connection, instance_id: str) -> str | None:
    """The SSH host key pinned for this instance, if any."""
    row = db.execute("SELECT host_key FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return str(row["host_key"]) if row is not None and row["host_key"] else None


def pin_host_key(tx: Tx, instance_id: str, key: str) -> bool:
    """Pin the host key unless one is pinned: the first pin wins, a later different key never
    replaces it silently. True when this call pinned it."""
    cur = tx.db.execute("UPDATE instances SET host_key = ? WHERE id = ? AND host_key IS NULL", (key, instance_id))
    return bool(cur.rowcount)


class StateAndOffer(NamedTuple):
    state: IS
    offer: str  # the JSON of the offer it was launched on ("{}" for one the daemon did not buy)


def state_and_offer(tx: Tx, instance_id: str) -> StateAndOffer | None:
    row = tx.db.execute("SELECT state, offer FROM instances WHERE id = ?", (instance_id,)).fetchone()
    return None if row is None else StateAndOffer(IS(row[0]), row[1] or "{}")


def mark_interrupted(tx: Tx, instance_id: str) -> None:
    """The cloud took it, or said it will: set interrupted_at once (the first notice's time stays)."""
    tx.db.execute("UPDATE instances SET interrupted_at = coalesce(interrupted_at, ?) WHERE id = ?",
                  (tx.now, instance_id))


def mark_at_risk(tx: Tx, instance_id: str) -> None:
    """A rebalance recommendation: set at_risk_since once (the scaler replaces it, then drains it)."""
    tx.db.execute("UPDATE instances SET at_risk_since = coalesce(at_risk_since, ?) WHERE id = ?",
                  (tx.now, instance_id))


# ---- the reconciler ---------------------------------------------------------------------------


def externals_to_settle(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """External machines the reconciler may have to move on (id, state, state_changed_at, and `holds`:
    whether it holds a lease now)."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT i.id, i.state, i.state_changed_at,"
        f" EXISTS (SELECT 1 FROM tasks t WHERE t.state = {_LEASED_SQL} AND t.instance_id = i.id) AS holds"
        " FROM instances i WHERE i.provider = ? AND i.state IN (?, ?, ?)",
        (EXTERNAL, IS.STARTING.value, IS.DRAINING.value, IS.STOPPING.value)).fetchall()
    return rows


def live_of_provider(db: sqlite3.Connection, provider: str) -> list[sqlite3.Row]:
    """One provider's instances not stopped, as its sync needs them: id, pool_id, state, created_at,
    state_changed_at, interrupted_at, and from the offer `spot` and `offer_key`."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT id, pool_id, state, created_at, state_changed_at, interrupted_at, last_seen_at,"
        f" {_offer(db, 'spot')} AS spot, {_offer(db, 'key')} AS offer_key"
        f" FROM instances WHERE provider = ? AND state != {_STOPPED}",
        (provider,),
    ).fetchall()
    return rows


def running_in_pool(db: sqlite3.Connection, pool_id: int) -> list[str]:
    """Ids of the pool's running instances."""
    return [r["id"] for r in db.execute(f"SELECT id FROM instances WHERE pool_id = ? AND state = {_RUNNING}",
                                        (pool_id,))]


def launched_live(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """The daemon's own instances not stopped (external ones are not its to scale): id, provider,
    pool_id, state, slots, price_per_hour, at_risk, offer_key."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT id, provider, pool_id, state, slots, price_per_hour, at_risk_since IS NOT NULL AS at_risk,"
        f" {_offer(db, 'key')} AS offer_key FROM instances"
        f" WHERE state NOT IN ({_STOPPED}) AND provider != {_EXTERNAL}"
    ).fetchall()
    return rows


def to_stop(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """(id, provider, state) of the daemon's own instances not stopped: what a shutdown stops."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT id, provider, state FROM instances WHERE state != {_STOPPED} AND provider != {_EXTERNAL}").fetchall()
    return rows


def pending(db: sqlite3.Connection) -> list[str]:
    """Ids of the instances whose launch has not been answered."""
    return [r["id"] for r in db.execute(f"SELECT id FROM instances WHERE state = {_PENDING}")]


# ---- the API's and the status page's counts -----------------------------------------------------


def active_in_pool(db: sqlite3.Connection, pool_id: int) -> int:
    """A job's instances: its pool's, launched and not on their way out (ACTIVE_INSTANCE_STATES)."""
    return int(db.execute(f"SELECT count(*) AS n FROM instances WHERE pool_id = ? AND state IN {_ACTIVE}",
                          (pool_id,)).fetchone()["n"])


def active_by_pool(db: sqlite3.Connection) -> dict[int, int]:
    """active_in_pool for every pool that has any."""
    return {r["pool_id"]: r["n"] for r in db.execute(
        f"SELECT pool_id, count(*) AS n FROM instances WHERE state IN {_ACTIVE} GROUP BY pool_id")}


def listing(db: sqlite3.Connection, *, stopped: bool, limit: int = 10_000) -> list[sqlite3.Row]:
    """Every column of the newest instances, the stopped ones too only if `stopped`."""
    where = "" if stopped else f" WHERE state != {_STOPPED}"
    rows: list[sqlite3.Row] = db.execute(f"SELECT * FROM instances{where} ORDER BY created_at DESC LIMIT ?",
                                         (limit,)).fetchall()
    return rows


def live_by_type(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Instances not stopped, grouped: provider, machine_type, state, n, slots, price_per_hour (summed)."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT provider, {_offer(db, 'machine_type')} AS machine_type, state, count(*) AS n,"
        " sum(slots) AS slots, sum(price_per_hour) AS price_per_hour"
        f" FROM instances WHERE state != {_STOPPED} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()
    return rows


def live_counts(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Instances not stopped, counted by provider, machine_type and state (n): the metrics' gauge."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT provider, {_offer(db, 'machine_type')} AS machine_type, state, count(*) AS n FROM instances"
        f" WHERE state != {_STOPPED} GROUP BY 1, 2, 3").fetchall()
    return rows


def live_by_market(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Instances not stopped by provider and spot (0/1): n, price_per_hour (summed)."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT provider, coalesce({_offer(db, 'spot')}, 0) AS spot, count(*) AS n,"
        f" sum(price_per_hour) AS price_per_hour FROM instances WHERE state != {_STOPPED} GROUP BY 1, 2").fetchall()
    return rows


# ---- cost (cloudtaskd/core/costs.py turns these price-seconds into USD) -------------------------------


def spend_by_provider(db: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
    """Per provider the daemon pays (not external): n instances, `spent` in price-seconds (USD/h x s,
    launch to end or now), `rate` the USD/h of those not stopped."""
    rows: list[sqlite3.Row] = db.execute(
        "SELECT provider, count(*) AS n, sum(price_per_hour * (coalesce(ended_at, ?) - created_at)) AS spent,"
        f" sum(CASE WHEN state != {_STOPPED} THEN price_per_hour ELSE 0 END) AS rate"
        f" FROM instances WHERE provider != {_EXTERNAL} GROUP BY provider", (now,)).fetchall()
    return rows


def pool_cost(db: sqlite3.Connection, pool_id: int, now: float) -> sqlite3.Row:
    """A pool's instances: `cost` in price-seconds, `rate` USD/h and `live_slots` of those not stopped."""
    row: sqlite3.Row = db.execute(
        "SELECT sum(price_per_hour * (coalesce(ended_at, ?) - created_at)) AS cost,"
        f" sum(CASE WHEN state != {_STOPPED} THEN price_per_hour ELSE 0 END) AS rate,"
        f" sum(CASE WHEN state != {_STOPPED} THEN slots ELSE 0 END) AS live_slots"
        " FROM instances WHERE pool_id = ?", (now, pool_id)).fetchone()
    return row


class Spend(NamedTuple):
    price_seconds: float  # USD/h x seconds: divide by 3600 for USD
    rate_per_hour: float  # USD per hour its live instances cost now


def pool_spend_since(db: sqlite3.Connection, pool_id: int, since: float, now: float) -> Spend:
    """What a pool's instances cost from `since` to now (the part of each life inside that span), and
    their rate now. Runs on the writer too (a budget check), whose rows are tuples."""
    row = db.execute(
        f"SELECT sum(price_per_hour * {_larger(db)}(0, coalesce(ended_at, ?) - {_larger(db)}(created_at, ?))) AS spent,"
        f" sum(CASE WHEN state != {_STOPPED} THEN price_per_hour ELSE 0 END) AS rate"
        " FROM instances WHERE pool_id = ? AND (ended_at IS NULL OR ended_at > ?)",
        (now, since, pool_id, since)).fetchone()
    return Spend(row[0] or 0.0, row[1] or 0.0)


def offer_history(db: sqlite3.Connection, now: float, since: float) -> list[sqlite3.Row]:
    """Per offer (`offer` key, `spot`) over the instances alive at some point since `since`: n,
    `hours` (launch to end or now), `interrupted` and `at_risk` (each instance counted once); the
    most interrupted first."""
    rows: list[sqlite3.Row] = db.execute(
        f"SELECT {_offer(db, 'key')} AS offer, {_offer(db, 'spot')} AS spot, count(*) AS n,"
        f" sum({_larger(db)}(0.0, coalesce(ended_at, ?) - created_at)) / 3600.0 AS hours,"
        # count(x) counts the rows where x is not null: sum(x IS NOT NULL) in both dialects.
        " count(interrupted_at) AS interrupted, count(at_risk_since) AS at_risk"
        f" FROM instances WHERE coalesce(ended_at, ?) >= ? AND {_offer(db, 'key')} IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 5 DESC, 1",
        (now, now, since),
    ).fetchall()
    return rows
