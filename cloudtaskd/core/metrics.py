"""Prometheus metrics for `GET /metrics` (docs/observability.md lists them).

Two kinds, so the hot paths stay cheap:

- Counted as things happen, in memory: leases granted and reports accepted or refused (one
  `inc` per dispatch round, never per task), the lease wait histogram (one observation per grant
  message), provisioning errors (the reconciler, per failed launch). They start at zero with the
  daemon, as Prometheus counters do.
- Read at scrape time from the database in one read transaction: tasks and jobs by state (from the
  per-job counters in `jobs`, never a scan of `tasks`), live instances, fleet cost (costs.fleet),
  and spot interruptions (the `interruptions` rows, so that counter survives restarts).

Each daemon has its own CollectorRegistry: several daemons in one process (the tests) never share
a series, and nothing lands in prometheus_client's global registry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from cloudtaskd.core import costs
from cloudtaskd.core.states import COUNTER, TaskState
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import instances, interruptions, jobs

# From a busy round's few milliseconds to an agent that waited minutes for work to arrive.
LEASE_WAIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        300.0, 900.0)
JOB_STATES = ("active", "done", "paused", "cancelled")
INSTANCE_STATES = ("pending", "starting", "running", "draining", "stopping")


class Metrics:
    """The daemon's metrics: counters the dispatcher and reconciler bump, and the scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.leases_granted = Counter(
            "cloudtask_leases_granted", "Task leases granted to agents.", registry=self.registry)
        self.reports = Counter(
            "cloudtask_reports", "Agent reports (results, failures, hand-backs) by outcome: accepted (recorded,"
            " or a resend of one recorded) or refused (stale: the lease's fencing token or state no longer matches).",
            ["outcome"], registry=self.registry)
        self.reports_accepted = self.reports.labels("accepted")
        self.reports_refused = self.reports.labels("refused")
        self.lease_wait = Histogram(
            "cloudtask_lease_wait_seconds",
            "Seconds an agent with free slots waited for a grant: from its credit becoming non-zero (or its previous"
            " grant, if credit was left over) to the grant; one observation per grant message. Includes time with"
            " nothing queued; a task's own queued-to-leased time is not tracked (tasks carry no enqueue time).",
            buckets=LEASE_WAIT_BUCKETS_S, registry=self.registry)
        self.provisioning_errors = Counter(
            "cloudtask_provisioning_errors",
            "Failed instance launches and starts, by provider and kind: the ProviderError class (CapacityError,"
            " QuotaExceeded, ProviderAuthError, InvalidRequest, TransientProviderError, ProviderError), the"
            " exception class of a failed install, AgentExited (died before its agent connected) or StartTimeout.",
            ["provider", "kind"], registry=self.registry)

    # ---- counted as it happens ----

    def round_done(self, granted: int, accepted: int, refused: int) -> None:
        """One dispatch round's totals (after its commit)."""
        if granted:
            self.leases_granted.inc(granted)
        if accepted:
            self.reports_accepted.inc(accepted)
        if refused:
            self.reports_refused.inc(refused)

    def provisioning_failed(self, provider: str, kind: str) -> None:
        self.provisioning_errors.labels(provider, kind).inc()

    # ---- the scrape ----

    async def render(self, store: Store, *, sessions: int, rounds: int,
                     accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text (or OpenMetrics, when the scraper asks for it) and its Content-Type."""
        now = store.clock.now()  # the clock stored times are on (cloudtaskd.core.clock)
        state = await store.read(lambda db: read_state(db, now))
        encoder, content_type = choose_encoder(accept or "")
        return encoder(_Scrape(self.registry, state, sessions, rounds)), content_type


@dataclass
class State:
    """What the database says at scrape time."""

    tasks: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    instances: list[tuple[str, str, str, int]] = field(default_factory=list)  # provider, type, state, count
    fleet: dict[str, Any] = field(default_factory=dict)  # costs.fleet
    interruptions: dict[str, int] = field(default_factory=dict)  # provider -> spot interruptions


def read_state(db: sqlite3.Connection, now: float) -> State:
    """A few small queries: jobs (one row per job), live instances (their partial index), every
    instance for the fleet cost, interruptions. The tasks table is never read."""
    out = State(tasks=dict.fromkeys((s.value for s in TaskState), 0), jobs=dict.fromkeys(JOB_STATES, 0))
    # "done": active with nothing left to run, as cloudtaskctl status shows it.
    for row in jobs.count_by_state(db):
        out.jobs[row["state"]] = out.jobs.get(row["state"], 0) + row["jobs"]
        for state in TaskState:
            out.tasks[state.value] += row[COUNTER[state]] or 0
    out.instances = [(r["provider"], r["machine_type"] or "", r["state"], r["n"]) for r in instances.live_counts(db)]
    out.fleet = costs.fleet(db, now)
    out.interruptions = interruptions.interruptions_by_provider(db)
    return out


class _Scrape(Collector):
    """One scrape: the registry's counters, then the families read from the database. A fresh
    object per scrape, so two scrapes at once never see each other's state."""

    def __init__(self, registry: CollectorRegistry, state: State, sessions: int, rounds: int) -> None:
        self.registry = registry
        self.state = state
        self.sessions = sessions
        self.rounds = rounds

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from _families(self.state, self.sessions, self.rounds)


def _families(s: State, sessions: int, rounds: int) -> Iterator[Metric]:
    tasks = GaugeMetricFamily("cloudtask_tasks", "Tasks by state, over every job (the jobs' counters).",
                              labels=["state"])
    for state, n in s.tasks.items():
        tasks.add_metric([state], n)
    yield tasks
    jobs = GaugeMetricFamily("cloudtask_jobs", "Jobs by state; done: active with no task left to run.",
                             labels=["state"])
    for state, n in s.jobs.items():
        jobs.add_metric([state], n)
    yield jobs
    live = GaugeMetricFamily("cloudtask_instances", "Live (not stopped) instances by provider, machine type"
                             " and state.", labels=["provider", "machine_type", "state"])
    for provider, machine_type, state, n in s.instances:
        live.add_metric([provider, machine_type, state], n)
    yield live
    rate = GaugeMetricFamily("cloudtask_cost_per_hour_usd", "What the live instances cost per hour, by provider"
                             " (list prices).", labels=["provider"])
    spent = GaugeMetricFamily("cloudtask_spent_usd", "What every instance has cost so far, from launch request to"
                              " end (or now), by provider.", labels=["provider"])
    for provider, p in sorted(s.fleet.get("providers", {}).items()):
        rate.add_metric([provider], p["rate_per_hour"])
        spent.add_metric([provider], p["spent"])
    yield rate
    yield spent
    spot = CounterMetricFamily("cloudtask_spot_interruptions", "Spot instances the cloud took (with or without a"
                               " notice), by provider; read from the database, so it survives restarts.",
                               labels=["provider"])
    for provider, n in sorted(s.interruptions.items()):
        spot.add_metric([provider], n)
    yield spot
    yield GaugeMetricFamily("cloudtask_agents_connected", "Agents connected to the daemon now.", value=sessions)
    yield CounterMetricFamily("cloudtask_dispatch_rounds", "Dispatch rounds committed (each one transaction).",
                              value=rounds)


__all__ = ["Metrics", "State", "read_state"]
