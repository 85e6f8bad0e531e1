"""The reconciler: each tick, sync instance rows from what providers report, then act.

Sync first (catch lost, leaked and stuck instances), then scale (launch the shortfall, drain
the surplus). A provider failure becomes data on the instance row (`last_error`), never an
exception that stops the loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from cloudtask_wire.workerspec import WorkerSpec
from cloudtaskd.config import Config
from cloudtaskd.core import costs
from cloudtaskd.core.dispatch import AgentSessions, Dispatcher
from cloudtaskd.core.hub import token_hash
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.states import InstanceEvent, InstanceState
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import instances
from cloudtaskd.core.tables import jobs as job_rows
from cloudtaskd.core.tables import pools as pool_rows
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.errors import BadInput, FleetFull, ProviderError, StoreError, StoreFull, TransitionError
from cloudtaskd.fleet import interruptions
from cloudtaskd.fleet.orchestrator.backoff import OfferBackoff
from cloudtaskd.fleet.orchestrator.failures import Blocked, LaunchFailures
from cloudtaskd.fleet.orchestrator.market import Market
from cloudtaskd.fleet.orchestrator.scaling import InstanceView, PoolView, Targets, decide, reclaim
from cloudtaskd.fleet.orchestrator.selection import Candidate, Needs, Policy, combine, why_no_offer
from cloudtaskd.fleet.orchestrator.waits import Limits, explain
from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer, Provider
from cloudtaskd.http.bundles import bundle_limits
from cloudtaskd.redact import redact

log = structlog.get_logger("cloudtaskd.reconciler")


RECENT_TASKS = 200  # finished tasks per job that estimate the task duration
BUDGET_HORIZON_S = 60.0  # a job is paused when its spend would pass max_total_cost within this
START_BACKOFF_S = 1.0
START_BACKOFF_MAX_S = 120.0
DRAIN_UNREACHABLE_S = 30.0


class Reconciler:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, providers: list[tuple[Provider, int]],
                 config: Config, agent_url: str, metrics: Metrics, sessions: AgentSessions,
                 market: Market | None = None, agent_ca: bytes = b"",
                 on_instance_end: Callable[[str], Awaitable[None]] | None = None,
                 presence_ttl_s: float | None = None,
                 worker_dir: Callable[[str], Awaitable[Path]] | None = None) -> None:
        """providers: (provider, its max_instances), in order of preference. dispatcher: told of
        work, revoked leases and drains; sessions: which agents are connected (read only); metrics:
        where failed launches are counted; agent_ca: the daemon's CA certificate (PEM) agents pin,
        empty when TLS is off; on_instance_end: told of each instance that ends (the hub closes
        its connections). presence_ttl_s (replicas on PostgreSQL): an agent is connected if this
        replica holds its session, or another replica wrote its last_seen_at within this long
        (Presence, daemon.py); None (SQLite, one daemon): only this process's sessions count.
        worker_dir: the unpacked worker of a digest in this replica's state directory, materialized
        from the database when another replica received it (Bundles.ensure); None: the pool's path."""
        self.market = market or Market(store, [p for p, _ in providers], {})
        self.store = store
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.metrics = metrics
        self.providers = {p.name: p for p, _ in providers}
        self.limits = {p.name: limit for p, limit in providers}
        self.config = config
        self.agent_url = agent_url
        self.agent_ca = agent_ca
        self.on_instance_end = on_instance_end
        self.presence_ttl_s = presence_ttl_s
        self.worker_dir = worker_dir
        self._idle_since: dict[str, float] = {}
        self._absent_since: dict[str, float] = {}  # running instance -> first seen without its agent
        self._last_work: dict[int, float] = {}
        self._launching: set[str] = set()
        # pool -> (consecutive instances that died before their agent connected, no launch before)
        self._start_failures: dict[int, tuple[int, float]] = {}
        self.backoff = OfferBackoff()
        self.failures = LaunchFailures()  # (pool, offer) pairs whose launches fail the same way every time
        self._stuck: set[int] = set()  # pools whose jobs were paused because no offer could start them
        self._waiting_since: dict[int, float] = {}  # pool -> since when it has had queued tasks
        self.paused = False  # set while the daemon stops: no new launches
        # pool -> why its queued work has no instance, from the last tick's decision (waits.explain):
        # the API reads it for a job with queued tasks and none leased.
        self.waits: dict[int, str] = {}
        # The whole fleet as the last pool_views saw it: every pool's instances (those of pools with
        # no active job too), their active jobs, and the limits: what reclaim and explain look across.
        self._holders: list[PoolView] = []
        self._jobs_of: dict[int, list[int]] = {}
        self._limits = Limits(config.scaling.max_instances, config.scaling.max_instances, dict(self.limits))
        self._wake = asyncio.Event()

    def apply_config(self, config: Config) -> None:
        """On reload: scaling.* and agents.* are read at the next tick; blocked launches get a fresh
        try with the new config; a running provider's max_instances takes effect (not ssh's: one
        instance per configured host)."""
        self.config = config
        self.failures.clear()
        for name in self.limits:
            limit = getattr(getattr(config.providers, name, None), "max_instances", None)
            if isinstance(limit, int):
                self.limits[name] = limit

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except StoreFull:
                pass  # logged once per outage, by the store; the next tick tries again
            except Exception:
                log.exception("reconcile_failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.scaling.tick_s)
            self._wake.clear()

    async def notice(self, recorded: interruptions.Recorded) -> None:
        """A spot notice was recorded: its offer's rate changed, and the replacement starts now
        rather than at the next tick (an AWS notice gives two minutes, GCP's thirty seconds)."""
        await self.market.observe(force=True)
        self._wake.set()

    async def tick(self, now: float | None = None) -> None:
        now = self.store.clock.now() if now is None else now  # the clock stored times are on (cloudtaskd.core.clock)
        await self.sync(now)
        await self.enforce_budgets()
        if not self.paused:
            await self.market.observe(now)
            await self.scale(now)

    async def enforce_budgets(self) -> None:
        """Pause jobs about to pass their max_total_cost; a worker left with no active job has its
        instances drained (they finish what they hold, take nothing new, and stop)."""
        horizon = max(BUDGET_HORIZON_S, 2 * self.config.scaling.tick_s)
        paused = await self.store.write(costs.pause_over_budget, horizon)
        for job_id, pool_id, message in paused:
            log.warning("job_paused", job=job_id, reason=message)
            if not await self.store.read(partial(job_rows.any_active, pool_id=pool_id)):
                for inst in await self.store.read(partial(instances.running_in_pool, pool_id=pool_id)):
                    await self.drain(inst)

    # ---- sync ----

    async def sync(self, now: float) -> None:
        for provider in self.providers.values():
            try:
                await self._sync(provider, now)
            except Exception as exc:  # one provider's outage must not stop the others
                log.warning("provider_sync_failed", provider=provider.name, error=str(exc))
        await self._end_external(now)

    async def _end_external(self, now: float) -> None:
        """Machines registered by hand (POST /v1/instances) have no provider to sync with, so their
        ends are decided here, and each revokes the token like any other instance's:
        - drained, once the agent has gone holding nothing;
        - never connected within agents.external_connect_timeout_s of registering (a token handed
          out and never used must not stay valid for ever);
        - stopping (drained before it ever connected, or either of the above): nothing to
          terminate, so stopped at once rather than left `stopping` for ever."""
        timeout_s = self.config.agents.external_connect_timeout_s
        rows = await self.store.read(instances.externals_to_settle)
        for row in rows:
            inst, state = row["id"], InstanceState(row["state"])
            if state == InstanceState.DRAINING:
                if row["holds"] or inst in self.sessions:
                    continue
                ended = await self._move(inst, InstanceEvent.DRAINED)
            elif state == InstanceState.STARTING:
                # A STARTING external row has not moved since it was registered. A hello racing this
                # loses cleanly: both are guarded transitions out of STARTING, and only one matches.
                if now - row["state_changed_at"] <= timeout_s:
                    continue
                ended = await self._move(
                    inst, InstanceEvent.START_FAILED,
                    error=f"its agent did not connect within {timeout_s:g} s of registering"
                          " (agents.external_connect_timeout_s); the token is revoked: register the machine again")
            else:
                ended = True
            if ended:
                await self._move(inst, InstanceEvent.TERMINATED)

    async def _sync(self, provider: Provider, now: float) -> None:
        cloud = {c.instance_id: c for c in await provider.list_instances()}
        rows = await self.store.read(partial(instances.live_of_provider, provider=provider.name))
        known = set()
        for row in rows:
            inst, state = row["id"], InstanceState(row["state"])
            known.add(inst)
            present = inst in cloud
            if inst in self._launching:
                continue
            if not present and self._elsewhere(provider, inst):
                # A local agent of another replica's host: this provider cannot list it. It is
                # taken as there while its agent is connected to some replica (below).
                if state in (InstanceState.PENDING, InstanceState.STOPPING):
                    continue  # the replica that launched it ends it (its own first sync, or its stop)
                present = True
                cloud[inst] = CloudInstance(inst, "")
            if state == InstanceState.PENDING:
                await self._abandoned_launch(provider, inst, made=present)
                continue
            if state == InstanceState.STOPPING:
                await self._terminate(inst)
                continue
            if state == InstanceState.RUNNING:
                self._start_failures.pop(row["pool_id"], None)
                self.failures.reset(row["pool_id"], row["offer_key"] or "")
            # Gone, or still listed but stopped (a preempted GCP VM stays TERMINATED, an evicted
            # Azure VM deallocated, a reclaimed EC2 instance terminated for an hour).
            stopped = present and not cloud[inst].running
            terminated = False
            if not present or stopped:
                spot = bool(row["spot"] or row["interrupted_at"])
                if state in (InstanceState.RUNNING, InstanceState.DRAINING) and spot:
                    await self._interrupted(inst, noticed=row["interrupted_at"] is not None)
                event = InstanceEvent.DRAINED if state == InstanceState.DRAINING else InstanceEvent.LOST
                error = None
                agent_exited = False
                if event == InstanceEvent.LOST:
                    error = "instance is gone" if not stopped else "instance stopped at its provider"
                    if state == InstanceState.STARTING and spot and stopped:
                        # The cloud took its capacity back while it booted: not the worker's fault.
                        await self._interrupted(inst, noticed=row["interrupted_at"] is not None)
                        error = "its spot capacity was reclaimed before the agent connected"
                    elif state == InstanceState.STARTING:
                        # Stopped first: an ssh host then adds the agent's last log lines to its output.
                        try:
                            await self._provider_of(inst).terminate(inst)
                            terminated = True
                        except Exception:
                            pass  # _terminate below tries again and records why it failed
                        error = "the agent exited before connecting: " + self._output(inst)
                        self._start_failed(row["pool_id"], now, provider.name, "AgentExited")
                        agent_exited = True
                await self._move(inst, event, error=error)
                if agent_exited and error is not None:
                    await self._count_failure(row["pool_id"], row["offer_key"] or "", inst, error)
                if terminated:
                    await self._move(inst, InstanceEvent.TERMINATED)
                    self._idle_since.pop(inst, None)
                else:
                    await self._terminate(inst)
                continue
            connected = self._connected(inst, row, now)
            if state == InstanceState.DRAINING and not connected:
                # Its agent has gone. Holding nothing, it finished draining: stop paying for the
                # machine now. Still holding leases past a grace: unreachable; the leases expire
                # and are retried, and the machine itself must not run on.
                held = await self.store.read(partial(queue.leases_held, instance_id=inst))
                if held == 0:
                    await self._move(inst, InstanceEvent.DRAINED)
                    await self._terminate(inst)
                    continue
                if now - row["state_changed_at"] > DRAIN_UNREACHABLE_S:
                    await self._move(inst, InstanceEvent.DRAINED, error="drained while its agent was unreachable")
                    await self._terminate(inst)
                    continue
            if state == InstanceState.RUNNING and connected:
                self._absent_since.pop(inst, None)
            elif state == InstanceState.RUNNING:
                # Counted from this process's first look: after a restart, from the restart (the
                # row's own timestamps say nothing about when the agent was last heard).
                since = self._absent_since.setdefault(inst, now)
                if now - since > self.config.agents.reconnect_grace_s:
                    await self._agent_gone(inst)
                    continue
            if state == InstanceState.STARTING and now - row["state_changed_at"] > self.config.scaling.start_timeout_s:
                error = (f"agent did not connect within {self.config.scaling.start_timeout_s:.0f} s: "
                         + self._output(inst))
                await self._move(inst, InstanceEvent.START_FAILED, error=error)
                self._start_failed(row["pool_id"], now, provider.name, "StartTimeout")
                await self._count_failure(row["pool_id"], row["offer_key"] or "", inst, error)
                await self._terminate(inst)
        launching_here = any(i.startswith(f"{provider.name}-") for i in self._launching)
        for inst in cloud.keys() - known:
            if inst in self._launching:
                continue
            if cloud[inst].anonymous and launching_here:
                # Ours but not yet named: possibly a launch of this process between making the VM
                # and tagging it. Once no launch is in flight, an anonymous VM is a leak.
                continue
            # Tagged as ours but with no live row (left over from a crash), or with no instance id
            # at all (its tagging never happened): never leave it running.
            log.warning("leaked_instance_terminated", instance=inst, provider=provider.name,
                        cloud_id=cloud[inst].cloud_id)
            try:
                await provider.terminate(inst)
            except Exception as exc:  # the next sync lists it again and retries; the others go on
                log.warning("leaked_instance_terminate_failed", instance=inst, provider=provider.name,
                            error=redact(str(exc)))

    def _elsewhere(self, provider: Provider, inst: str) -> bool:
        """With replicas: an instance of a host-bound provider (local) that another replica's host runs."""
        owns = getattr(provider, "owns", None)
        return self.presence_ttl_s is not None and owns is not None and not owns(inst)

    def _connected(self, inst: str, row: Any, now: float) -> bool:
        """Its agent is connected to this replica, or (replicas) was seen by another one lately."""
        if inst in self.sessions:
            return True
        seen = row["last_seen_at"]
        return self.presence_ttl_s is not None and seen is not None and now - seen < self.presence_ttl_s

    async def _abandoned_launch(self, provider: Provider, inst: str, *, made: bool) -> None:
        """A PENDING row that no launch of this process is making: the daemon died between recording
        the launch and hearing the provider's answer. It is not adopted: its agent token exists only
        as a hash and how far the bootstrap went is unknown. The row ends with the reason, and what
        the provider made for it is terminated. A VM the provider lists only later (clouds are
        eventually consistent) then has no live row, and a later sync terminates it as leaked."""
        error = ("the daemon stopped during its launch; the VM the provider had made for it is terminated" if made
                 else "the daemon stopped during its launch, before the provider reported a VM for it")
        if not await self._move(inst, InstanceEvent.LAUNCH_FAILED, error=error):
            return  # a launch finished meanwhile: the row is no longer PENDING, and is its own
        log.warning("abandoned_launch_ended", instance=inst, provider=provider.name, vm_found=made)
        if made:
            try:
                with structlog.contextvars.bound_contextvars(instance=inst, provider=provider.name):
                    await provider.terminate(inst)
            except Exception as exc:  # the row is STOPPED: the next sync retries it as a leak
                log.warning("leaked_instance_terminate_failed", instance=inst, provider=provider.name,
                            error=redact(str(exc)))

    async def _agent_gone(self, inst: str) -> None:
        """A running instance whose agent has not been connected for agents.reconnect_grace_s (it
        never came back after a daemon restart, or went silent): lost. Its leases go back now,
        uncounted (the task did nothing wrong), instead of waiting out their TTL; the machine is
        terminated and the scaler starts a replacement if the work still needs one."""
        grace = self.config.agents.reconnect_grace_s
        self._absent_since.pop(inst, None)
        if not await self._move(inst, InstanceEvent.LOST,
                                error=f"its agent has not connected for {grace:g} s (agents.reconnect_grace_s)"):
            return
        leases, pools = await self.store.write(
            lambda tx: queue.requeue_instance(tx, inst, "its instance's agent did not come back"))
        log.warning("instance_agent_gone", instance=inst, grace_s=grace, requeued=len(leases))
        for pool in pools:
            self.dispatcher.notify_work(pool)
        if leases:
            self.dispatcher.revoke(leases)
        await self._terminate(inst)

    async def _interrupted(self, inst: str, *, noticed: bool) -> None:
        """A spot instance is gone (the cloud took it, with or without a notice first): what it still
        held goes back now, uncounted, instead of failing when the leases time out."""
        def tx_(tx: Tx) -> tuple[list[tuple[int, str | None]], set[int]]:
            if not noticed:
                interruptions.record(tx, inst, interruptions.INTERRUPTION, "provider", None,
                                     "the spot instance is gone without a notice")
            return queue.requeue_instance(tx, inst, "its spot instance was interrupted")

        leases, pools = await self.store.write(tx_)
        if not noticed:
            log.warning("spot_reclaimed", instance=inst, requeued=len(leases))
            await self.market.observe(force=True)
        for pool in pools:
            self.dispatcher.notify_work(pool)
        if leases:
            self.dispatcher.revoke(leases)

    def _provider_of(self, inst: str) -> Provider:
        return self.providers[inst.split("-", 1)[0]]

    def _output(self, inst: str) -> str:
        tail = getattr(self._provider_of(inst), "output_tail", None)
        return (tail(inst) if tail is not None else None) or "(no output)"

    def _start_failed(self, pool_id: int, now: float, provider: str, kind: str) -> None:
        """An instance died before its agent connected: back off, or a broken worker would spin."""
        self.metrics.provisioning_failed(provider, kind)
        count = self._start_failures.get(pool_id, (0, 0.0))[0] + 1
        delay = min(START_BACKOFF_MAX_S, START_BACKOFF_S * 2 ** (count - 1))
        self._start_failures[pool_id] = (count, now + delay)
        log.warning("instance_start_failed", pool=pool_id, consecutive=count, next_launch_in_s=delay)

    async def _move(self, inst: str, event: InstanceEvent, *, error: str | None = None) -> bool:
        try:
            target = await self.store.write(lambda tx: tx.transition_instance(inst, event, error=error))
        except TransitionError as exc:
            log.info("instance_transition_skipped", instance=inst, reason=str(exc))
            return False
        if target in (InstanceState.STOPPING, InstanceState.STOPPED) and self.on_instance_end is not None:
            # Its token is revoked by this move; a connection still open is closed now, whether or
            # not the provider's terminate (next) succeeds.
            await self.on_instance_end(inst)
        return True

    async def _terminate(self, inst: str) -> None:
        try:
            provider = self._provider_of(inst)
            with structlog.contextvars.bound_contextvars(instance=inst, provider=provider.name):
                await provider.terminate(inst)
        except Exception as exc:  # stays STOPPING; retried next tick
            message = redact(f"terminate failed: {exc}")  # a cloud SDK's text may quote a credential
            await self.store.write(instances.set_last_error, inst, message)
            return
        await self._move(inst, InstanceEvent.TERMINATED)
        self._idle_since.pop(inst, None)

    # ---- scale ----

    def candidates(self, needs: Needs, policy: Policy, now: float, pool_id: int | None = None) -> list[Candidate]:
        """Ranked offers this pool may buy now: backed-off offers, and those blocked for this pool
        because its launches there fail the same way every time, are left out."""
        ranked = self.market.rank(needs, policy)
        return [c for c in ranked if not self.backoff.blocked(c.offer.key, now)
                and (pool_id is None or not self.failures.is_blocked(pool_id, c.offer.key))]

    def _stuck_pool(self, pool_id: int, needs: Needs, policy: Policy) -> list[Blocked]:
        """The blocks that leave this pool no offer at all (none: some offer may still serve it)."""
        ranked = self.market.rank(needs, policy)
        if not ranked or not all(self.failures.is_blocked(pool_id, c.offer.key) for c in ranked):
            return []
        keys = {c.offer.key for c in ranked}
        return [b for b in self.failures.blocked(pool_id) if b.offer in keys]

    async def _count_failure(self, pool_id: int, offer_key: str, inst: str, error: str) -> None:
        """A launch or start failed for a reason that may not pass: count it, and block the (pool,
        offer) when it is the BLOCK_AFTER-th in a row with the same cause."""
        blocked = self.failures.failed(pool_id, offer_key, error)
        if blocked is None:
            return
        detail = (f"offer {blocked.offer}: {blocked.count} launches in a row failed the same way, so no more are"
                  f" made there for this worker: {blocked.reason}. Fix the cause (the image, the host, the"
                  f" credentials or the worker's setup; `cloudtaskctl instances --logs {inst}` has the whole log),"
                  " then `cloudtaskctl resume JOB`, submit again or reload the config to try again")

        def tx_(tx: Tx) -> None:
            jobs: list[int | None] = [*job_rows.active_ids(tx.db, pool_id)]
            for job_id in jobs or [None]:
                tx.event("offer_blocked", job_id=job_id, instance_id=inst, detail=detail)

        await self.store.write(tx_)
        log.warning("offer_blocked", pool=pool_id, offer=blocked.offer, consecutive=blocked.count,
                    reason=blocked.reason)

    async def _pause_stuck(self, pool_id: int, blocks: list[Blocked]) -> None:
        """No offer can start this pool's worker any more, and none of its instances lives: its jobs
        are paused with the reasons, rather than left waiting for ever with `instances 0`."""
        reasons = "; ".join(f"{b.offer}: {b.reason}" for b in blocks)
        message = (f"paused: no instance can start for this job: every offer failed {blocks[0].count} times in a row"
                   f" the same way ({reasons}). Fix the cause, then `cloudtaskctl resume JOB`")

        def tx_(tx: Tx) -> list[int]:
            jobs = job_rows.active_ids(tx.db, pool_id)
            for job_id in jobs:
                job_rows.pause(tx, job_id, message.replace("JOB", str(job_id)), job_rows.LAUNCH_FAILURES)
                tx.event("job_paused", job_id=job_id, detail=message.replace("JOB", str(job_id)))
            return jobs

        jobs = await self.store.write(tx_)
        self._stuck.add(pool_id)
        log.warning("job_blocked", pool=pool_id, jobs=jobs, reason=reasons)

    async def pool_views(self, now: float) -> list[tuple[PoolView, dict[str, Any]]]:
        def read(db: Any) -> tuple[list[Any], list[Any], dict[str, int], dict[int, float], dict[int, list[Policy]]]:
            pools = pool_rows.with_active_jobs(db)
            fleet = instances.launched_live(db)
            leases = queue.leases_by_instance(db)
            policies: dict[int, list[Policy]] = defaultdict(list)
            for row in job_rows.active_policies(db):
                policies[row["pool_id"]].append(Policy.from_dict(json.loads(row["policy"] or "{}")))
            durations = {}
            for p in pools:
                # The latest results say how long a task takes now, per job.
                recent = [d for job in str(p["job_ids"]).split(",")
                          for d in queue.recent_durations(db, int(job), RECENT_TASKS)]
                if recent:
                    durations[p["id"]] = sum(recent) / len(recent)
            return pools, fleet, leases, durations, policies

        pools, fleet, leases, durations, policies = await self.store.read(read)
        by_pool: dict[int, list[InstanceView]] = defaultdict(list)
        live_per_provider: dict[str, int] = defaultdict(int)
        spend = 0.0
        for r in fleet:
            live_per_provider[r["provider"]] += 1
            spend += r["price_per_hour"] or 0.0
            n = leases.get(r["id"], 0)
            if n:
                self._idle_since.pop(r["id"], None)
            elif r["state"] == "running":
                self._idle_since.setdefault(r["id"], now)
            by_pool[r["pool_id"]].append(InstanceView(
                r["id"], r["state"], r["slots"], n, self._idle_since.get(r["id"]) if not n else None,
                r["price_per_hour"] or 0.0, bool(r["at_risk"]), r["provider"], r["offer_key"] or ""))
        scaling = self.config.scaling
        global_room = scaling.max_instances - len(fleet)
        spare = {name: max(0, self.limits[name] - live_per_provider[name]) for name in self.providers}
        room = {name: min(spare[name], max(0, global_room)) for name in self.providers}
        budget = scaling.max_cost_per_hour - spend if scaling.max_cost_per_hour > 0 else math.inf
        active_pools = {p["id"] for p in pools}
        # Pools with no active job (finished, cancelled, paused) still hold their instances' places:
        # reclaim may take them, and their idle ones stop after idle_timeout_s like any other's. Their
        # last work is when this daemon last saw some (or first saw the pool idle, after a restart).
        self._holders = [PoolView(pool_id, 0, 0, instances=list(views_),
                                  last_work_at=self._last_work.setdefault(pool_id, now))
                         for pool_id, views_ in by_pool.items() if pool_id not in active_pools]
        self._jobs_of = {p["id"]: [int(j) for j in str(p["job_ids"]).split(",")] for p in pools}
        self._limits = Limits(scaling.max_instances, global_room, dict(self.limits))
        views = []
        for p in pools:
            spec = WorkerSpec.from_dict(json.loads(p["spec"]))
            if p["outstanding"]:
                self._last_work[p["id"]] = now
            # "Work waits": tasks queued while nothing of this pool is booting. Booting
            # capacity is on its way; counting that wait would buy an instance per tick.
            booting = any(i.state in ("pending", "starting") for i in by_pool.get(p["id"], []))
            if p["queued"] and not booting:
                self._waiting_since.setdefault(p["id"], now)
            else:
                self._waiting_since.pop(p["id"], None)
            limit = scaling.max_instances
            if p["job_max"]:
                limit = min(limit, p["job_max"])
            needs = Needs(spec.cpus_per_task, spec.memory_per_task)
            policy = combine(policies.get(p["id"], []))
            if p["id"] in self._stuck:
                # Its jobs were paused for blocked launches and one is active again (resumed, or a
                # new job of the same worker): it gets a fresh try everywhere.
                self._stuck.discard(p["id"])
                for b in self.failures.clear(p["id"]):
                    log.info("offer_unblocked", pool=p["id"], offer=b.offer)
            views.append((
                PoolView(
                    pool_id=p["id"],
                    outstanding=p["outstanding"] or 0,
                    max_instances=limit,
                    candidates=self.candidates(needs, policy, now, p["id"]),
                    provider_room=room,
                    provider_spare=spare,
                    instances=by_pool.get(p["id"], []),
                    last_work_at=self._last_work.get(p["id"], now),
                    mean_task_s=durations.get(p["id"]),
                    waiting_s=now - self._waiting_since.get(p["id"], now),
                    budget_per_hour=budget,
                ),
                {"path": p["path"], "spec": spec, "digest": p["digest"],
                 "stuck": self._stuck_pool(p["id"], needs, policy), "needs": needs, "policy": policy},
            ))
        self._holders += [v for v, _ in views]
        return views

    async def scale(self, now: float) -> None:
        views = await self.pool_views(now)
        s = self.config.scaling
        targets = Targets(s.idle_timeout_s, s.target_s, s.scale_up_after_s)
        decisions = [(view, extra, decide(view, now, targets)) for view, extra in views]
        deciding = {view.pool_id for view, _ in views}
        # Instances of pools no active job uses: nothing to launch, only idle ones to stop.
        idle_elsewhere = [i for view in self._holders if view.pool_id not in deciding
                          for i in decide(view, now, targets).drain]
        # Pools that may launch now: not held back by a start back-off, not about to be paused.
        ready = [view for view, extra, _ in decisions
                 if not (extra["stuck"] and not view.instances) and now >= self._held_until(view.pool_id)]
        # An idle instance of another worker gives its place now, rather than after idle_timeout_s.
        reclaimed = reclaim(ready, self._holders, self._limits.global_room, now, targets)
        taken = {i for ids in reclaimed.values() for i in ids}
        for pool_id, ids in reclaimed.items():
            for inst in ids:
                log.info("instance_reclaimed", instance=inst, for_pool=pool_id, for_jobs=self._jobs_of.get(pool_id))
                await self.drain(inst)
        waits: dict[int, str] = {}
        for view, extra, decision in decisions:
            waits[view.pool_id] = explain(
                view, decision, holders=self._holders, limits=self._limits, jobs_of=self._jobs_of,
                reclaimed=taken,
                held_back=self._held_back(view.pool_id, now), no_offer=self._no_offer(view, extra, now))
        self.waits = waits
        for inst in idle_elsewhere:
            if inst not in taken:  # reclaimed in this tick already
                log.info("instance_idle", instance=inst, reason="no active job uses its worker")
                await self.drain(inst)
        for view, extra, decision in decisions:
            for inst in decision.drain:
                if inst not in taken:  # its own pool's idle timeout may end in the same tick
                    await self.drain(inst)
            if extra["stuck"] and not view.instances:
                await self._pause_stuck(view.pool_id, extra["stuck"])
                continue
            if now < self._held_until(view.pool_id):
                continue
            launches = [self._launch(self.providers[c.offer.provider], view.pool_id, c, extra)
                        for c in decision.launch]
            if launches:
                # Concurrently: each provider batches what arrives together (one RunInstances per type and zone).
                await asyncio.gather(*launches)

    def _held_until(self, pool_id: int) -> float:
        return self._start_failures.get(pool_id, (0, 0.0))[1]

    def _held_back(self, pool_id: int, now: float) -> str | None:
        count, until = self._start_failures.get(pool_id, (0, 0.0))
        if now >= until:
            return None
        return (f"the last {count} instance start{'s' if count != 1 else ''} of this worker failed; the next launch"
                f" in {math.ceil(until - now)} s (`cloudtaskctl events --job JOB` says why)")

    def _no_offer(self, view: PoolView, extra: dict[str, Any], now: float) -> str | None:
        """Why a pool has no candidate: nothing fits, or every offer that does is backed off or blocked.
        Only worked out when there is none."""
        if view.candidates:
            return None
        ranked = self.market.rank(extra["needs"], extra["policy"])
        if not ranked:
            return why_no_offer(self.market.offers(), extra["needs"], extra["policy"])
        if all(self.failures.is_blocked(view.pool_id, c.offer.key) for c in ranked):
            return "launches of this worker failed the same way on every offer that fits (see `cloudtaskctl events`)"
        backed_off = [self.backoff.until(c.offer.key) for c in ranked if self.backoff.blocked(c.offer.key, now)]
        wait = f"; the next try in {math.ceil(min(backed_off) - now)} s" if backed_off else ""
        return f"every offer that fits was refused by its provider (capacity or quota) and is backing off{wait}"

    async def drain(self, inst: str) -> bool:
        moved = await self._move(inst, InstanceEvent.DRAIN)
        if moved and not self.dispatcher.drain(inst):
            # No agent connected to tell: nothing to wait for.
            pass
        return moved

    def _offer_failed(self, offer: Offer, exc: ProviderError, now: float) -> None:
        """Capacity, quota or any provider refusal: this offer backs off, the next-best takes over."""
        self.metrics.provisioning_failed(offer.provider, type(exc).__name__)
        delay = self.backoff.refused(offer.key, now)
        if delay is not None:
            log.warning("offer_backed_off", offer=offer.key, error=type(exc).__name__,
                        consecutive=self.backoff.consecutive(offer.key), retry_in_s=delay)

    async def _launch(self, provider: Provider, pool_id: int, cand: Candidate, pool: dict[str, Any]) -> None:
        inst = f"{provider.name}-{uuid.uuid4().hex[:12]}"
        token = secrets.token_urlsafe(32)
        offer = cand.offer
        try:
            worker = await self.worker_dir(pool["digest"]) if self.worker_dir else Path(pool["path"])
        except (BadInput, StoreError, OSError) as exc:
            # Nothing inserted: the next tick tries again (the worker may be pruned, or the disk full).
            log.warning("launch_no_worker", provider=provider.name, pool=pool_id, error=str(exc))
            return
        self._launching.add(inst)
        try:
            try:
                await self.store.write(_insert_instance, inst, pool_id, cand, token_hash(token),
                                       self.config.scaling.max_instances, self.limits[provider.name])
            except FleetFull as exc:
                # Another replica's launches (or a leader that has just stepped down) took the room this
                # tick's view saw: nothing was inserted, the next tick decides again from the rows.
                log.info("launch_refused_full", provider=provider.name, pool=pool_id, reason=str(exc))
                return
            workers = self.config.state_path / "workers"
            spec = LaunchSpec(inst, pool_id, worker, self.agent_url, token, cand.slots,
                              worker_bundle=workers / f"{pool['digest']}.tar.gz",
                              worker_spec=pool["spec"].to_dict(), offer=offer, ca_cert=self.agent_ca,
                              bundle_limits=bundle_limits(self.config.workers),
                              max_message_bytes=self.config.agents.max_message_bytes,
                              agent_urls=self.config.agents.dial_urls(self.agent_url))
            try:
                # Every line the provider and the bootstrap log for this launch names it.
                with structlog.contextvars.bound_contextvars(instance=inst, provider=provider.name, pool=pool_id):
                    cloud = await provider.launch(spec)
            except Exception as exc:
                log.warning("launch_failed", instance=inst, provider=provider.name, offer=offer.key, error=str(exc))
                await self._move(inst, InstanceEvent.LAUNCH_FAILED, error=str(exc))
                if isinstance(exc, ProviderError):
                    self._offer_failed(offer, exc, self.store.clock.now())
                else:  # the machine came but the install failed: the worker may be broken
                    self._start_failed(pool_id, self.store.clock.now(), provider.name, type(exc).__name__)
                if isinstance(exc, ProviderError) and exc.retryable:
                    # Capacity, throttling, a host in use: passes by itself, and breaks a streak.
                    self.failures.reset(pool_id, offer.key)
                else:
                    await self._count_failure(pool_id, offer.key, inst, str(exc))
                return
            self.backoff.succeeded(offer.key)
            await self.store.write(lambda tx: tx.transition_instance(
                inst, InstanceEvent.LAUNCHED, cloud_id=cloud.cloud_id, address=cloud.address))
            log.info("instance_launched", instance=inst, provider=provider.name, pool=pool_id, slots=cand.slots,
                     offer=offer.key)
        finally:
            self._launching.discard(inst)

    async def stop_all(self, grace_s: float, providers: Collection[str] | None = None) -> None:
        """Daemon shutdown: drain the agents, wait for hand-backs, then terminate what we started.

        providers: only these providers' instances (None: all). The others are left exactly as they
        are, RUNNING stays RUNNING: a service restart must not stop remote machines, whose agents
        keep their leases and reconnect to the next daemon (which extends every lease at start).
        """
        self.paused = True
        rows = [r for r in await self.store.read(instances.to_stop)
                if (providers is None or r["provider"] in providers)
                and not (r["provider"] in self.providers and self._elsewhere(self.providers[r["provider"]], r["id"]))]
        for r in rows:
            if r["state"] == "running":
                await self.drain(r["id"])
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 - polls sessions owned by the hub
            self.sessions.get(r["id"]) is not None for r in rows
        ):
            await asyncio.sleep(0.05)
        for r in rows:
            current = await self.store.read(partial(instances.state_of, instance_id=r["id"]))
            state = InstanceState(current) if current else InstanceState.STOPPED
            if state in (InstanceState.RUNNING, InstanceState.STARTING):
                event = InstanceEvent.DRAIN if state == InstanceState.STARTING else InstanceEvent.LOST
                await self._move(r["id"], event)
            elif state == InstanceState.DRAINING:
                await self._move(r["id"], InstanceEvent.DRAINED)
            elif state == InstanceState.PENDING:
                await self._move(r["id"], InstanceEvent.LAUNCH_FAILED, error="daemon stopped")
            await self._terminate(r["id"])

    async def abandon_launches(self) -> int:
        """After the reconciler's task is cancelled: a launch it was making when the daemon stopped
        is recorded as failed at once (after a crash, the next daemon's first sync does the same:
        `_abandoned_launch`). STOPPED, whatever the provider made still carries our tag, so the
        next daemon terminates it as leaked."""
        pending = await self.store.read(instances.pending)
        for inst in pending:
            await self._move(inst, InstanceEvent.LAUNCH_FAILED, error="the daemon stopped during the launch")
        return len(pending)


def _insert_instance(tx: Tx, inst: str, pool_id: int, cand: Candidate, hashed: str, max_total: int,
                     max_provider: int) -> None:
    o = cand.offer
    # The row is written before the provider is asked (an orchestrator taking over adopts or ends it),
    # and only if the one pool of places, counted over every replica's rows, has room.
    instances.reserve_place(tx, o.provider, max_total=max_total, max_provider=max_provider)
    offer = json.dumps({"provider": o.provider, "machine_type": o.machine_type, "zone": o.zone, "region": o.region,
                        "spot": o.spot, "cpus": o.cpus, "memory_gb": o.memory_gb, "gpus": o.gpus, "key": o.key})
    instances.add(tx, inst, provider=o.provider, pool_id=pool_id, state=InstanceState.PENDING, slots=cand.slots,
                  token_hash=hashed, offer=offer, price_per_hour=o.price_per_hour or 0.0)
    tx.event("instance_requested", instance_id=inst, detail=f"pool={pool_id} slots={cand.slots} offer={o.key}")
