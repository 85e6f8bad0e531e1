"""The `cloudtaskctl run`s attached to this daemon, and the jobs they leave behind.

A run registers (PUT /v1/runs/ID) before it submits anything and again every ttl/3 while it lives;
the jobs it submits carry its id (jobs.run_id). A job whose run has not been heard from within
`api.run_attach_ttl_s` has nobody waiting for its results: it is held (paused with pause_cause
'run_gone', never leased) until the same `cloudtaskctl run` is started again, which attaches to it
and resumes it, or until `cloudtaskctl resume`/`cancel`. Without this an earlier, killed run's job
ran first, silently, ahead of the job the user was waiting for (issue 15).

The registry lives in memory on the monotonic clock: it says who is alive now, which no stored
time could after a restart. A daemon started by `cloudtaskctl run` holds every orphaned run-job at
once (grace 0: whoever is still alive attaches again within a second); a standalone daemon gives
runs one ttl after its start to come back first.

The daemon a `run` embeds asks `close_if_alone` before it stops: it stays while another run
attached to it still has work, and once it answered "alone" it refuses new attachments, so a run
arriving just then starts a daemon of its own instead of attaching to one about to go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import jobs
from cloudtaskd.errors import DaemonStopping, no_job

log = structlog.get_logger("cloudtaskd.http.runs")

RUN_GONE = "run_gone"  # jobs.pause_cause of a job held because its run is gone
HOLD_EVERY_S = 1.0  # how often jobs of gone runs are looked for (at most; ttl/3 when shorter)


@dataclass(slots=True)
class AttachedRun:
    id: str
    owner: str  # "pid N on HOST", for messages
    job_id: int | None
    seen_at: float  # monotonic

    def to_dict(self, now: float) -> dict[str, object]:
        return {"id": self.id, "owner": self.owner, "job": self.job_id, "seen_s_ago": round(now - self.seen_at, 1)}


def held_reason(job_id: int, owner: str | None) -> str:
    who = f" ({owner})" if owner else ""
    return (f"paused: the `cloudtaskctl run` that submitted it{who} is gone, so nobody waits for its results;"
            f" the same `cloudtaskctl run` started again resumes it, `cloudtaskctl resume {job_id}` lets it go on"
            f" without one, `cloudtaskctl cancel {job_id}` drops it")


def attach_job(tx: Tx, job_id: int, run_id: str, owner: str) -> tuple[bool, int]:
    """The job is this run's from now on; held for a gone run, it goes on. Returns (resumed, pool)."""
    row = jobs.run_of(tx.db, job_id)
    if row is None:
        raise no_job(job_id)
    pool_id = int(row["pool_id"])
    if row["run_id"] != run_id:
        jobs.set_run(tx, job_id, run_id, owner)
    if row["state"] != jobs.PAUSED or row["pause_cause"] != RUN_GONE:
        return False, pool_id
    jobs.resume_held(tx, job_id, RUN_GONE)
    tx.event("job_resumed", job_id=job_id, detail=f"a cloudtaskctl run attached again ({owner})")
    return True, pool_id


def hold_orphans(tx: Tx, live_runs: list[str], live_jobs: list[int]) -> list[tuple[int, str | None]]:
    """Pause every unfinished active job of a run that is not alive. Returns (job, owner) per job held."""
    held = []
    for row in jobs.unfinished_of_runs(tx.db):
        job_id, owner = row["id"], row["run_owner"]
        if row["run_id"] in live_runs or job_id in live_jobs:
            continue
        reason = held_reason(job_id, owner)
        jobs.pause(tx, job_id, reason, RUN_GONE)
        tx.event("job_paused", job_id=job_id, detail=reason)
        held.append((job_id, owner))
    return held


class Runs:
    def __init__(self, *, store: Store, dispatcher: Dispatcher, ttl_s: float, grace_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._hold_from = monotonic() + grace_s
        self._runs: dict[str, AttachedRun] = {}
        self.closing = ""  # why new attachments are refused (the daemon is about to stop), else ""

    def live(self) -> list[AttachedRun]:
        now = self._monotonic()
        for run in [r for r in self._runs.values() if now - r.seen_at > self.ttl_s]:
            del self._runs[run.id]
            log.info("run_gone", run=run.id, owner=run.owner, job=run.job_id)
        return list(self._runs.values())

    def listing(self) -> list[dict[str, object]]:
        now = self._monotonic()
        return [r.to_dict(now) for r in self.live()]

    async def attach(self, run_id: str, owner: str, job_id: int | None) -> bool:
        """Register (or renew) a run, following job_id if given; True when that job was held and goes on now."""
        if self.closing:
            raise DaemonStopping(self.closing)
        known = self._runs.get(run_id)
        # Registered before the write: the hold loop must not take the job between the two.
        self._runs[run_id] = AttachedRun(run_id, owner, job_id, self._monotonic())
        if known is None:
            log.info("run_attached", run=run_id, owner=owner, job=job_id)
        if job_id is None:
            return False
        resumed, pool_id = await self.store.write(attach_job, job_id, run_id, owner)
        if resumed:
            self.dispatcher.notify_work(pool_id)
            log.info("job_resumed", job=job_id, run=run_id, reason="run attached again")
        return resumed

    def detach(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:
            log.info("run_detached", run=run_id, owner=run.owner, job=run.job_id)

    def close_if_alone(self, run_id: str) -> list[AttachedRun]:
        """The other live runs; none: no run may attach from now on (the caller stops the daemon).
        No await in here: nothing can attach between the look and the closing."""
        others = [r for r in self.live() if r.id != run_id]
        if not others:
            self.closing = ("this cloudtaskd is stopping: the `cloudtaskctl run` that started it has finished;"
                            " a run starts its own daemon once this one is gone")
        return others

    async def hold(self) -> list[tuple[int, str | None]]:
        if self._monotonic() < self._hold_from:
            return []
        live = self.live()
        held = await self.store.write(hold_orphans, [r.id for r in live],
                                      [r.job_id for r in live if r.job_id is not None])
        for job_id, owner in held:
            log.warning("job_held", job=job_id, owner=owner, reason="its cloudtaskctl run is gone")
        return held

    async def run(self) -> None:
        """Supervised by the daemon: hold the jobs of gone runs, for as long as it runs."""
        while True:
            await self.hold()
            await asyncio.sleep(min(HOLD_EVERY_S, self.ttl_s / 3))
