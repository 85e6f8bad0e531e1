"""Uploads across replicas on one PostgreSQL database (review of issue 17, findings 1, 2, 4): a
replica's start leaves another's upload under way alone, one upload under way per job, and a commit
walks only its own upload's ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.pg.upload_claims import UploadClaims
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.core.tables import uploads
from cloudtaskd.core.taskfile import ParsedTask
from cloudtaskd.errors import UploadBusy
from cloudtaskd.http.submissions import resume_uploads
from tests.unit.core.test_queue import _second_job, _setup_job


@pytest.fixture
async def other(pg_dsn: str) -> AsyncIterator[PgStore]:
    """A second replica's store on the same database."""
    s = PgStore(pg_dsn)
    await s.open()
    yield s
    await s.close()


def _batch(tag: str, n: int) -> list[ParsedTask]:
    return [ParsedTask(i + 1, f"{tag}-{i}", "{}", 0, None, None) for i in range(n)]


async def _staged(store: PgStore, job_id: int) -> int:
    row = await store.fetchone("SELECT count(*) FROM tasks WHERE job_id = ? AND state = 'staged'", (job_id,))
    assert row is not None
    return int(row[0])


async def test_a_replicas_start_leaves_anothers_upload_under_way_alone(pg_store: PgStore, other: PgStore) -> None:
    job = await pg_store.write(_setup_job, 3)
    claims = UploadClaims(pg_store.dsn)
    claim = await claims.take(await pg_store.write(lambda tx: uploads.reserve_id(tx.db)))
    assert claim is not None
    try:
        up = await pg_store.write(queue.create_upload, 1, claim.upload_id)
        await pg_store.write(queue.stage_tasks, job, _batch("a", 5), "a.jsonl")
        await resume_uploads(other)  # replica B starts while A receives
        assert await pg_store.read(lambda db: uploads.state_of(db, up)) == uploads.STAGING
        assert await _staged(pg_store, 1) == 5
        await pg_store.write(queue.stage_tasks, job, _batch("b", 5), "a.jsonl")
        await queue.finish_upload(pg_store, up, 1, commit=True)
    finally:
        await claim.release()
    row = await pg_store.fetchone("SELECT count(*) FROM tasks WHERE job_id = 1 AND state = 'queued'")
    assert row is not None and row[0] == 10
    # Its owner gone (the claim released), an unfinished upload is settled by the next start.
    await pg_store.write(queue.create_upload, 1)
    await pg_store.write(queue.stage_tasks, job, _batch("c", 3), "c.jsonl")
    await resume_uploads(other)
    assert await _staged(pg_store, 1) == 0
    assert await pg_store.read(uploads.unfinished) == []


async def test_one_upload_under_way_per_job_across_replicas(pg_store: PgStore, other: PgStore) -> None:
    job = await pg_store.write(_setup_job, 3)
    first = await pg_store.write(queue.create_upload, 1)
    await pg_store.write(queue.stage_tasks, job, _batch("a", 4), "a.jsonl")
    with pytest.raises(UploadBusy, match="job 1 has another upload under way"):
        await other.write(queue.create_upload, 1)
    await queue.finish_upload(pg_store, first, 1, commit=True)
    second = await other.write(queue.create_upload, 1)  # the first settled: the next may come
    await other.write(queue.stage_tasks, job, _batch("b", 2), "b.jsonl")
    await queue.finish_upload(other, second, 1, commit=False)
    row = await pg_store.fetchone("SELECT count(*) FROM tasks WHERE job_id = 1 AND state = 'queued'")
    assert row is not None and row[0] == 4


async def test_a_small_commit_walks_only_its_own_ids(pg_store: PgStore, other: PgStore) -> None:
    """A big upload of another job stages above the small one's rows on another replica: the small
    one's walk ends at its own newest row, not at the table's."""
    small = await pg_store.write(_setup_job, 3)
    big = await other.write(_second_job)
    up_small = await pg_store.write(queue.create_upload, 1)
    up_big = await other.write(queue.create_upload, 2)
    await pg_store.write(queue.stage_tasks, small, _batch("s", 3), "s.jsonl")
    for b in range(4):
        await other.write(queue.stage_tasks, big, _batch(f"b{b}", 50), "b.jsonl")
    start, end = await pg_store.read(lambda db: queue.upload_span(db, up_small))
    assert end - start <= 3
    chunks, cursor = 0, start
    while cursor is not None:
        cursor = await pg_store.write(queue.commit_upload_chunk, up_small, 1, cursor, 1)
        chunks += 1
    assert chunks <= 3  # with the table's newest row as its end it walked ~200 ids, one a chunk
    assert await _staged(pg_store, 2) == 200
    await queue.finish_upload(other, up_big, 2, commit=True)
