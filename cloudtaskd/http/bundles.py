"""Worker bundles on the control host: receive, check, unpack and register them; prune unused ones.

Layout under `state_dir/workers/`: `<sha256>/` the unpacked worker (read by the local provider and
`worker.json` beside `cloudtask.yaml`), `<sha256>.tar.gz` the bundle as uploaded (copied to the
machines that other providers start). A row in `pools` per bundle; jobs and instances point at it.

On PostgreSQL (`shared`) the tarball is also kept in the `bundles` table, written with the pool row:
a replica that needs a worker another received (a job created on it, its leader launching, agents
registered on it) materializes it from there first (`ensure`), checked against its digest.

The rules a bundle must keep are `agent/bundle.py`'s, here and on every instance alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import structlog
import yaml

from agent import bundle as rules
from cloudtask_wire.workerspec import SPEC_FILE, WorkerSpec
from cloudtaskd.config import WorkersConfig
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import bundles as bundle_rows
from cloudtaskd.core.tables import pools
from cloudtaskd.core.tables.bulk import postgres
from cloudtaskd.errors import BadInput, StoreError, StoreFull, is_no_space

log = structlog.get_logger("cloudtaskd.http.bundles")

SPOOL_IN_MEMORY_BYTES = 16 * 1024 * 1024
SHARED_MAX_BYTES = 1024**3 - 1024**2  # PostgreSQL's bytea holds up to 1 GiB
_DIGEST = re.compile(r"[0-9a-f]{64}")


def bundle_limits(config: WorkersConfig) -> rules.Limits:
    """The caps a bundle is unpacked under, here and on the instances."""
    return rules.Limits(config.max_unpacked_bytes, config.max_files, config.max_depth)


class Bundles:
    def __init__(self, store: Store, workers_dir: Path, config: WorkersConfig, *, shared: bool = False) -> None:
        self.store = store
        self.dir = workers_dir
        self.config = config
        self.shared = shared  # PostgreSQL: replicas share the bundles through the database
        self._lock = asyncio.Lock()

    def apply_config(self, config: WorkersConfig) -> None:
        """On reload: the caps are read at each upload and prune."""
        self.config = config

    @property
    def limits(self) -> rules.Limits:
        return bundle_limits(self.config)

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[str, WorkerSpec]:
        """Spool an upload, check it against the rules, unpack and register it; (digest, spec)."""
        cap = self.config.max_upload_bytes
        digest = hashlib.sha256()
        size = 0
        try:
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES, dir=self._spool_dir()) as buf:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > cap:
                        raise BadInput(f"worker bundle is larger than {cap} bytes (workers.max_upload_bytes)")
                    if self.shared and size > SHARED_MAX_BYTES:
                        raise BadInput(f"worker bundle is larger than {SHARED_MAX_BYTES} bytes, the most the "
                                       "replicas share through PostgreSQL (a bytea value): make it smaller")
                    digest.update(chunk)
                    buf.write(chunk)
                hexdigest = digest.hexdigest()
                async with self._lock:  # prune() must not remove this digest's files in between
                    spec = await asyncio.to_thread(self._store, buf, hexdigest)
                    tarball = await asyncio.to_thread(_read_all, buf) if self.shared else None
                    pool_id = await self.store.write(_upsert_pool, hexdigest, spec, str(self.dir / hexdigest),
                                                     tarball)
        except OSError as exc:
            if is_no_space(exc):
                raise StoreFull(self.dir, "storing a worker bundle") from exc
            raise
        log.info("worker_registered", digest=hexdigest[:12], pool=pool_id, mode=spec.mode, bytes=size)
        return hexdigest, spec

    def _store(self, buf: IO[bytes], digest: str) -> WorkerSpec:
        target = self.dir / digest
        if not target.exists():
            buf.seek(0)
            try:
                rules.unpack(buf, str(target), self.limits)
            except rules.BundleError as exc:
                log.warning("worker_refused", entry=exc.entry, rule=exc.rule)
                raise BadInput(str(exc), field=exc.entry) from None
        tarball = self.dir / f"{digest}.tar.gz"
        if not tarball.exists():  # kept for providers that copy the worker to a machine
            buf.seek(0)
            _save(buf, tarball)
        return _read_spec(target)

    async def ensure(self, digest: str) -> Path:
        """The unpacked worker of `digest` in this state directory, materialized from the database
        first when another replica received it. BadInput when no replica has it."""
        if not self.shared:
            return self.dir / digest
        if not _DIGEST.fullmatch(digest):  # it names a path below
            raise BadInput("worker: expected the sha256 digest returned by POST /v1/workers", field="worker")
        target = self.dir / digest
        if _complete(self.dir, digest):
            return target
        async with self._lock:  # once: a second caller finds the files the first made
            if _complete(self.dir, digest):
                return target
            data = await self.store.read(lambda db: bundle_rows.tarball(db, digest))
            if data is None:
                raise BadInput(f"worker {digest[:16]!r} is unknown: upload it first (POST /v1/workers)",
                               field="worker")
            try:
                await asyncio.to_thread(self.materialize, data, digest)
            except OSError as exc:
                if is_no_space(exc):
                    raise StoreFull(self.dir, "materializing a worker bundle") from exc
                raise
        log.info("worker_materialized", digest=digest[:12], bytes=len(data))
        return target

    def materialize(self, data: bytes, digest: str) -> WorkerSpec:
        """Unpack and keep the tarball `data` as the worker `digest`, refused unless its sha256 is
        that digest (a corrupt or substituted copy never reaches an instance)."""
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            log.error("worker_digest_mismatch", digest=digest[:12], got=got[:12])
            raise StoreError(f"the stored worker bundle {digest[:16]} has sha256 {got[:16]}: "
                             "refused; upload the worker again (POST /v1/workers)")
        self._spool_dir()
        return self._store(io.BytesIO(data), digest)

    def _spool_dir(self) -> str:
        # Spooled past 16 MiB onto the state disk, not /tmp (often a small tmpfs).
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(self.dir)

    async def prune(self, now: float | None = None) -> list[str]:
        """Remove the bundles no job and no instance uses, uploaded over `unused_ttl_s` ago.
        The row goes first, in a transaction that checks again: a job created meanwhile keeps it."""
        cutoff = (now if now is not None else self.store.clock.now()) - self.config.unused_ttl_s
        async with self._lock:
            gone: list[str] = await self.store.write(_delete_unused, cutoff)
            if self.shared:  # what another replica pruned: the copies this one materialized
                gone += await self.store.read(lambda db: _pruned_elsewhere(db, self.dir, gone))
            await asyncio.to_thread(self._remove_files, gone)
        for digest in gone:
            log.info("worker_pruned", digest=digest[:12])
        return gone

    def _remove_files(self, digests: list[str]) -> None:
        for digest in digests:
            shutil.rmtree(self.dir / digest, ignore_errors=True)
            (self.dir / f"{digest}.tar.gz").unlink(missing_ok=True)
        # What a crash mid-upload left: no upload is unpacking now (the lock), so all of it is stale.
        if self.dir.is_dir():
            for leftover in self.dir.iterdir():
                if leftover.name.startswith(".incoming-"):
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover.name.endswith(".partial"):
                    leftover.unlink(missing_ok=True)


def _complete(workers: Path, digest: str) -> bool:
    return (workers / digest).is_dir() and (workers / f"{digest}.tar.gz").is_file()


def _pruned_elsewhere(db: sqlite3.Connection, workers: Path, gone: list[str]) -> list[str]:
    """The digests unpacked here that no pool names any more. Under Bundles._lock no upload here
    is between its files and its row, so a digest without a row here was pruned (by any replica)."""
    here = [p.name for p in workers.iterdir() if _DIGEST.fullmatch(p.name)] if workers.is_dir() else []
    return [d for d in here if d not in gone and pools.id_of(db, d) is None]


def _read_all(buf: IO[bytes]) -> bytes:
    buf.seek(0)
    return buf.read()


def _delete_unused(tx: Tx, cutoff: float) -> list[str]:
    # Pools that a job or an instance row still names stay; the rest may go once old enough.
    unused = pools.unused_before(tx.db, cutoff)
    pools.delete_many(tx, [r["id"] for r in unused])
    if postgres(tx.db):
        bundle_rows.delete_many(tx, [str(r["digest"]) for r in unused])
    for r in unused:
        tx.event("worker_pruned", detail=json.dumps({"digest": r["digest"]}))
    return [str(r["digest"]) for r in unused]


def _save(buf: IO[bytes], path: Path) -> None:
    """Write buf to path whole or not at all (a full disk leaves no partial file behind)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            shutil.copyfileobj(buf, f)
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_spec(worker_dir: Path) -> WorkerSpec:
    path = worker_dir / SPEC_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"the worker has no {SPEC_FILE} at its top level") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{SPEC_FILE}: not valid YAML: {exc}") from None
    spec = WorkerSpec.from_dict(raw)
    resolved = json.dumps(spec.to_dict()).encode()
    path = worker_dir / "worker.json"
    with contextlib.suppress(OSError):
        if path.read_bytes() == resolved:
            return spec  # a worker uploaded again writes nothing: it registers even on a full disk
    _save(io.BytesIO(resolved), path)
    return spec


def _upsert_pool(tx: Tx, digest: str, spec: WorkerSpec, path: str, tarball: bytes | None) -> int:
    if tarball is not None:
        bundle_rows.put(tx, digest, tarball)
    pool_id = pools.id_of(tx.db, digest)
    if pool_id is not None:
        # Uploaded again: its age starts anew, so the pruner does not take it from under the
        # job about to be created for it.
        pools.touch(tx, pool_id)
        return pool_id
    return pools.add(tx, digest, json.dumps(spec.to_dict()), path)
