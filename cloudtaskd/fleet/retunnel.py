"""Tunnelled agents of a replica that is gone, tunnelled again by the leader (docs/replicas.md).

An ssh or cloud instance's agent without `agents.public_url` reaches the daemon only through the SSH
tunnel of the replica that launched it (or last re-tunnelled it, tunnels.py). When that replica
dies, the tunnel dies with it and the agent retries a port nobody forwards any more. The leader
looks every RETUNNEL_INTERVAL_S at the instances whose agent should be out there and is connected
nowhere (no replica wrote its `last_seen_at` within the presence TTL, replica.presence), and keeps
a tunnel to each from this replica, as a restart does: the tunnel's supervisor writes the new
`agent.url` and the agent, reading it before each reconnection, dials back through it.

Agents connected to a live replica are left alone (their presence is fresh); STARTING instances
too: the leader itself may be bootstrapping them (it opens their tunnel in the launch), and one of
a dead replica's bootstraps ends by the orchestrator's start timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any

import asyncssh
import structlog

from cloudtaskd.core.states import InstanceState
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import instances
from cloudtaskd.errors import StoreError
from cloudtaskd.fleet.tunnels import Tunnels

log = structlog.get_logger("cloudtaskd.fleet.retunnel")

RETUNNEL_INTERVAL_S = 1.0

SshOf = Callable[[str], Awaitable[asyncssh.SSHClientConnection]]  # a provider's ssh(instance_id)


def orphans(rows: Sequence[Any], *, here: Collection[str], tunnelled: Collection[str],
            now: float, presence_ttl_s: float) -> list[Any]:
    """The rows (instances.with_agents) whose agent no replica holds: not connected here, not
    tunnelled here, not written present by another replica lately, and past their bootstrap."""
    out = []
    for row in rows:
        if row["id"] in here or row["id"] in tunnelled or row["state"] == InstanceState.STARTING:
            continue
        seen = row["last_seen_at"]
        if seen is not None and now - seen < presence_ttl_s:
            continue
        out.append(row)
    return out


def tunnel_all(tunnels: Tunnels, rows: Sequence[Any],
               connectors: Mapping[str, SshOf]) -> list[str]:
    """Keep a tunnel to each row's instance whose provider connects over SSH; returns their ids."""
    kept = []
    for row in rows:
        ssh = connectors.get(row["provider"])
        if ssh is not None and row["id"] not in tunnels:
            tunnels.keep(row["id"], partial(ssh, row["id"]))
            kept.append(str(row["id"]))
    return kept


async def retunnel(store: Store, tunnels: Tunnels, connectors: Mapping[str, SshOf],
                   here: Callable[[], Collection[str]], presence_ttl_s: float,
                   interval_s: float = RETUNNEL_INTERVAL_S) -> None:
    """While this replica leads: tunnel the agents of gone replicas (see the module's docstring)."""
    while True:
        try:
            rows = await store.read(instances.with_agents)
        except StoreError as exc:  # the database away: the next look tries again
            log.warning("retunnel_read_failed", error=str(exc))
        else:
            lost = orphans(rows, here=set(here()), tunnelled={r["id"] for r in rows if r["id"] in tunnels},
                           now=store.clock.now(), presence_ttl_s=presence_ttl_s)
            kept = tunnel_all(tunnels, lost, connectors)
            if kept:
                log.info("agents_retunnelled", instances=kept)
        await asyncio.sleep(interval_s)

