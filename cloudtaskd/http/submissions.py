"""Job creation and task uploads: a job row made from a known worker, and an upload's tasks
staged in batches, then committed whole or discarded; an upload the store could not finish (a
full disk) is settled in the background once it can, as a restart would (resume_uploads).

The control API's routes parse the request and call these; each job's uploads (and its deletion)
take the job's lock, since a chunk step works on all of the job's staged rows. Across replicas on
PostgreSQL: one upload under way per job (a second is refused, UploadBusy), and the replica receiving
an upload holds its claim until it is settled (pg/upload_claims.py), so that another replica's start
settles only uploads whose owner is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog

from cloudtask_wire.workerspec import WorkerSpec
from cloudtaskd.config import Config
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.pg.upload_claims import Claim, UploadClaims
from cloudtaskd.core.states import COUNTER
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import jobs, pools, uploads
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.taskfile import TaskFileError, TaskFileParser, parse_task
from cloudtaskd.errors import BadInput, CloudtaskError, StoreError, UploadSettled, no_job
from cloudtaskd.http.feeds import ReadGate

log = structlog.get_logger("cloudtaskd.http.submissions")

SETTLE_RETRY_S = 1.0  # how often an upload the store could not finish (a full disk) is tried again


class Submissions:
    def __init__(self, *, store: Store, reads: ReadGate, dispatcher: Dispatcher, config: Config) -> None:
        """reads: the control API's read gate (an upload's first read is a request's); dispatcher:
        told of work once tasks are queued."""
        self.store = store
        self.reads = reads
        self.dispatcher = dispatcher
        self.config = config  # queue.* read at each job and upload
        self._upload_locks: dict[int, asyncio.Lock] = {}
        self._settling: set[asyncio.Task[None]] = set()  # uploads finished once the store can (_settle_later)
        self.claims = claims_of(store)

    def apply_config(self, config: Config) -> None:
        """On reload: queue.max_attempts, task_timeout_s for new jobs, max_task_bytes for the next upload."""
        self.config = config

    def lock(self, job_id: int) -> asyncio.Lock:
        """The job's upload lock: held while one of its uploads stages or settles, and while it is deleted."""
        return self._upload_locks.setdefault(job_id, asyncio.Lock())

    def forget(self, job_id: int) -> None:
        """The job is gone: its lock with it."""
        self._upload_locks.pop(job_id, None)

    async def create_job(self, name: str, digest: str, opts: dict[str, Any], timeout: float | None) -> int:
        job_id = await self.store.write(_create_job, name, digest, opts, timeout, self.config)
        log.info("job_created", job=job_id, name=name)
        return job_id

    async def upload(self, job_id: int, chunks: AsyncIterator[bytes], source: str) -> int:
        """The tasks of a task file (chunks of its bytes) added to the job whole, or none of them;
        returns how many. A refused file is a BadInput naming its line."""
        async with self.lock(job_id):
            row = await self.reads.read(lambda db: jobs.for_upload(db, job_id))
            if row is None:
                raise no_job(job_id)
            job = dict(row)
            claim = await self._claim()
            try:
                upload_id = await self.store.write(queue.create_upload, job_id,
                                                   None if claim is None else claim.upload_id)
            except BaseException:
                await _release(claim)
                raise
            try:
                n = await self._stage(chunks, job, source)
            except BaseException as exc:
                # Refused (or the client went away): nothing of this upload may stay behind.
                await self._discard(upload_id, job_id, job["pool_id"], claim)
                if isinstance(exc, TaskFileError):
                    raise BadInput(f"{source}:{exc.line}: {exc.reason}", line=exc.line, field=exc.field) from None
                raise
            try:
                await queue.finish_upload(self.store, upload_id, job_id, commit=True)
            except StoreError:
                state = await self.reads.read(lambda db: uploads.state_of(db, upload_id))
                self._settle_later(upload_id, job_id, job["pool_id"], claim)
                if state != uploads.COMMITTING:
                    raise  # nothing was queued: refused whole, the staged rows go when the store can
                # Past its first chunk an upload is validated and decided: the rest is queued later.
                log.warning("upload_commit_deferred", upload=upload_id, job=job_id, tasks=n)
            except BaseException:
                await _release(claim)
                raise
            else:
                await _release(claim)
        self.dispatcher.notify_work(job["pool_id"])
        log.info("tasks_accepted", job=job_id, tasks=n, source=source)
        return n

    async def enqueue(self, job_id: int, body: bytes, copies: int | None) -> list[tuple[int, str]]:
        """A standing queue's enqueue: one task object (or `copies` copies), validated as a task
        file's line and queued in one write transaction, no upload staged; returns each task's
        (row id, key). Not under the job's upload lock: it touches no staged row, and a queue must
        not wait behind a big file's upload."""
        try:
            task = parse_task(body, self.config.queue.max_task_bytes)
        except TaskFileError as exc:
            raise BadInput(f"task: {exc.reason}", field=exc.field) from None
        done = await self.store.write(queue.enqueue, job_id, task, copies)
        self.dispatcher.notify_work(done.pool_id)
        log.debug("tasks_enqueued", job=job_id, tasks=len(done.tasks), first=done.tasks[0][0])
        return done.tasks

    async def close(self, job_id: int) -> None:
        """An open job takes no more tasks; it finishes once those it has are done (one that never
        got a task is cancelled: there is nothing to finish)."""
        await self.store.write(_close_job, job_id)
        log.info("job_closed", job=job_id)

    async def _stage(self, chunks: AsyncIterator[bytes], job: dict[str, Any], source: str) -> int:
        parser = TaskFileParser(self.config.queue.max_task_bytes)
        pending: list[Any] = []
        total = 0
        async for chunk in chunks:
            pending.extend(parser.feed(chunk))
            while len(pending) >= queue.STAGE_BATCH:
                batch, pending = pending[: queue.STAGE_BATCH], pending[queue.STAGE_BATCH:]
                await self.store.write(queue.stage_tasks, job, batch, source)
                total += len(batch)
        pending.extend(parser.finish())
        for i in range(0, len(pending), queue.STAGE_BATCH):
            batch = pending[i: i + queue.STAGE_BATCH]
            await self.store.write(queue.stage_tasks, job, batch, source)
            total += len(batch)
        if total == 0:
            raise BadInput(f"{source}: the file holds no tasks")
        return total

    async def _claim(self) -> Claim | None:
        """PostgreSQL: the claim of the next upload's id, held before its row exists."""
        if self.claims is None:
            return None
        while True:
            upload_id = await self.store.write(lambda tx: uploads.reserve_id(tx.db))
            claim = await self.claims.take(upload_id)
            if claim is not None:
                return claim
            # Not reachable in practice (a fresh id is no one's): take the next one.

    async def _discard(self, upload_id: int, job_id: int, pool_id: int, claim: Claim | None) -> None:
        async def discard() -> None:
            try:
                await queue.finish_upload(self.store, upload_id, job_id, commit=False)
            except StoreError:  # a full disk can refuse the delete too: never leave staged rows behind
                self._settle_later(upload_id, job_id, pool_id, claim)
                return
            await _release(claim)

        # Shielded: a client that hangs up mid-upload cancels this handler, not the clean-up.
        await asyncio.shield(discard())

    def _settle_later(self, upload_id: int, job_id: int, pool_id: int, claim: Claim | None) -> None:
        """Finish an upload the store could not finish (a full disk) once it can, in the background:
        a staging one is discarded, a committing one queued, as a restart would (resume_uploads).
        Each attempt holds the job's upload lock, since a chunk step works on all of the job's staged rows."""

        async def settle() -> None:
            try:
                await settle_when_possible()
            finally:
                await _release(claim)

        async def settle_when_possible() -> None:
            while not self.store.stopping:
                await asyncio.sleep(SETTLE_RETRY_S)
                try:
                    async with self.lock(job_id):
                        state = await self.store.read(lambda db: uploads.state_of(db, upload_id))
                        if state in uploads.RECEIVING:
                            await queue.finish_upload(self.store, upload_id, job_id,
                                                      commit=state == uploads.COMMITTING)
                except StoreError:
                    continue  # the store logs the outage; try again
                except UploadSettled:
                    log.warning("upload_settled_elsewhere", upload=upload_id, job=job_id)
                    return
                if state == uploads.COMMITTING:
                    self.dispatcher.notify_work(pool_id)
                log.info("upload_settled", upload=upload_id, job=job_id, outcome=state)
                return

        task = asyncio.get_running_loop().create_task(settle(), name=f"settle-upload-{upload_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)


def claims_of(store: Store) -> UploadClaims | None:
    """Uploads are claimed on PostgreSQL only: one SQLite file serves one daemon."""
    return UploadClaims(store.dsn) if isinstance(store, PgStore) else None


async def _release(claim: Claim | None) -> None:
    if claim is not None:
        await asyncio.shield(claim.release())


async def resume_uploads(store: Store) -> None:
    """At start: uploads a crash (or a full disk) left unfinished are finished as their rows say. On
    PostgreSQL only those whose claim this replica can take: the others' owners are alive, still
    receiving (or settling) them."""
    claims = claims_of(store)
    for r in await store.read(uploads.unfinished):
        claim = None if claims is None else await claims.take(r["id"])
        if claims is not None and claim is None:
            log.info("upload_left_to_owner", upload=r["id"], job=r["job_id"], state=r["state"])
            continue
        try:
            # Committing: it was validated whole, finish it. Staging: the client never got an ack.
            await queue.finish_upload(store, r["id"], r["job_id"], commit=r["state"] == uploads.COMMITTING)
        except UploadSettled:  # another replica rejects it meanwhile (it had lost its claim)
            continue
        finally:
            await _release(claim)
        log.info("upload_resumed", upload=r["id"], job=r["job_id"], outcome=r["state"])


def _create_job(tx: Tx, name: str, digest: str, opts: dict[str, Any], timeout: float | None, config: Config) -> int:
    pool = pools.by_digest(tx.db, digest)
    if pool is None:
        raise BadInput(f"worker {digest[:16]!r} is unknown: upload it first (POST /v1/workers)", field="worker")
    spec = WorkerSpec.from_dict(json.loads(pool["spec"]))
    timeout_s = timeout or spec.timeout or config.queue.task_timeout_s or None
    run = opts.get("run") or {}
    job_id = jobs.create(tx, name=name, pool_id=pool["id"],
                         max_attempts=opts["max_attempts"] or config.queue.max_attempts, timeout_s=timeout_s,
                         max_instances=opts["max_instances"],
                         policy=json.dumps(opts["policy"].to_dict()), max_total_cost=opts["max_total_cost"],
                         run_id=run.get("id"), run_owner=run.get("owner"), submission=run.get("submission"),
                         is_open=bool(opts.get("open")))
    tx.event("job_created", job_id=job_id, detail=json.dumps({"name": name, "open": bool(opts.get("open"))}))
    return job_id


def _close_job(tx: Tx, job_id: int) -> None:
    row = jobs.counters(tx.db, job_id)
    if row is None:
        raise no_job(job_id)
    if row["is_open"] is None:
        raise CloudtaskError(f"job {job_id} was not created open: there is nothing to close"
                             " (a job created with open: true, or `cloudtaskctl submit --open`, is)")
    if not jobs.close(tx, job_id):
        return  # closed already: the same answer again
    tx.event("job_closed", job_id=job_id)
    if row["state"] != jobs.CANCELLED and not any(row[c] for c in COUNTER.values()):
        # Closed before any task came: nothing to run or finish, so it ends as a withdrawn submission would.
        jobs.cancel(tx, job_id)
        jobs.set_reason(tx, job_id, "closed before any task was added")
