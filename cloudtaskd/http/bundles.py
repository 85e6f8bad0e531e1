"""Worker bundles on the control host: receive, check, unpack and register them; prune unused ones.

Layout under `state_dir/workers/`: `<sha256>/` the unpacked worker (read by the local provider and
`worker.json` beside `cloudtask.yaml`), `<sha256>.tar.gz` the bundle as uploaded (copied to the
machines that other providers start). A row in `pools` per bundle; jobs and instances point at it.

The rules a bundle must keep are `agent/bundle.py`'s, here and on every instance alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import shutil
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
from cloudtaskd.core.tables import pools
from cloudtaskd.errors import BadInput, StoreFull, is_no_space

log = structlog.get_logger("cloudtaskd.http.bundles")

SPOOL_IN_MEMORY_BYTES = 16 * 1024 * 1024


def bundle_limits(config: WorkersConfig) -> rules.Limits:
    """The caps a bundle is unpacked under, here and on the instances."""
    return rules.Limits(config.max_unpacked_bytes, config.max_files, config.max_depth)


class Bundles:
    def __init__(self, store: Store, workers_dir: Path, config: WorkersConfig) -> None:
        self.store = store
        self.dir = workers_dir
        self.config = config
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
                    digest.update(chunk)
                    buf.write(chunk)
                hexdigest = digest.hexdigest()
                async with self._lock:  # prune() must not remove this digest's files in between
                    spec = await asyncio.to_thread(self._store, buf, hexdigest)
                    pool_id = await self.store.write(_upsert_pool, hexdigest, spec, str(self.dir / hexdigest))
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


def _delete_unused(tx: Tx, cutoff: float) -> list[str]:
    # Pools that a job or an instance row still names stay; the rest may go once old enough.
    unused = pools.unused_before(tx.db, cutoff)
    pools.delete_many(tx, [r["id"] for r in unused])
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


def _upsert_pool(tx: Tx, digest: str, spec: WorkerSpec, path: str) -> int:
    pool_id = pools.id_of(tx.db, digest)
    if pool_id is not None:
        # Uploaded again: its age starts anew, so the pruner does not take it from under the
        # job about to be created for it.
        pools.touch(tx, pool_id)
        return pool_id
    return pools.add(tx, digest, json.dumps(spec.to_dict()), path)
