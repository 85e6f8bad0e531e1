"""Worker bundles shared by replicas through PostgreSQL (http/bundles.py, core/tables/bundles.py):
a replica that did not receive a worker materializes it from the database, checked by its digest."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloudtaskd.config import WorkersConfig
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Store
from cloudtaskd.errors import BadInput, StoreError
from cloudtaskd.http.bundles import Bundles
from tests.procs import bundle

WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(task_id, data):\n    return data\n"}


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_a_copy_whose_sha256_is_not_its_digest_is_refused(tmp_path: Path) -> None:
    data = bundle(WORKER)
    digest = hashlib.sha256(data).hexdigest()
    other = bundle({**WORKER, "w.py": "def run(task_id, data):\n    return 'not yours'\n"})
    b = Bundles(Store(tmp_path / "unused.db"), tmp_path / "workers", WorkersConfig(), shared=True)
    with pytest.raises(StoreError, match="sha256"):
        b.materialize(other, digest)
    assert not (tmp_path / "workers" / digest).exists()
    assert not (tmp_path / "workers" / f"{digest}.tar.gz").exists()
    b.materialize(data, digest)
    assert (tmp_path / "workers" / digest / "w.py").is_file()
    assert (tmp_path / "workers" / f"{digest}.tar.gz").read_bytes() == data


async def test_a_replica_materializes_a_worker_another_received(pg_store: PgStore, tmp_path: Path) -> None:
    store = pg_store  # type: ignore[assignment]
    a = Bundles(store, tmp_path / "a", WorkersConfig(), shared=True)  # type: ignore[arg-type]
    b = Bundles(store, tmp_path / "b", WorkersConfig(), shared=True)  # type: ignore[arg-type]
    data = bundle(WORKER)
    digest, _ = await a.receive(_chunks(data))
    assert not (tmp_path / "b" / digest).exists()
    # Many callers at once (jobs, registrations, the leader): one materialization, whole.
    paths = await asyncio.gather(*(b.ensure(digest) for _ in range(8)))
    assert set(paths) == {tmp_path / "b" / digest}
    assert (tmp_path / "b" / digest / "cloudtask.yaml").is_file()
    assert (tmp_path / "b" / f"{digest}.tar.gz").read_bytes() == data
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".incoming-") or p.name.endswith(".partial")]

    with pytest.raises(BadInput, match="unknown"):
        await b.ensure("0" * 64)
    with pytest.raises(BadInput, match="digest"):
        await b.ensure("../a")

    # A corrupt row is refused, and nothing of it lands on the disk.
    other = bundle({**WORKER, "w.py": "x = 1\n"})
    forged = hashlib.sha256(bundle({**WORKER, "extra.txt": "y"})).hexdigest()
    await store.write(lambda tx: tx.db.execute("INSERT INTO bundles (digest, tarball, size, created_at)"
                                               " VALUES (?, ?, ?, 0)", (forged, other, len(other))))
    with pytest.raises(StoreError, match="sha256"):
        await b.ensure(forged)
    assert not (tmp_path / "b" / forged).exists()


async def test_pruning_deletes_the_shared_tarball_and_every_replicas_copy(pg_store: PgStore, tmp_path: Path) -> None:
    store = pg_store
    a = Bundles(store, tmp_path / "a", WorkersConfig(unused_ttl_s=60), shared=True)  # type: ignore[arg-type]
    b = Bundles(store, tmp_path / "b", WorkersConfig(unused_ttl_s=60), shared=True)  # type: ignore[arg-type]
    digest, _ = await a.receive(_chunks(bundle(WORKER)))
    await b.ensure(digest)
    assert await b.prune(now=store.clock.now()) == []  # still young: B keeps its copy
    assert (tmp_path / "b" / digest).is_dir()
    assert await a.prune(now=store.clock.now() + 120) == [digest]
    row = await store.fetchone("SELECT digest FROM bundles WHERE digest = ?", (digest,))
    assert row is None
    assert await b.prune(now=store.clock.now()) == [digest]  # pruned by A: B's copy goes at its next prune
    assert not (tmp_path / "b" / digest).exists() and not (tmp_path / "b" / f"{digest}.tar.gz").exists()
