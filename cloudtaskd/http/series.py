"""The status page's plots: the last hour of a few figures, sampled in memory.

Every SERIES_INTERVAL_S the daemon reads one small snapshot — the jobs' task counters (one row
per job, never the tasks table), the live instances by provider and market (their partial index),
their price per hour — and keeps the last SERIES_WINDOW_S of them in a bounded deque (360 points).
`GET /v1/status/series` answers from memory: the JSON is encoded once per sample and served as
those bytes to every reader until the next, so a hundred status pages cost no database read.

The record starts empty when the daemon starts: what was queued or running before is not in the
database in a form worth a scan of the events table, and an hour of instance counts alone would
draw a misleading half picture. The page shows the points it has, from the restart on.

Rates (tasks finished per second) are differences of the cumulative counters between two samples
over the monotonic time between them: a wall-clock step does not make a spike, and a counter that
went down (a job deleted) counts as no work rather than negative work.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog

from cloudtaskd.core.store import Store
from cloudtaskd.core.tables import instances, jobs
from cloudtaskd.errors import StoreError

log = structlog.get_logger("cloudtaskd.http.series")

SERIES_INTERVAL_S = 10.0
SERIES_WINDOW_S = 3600.0
# Machines that are not bought on a market: plotted by provider alone, not as "on-demand".
OWNED_PROVIDERS = frozenset({"local", "ssh", "external"})


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # the daemon's clock (cloudtaskd.core.clock), as every stored time
    mono: float  # time.monotonic(), for the rates
    succeeded: int  # cumulative over every job
    dead: int
    queued: int  # queued, and waiting out a retry backoff
    leased: int  # held by agents: running, or prefetched to run next
    instances: dict[str, int]  # "aws spot", "gcp on-demand", "local" -> live instances
    cost_per_hour: dict[str, float]  # provider -> USD per hour of its live instances


def read_sample(db: sqlite3.Connection, now: float, mono: float) -> Sample:
    """Two small queries: the jobs' counters; live instances and their price, grouped."""
    row = jobs.totals(db)
    live: dict[str, int] = {}
    cost: dict[str, float] = {}
    for r in instances.live_by_market(db):
        provider, spot, n, price = r["provider"], r["spot"], r["n"], r["price_per_hour"]
        key = provider if provider in OWNED_PROVIDERS else f"{provider} {'spot' if spot else 'on-demand'}"
        live[key] = live.get(key, 0) + n
        if provider != "external":  # as costs.fleet: another party pays for an external machine
            cost[provider] = round(cost.get(provider, 0.0) + (price or 0.0), 6)
    return Sample(t=now, mono=mono, succeeded=row["succeeded"], dead=row["dead"], queued=row["queued"],
                  leased=row["leased"], instances=live, cost_per_hour=cost)


def _rate(now: int, before: int, seconds: float) -> float:
    return round(max(0, now - before) / seconds, 3) if seconds > 0 else 0.0


def encode(samples: list[Sample], interval_s: float, window_s: float) -> bytes:
    """Columns, one value per sample: `t`, and per plot a line per name. A name that appears only
    in later samples (an instance of a new provider) is 0 before; the first rate is null (there is
    nothing to difference it with)."""
    finished: dict[str, list[float | None]] = {"succeeded": [], "dead": []}
    for i, s in enumerate(samples):
        if i == 0:
            finished["succeeded"].append(None)
            finished["dead"].append(None)
            continue
        prev = samples[i - 1]
        finished["succeeded"].append(_rate(s.succeeded, prev.succeeded, s.mono - prev.mono))
        finished["dead"].append(_rate(s.dead, prev.dead, s.mono - prev.mono))

    def lines(points: list[dict[str, Any]]) -> dict[str, list[Any]]:
        names = sorted({name for p in points for name in p})
        return {name: [p.get(name, 0) for p in points] for name in names}

    body = {
        "interval_s": interval_s, "window_s": window_s, "now": samples[-1].t if samples else None,
        "t": [round(s.t, 3) for s in samples],
        "finished_per_s": finished,
        "tasks": {"queued": [s.queued for s in samples], "leased": [s.leased for s in samples]},
        "instances": lines([s.instances for s in samples]),
        "cost_per_hour": lines([s.cost_per_hour for s in samples]),
    }
    return json.dumps(body, separators=(",", ":")).encode()


class StatusSeries:
    """The bounded record and its sampler (run() is one of the daemon's supervised tasks)."""

    def __init__(self, store: Store, *, interval_s: float = SERIES_INTERVAL_S,
                 window_s: float = SERIES_WINDOW_S) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError(f"series interval_s must be > 0 and <= window_s, got {interval_s}, {window_s}")
        self.store = store
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=max(1, round(window_s / interval_s)))
        self._body: bytes | None = None

    async def take(self) -> None:
        now, mono = self.store.clock.now(), time.monotonic()
        sample = await self.store.read(lambda db: read_sample(db, now, mono))
        self.samples.append(sample)
        self._body = None

    def body(self) -> bytes:
        """The JSON answer, encoded once per sample."""
        if self._body is None:
            self._body = encode(list(self.samples), self.interval_s, self.window_s)
        return self._body

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.take()
            except (sqlite3.Error, StoreError) as exc:
                # A missed point is a gap in a plot, not a reason to stop the daemon.
                log.warning("series_sample_failed", error=str(exc))
            # On a fixed grid: a slow read does not stretch the interval.
            next_at = max(next_at + self.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())


__all__ = ["SERIES_INTERVAL_S", "SERIES_WINDOW_S", "Sample", "StatusSeries", "encode", "read_sample"]
