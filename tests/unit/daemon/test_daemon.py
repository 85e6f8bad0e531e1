"""daemon.py's own job, wiring and supervision, on a real state directory: a start and a stop leave
nothing behind (socket, lock, threads, tasks), a start that fails closes what it opened, and a
supervised background task that dies stops the daemon loudly."""

from __future__ import annotations

import asyncio
import fcntl
import threading
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cloudtaskd.config import Config
from cloudtaskd.configtypes import Secret
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.states import InstanceState
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import instances, meta
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import ConfigError, SharedCaMismatch, StateDirBusy
from tests.conftest import make_config, wait_for
from tests.unit.core.test_queue import lease, submit

SUPERVISED = {"dispatcher", "reconciler", "bundle_pruner", "status_series", "housekeeper", "runs"}


def _store_threads() -> set[threading.Thread]:
    # aiosqlite runs each connection on a thread of its own, named after its worker function
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name and t.is_alive()}


def _lock_is_free(state_dir: Path) -> bool:
    with open(state_dir / "cloudtaskd.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


async def _nothing_left(before: set[threading.Thread]) -> None:
    """The store's threads end just after their connections close: waited for with a deadline."""
    await wait_for(lambda: asyncio.sleep(0, _store_threads() <= before), timeout=10,
                   message="the store's connection threads to end")


def _config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


async def test_start_then_stop_leaves_no_socket_lock_thread_or_task(tmp_path: Path) -> None:
    config = _config(tmp_path)
    before = _store_threads()
    daemon = Daemon(config, shutdown_grace_s=1.0)
    await daemon.start()
    try:
        assert config.socket_path.is_socket()
        assert not _lock_is_free(config.state_path)
        assert len(_store_threads() - before) == 3  # writer, reader, checkpointer
        running = {t.get_name() for t in asyncio.all_tasks()}
        assert SUPERVISED <= running
        assert await daemon.health() is None
    finally:
        await daemon.stop()
    assert not config.socket_path.exists()
    assert _lock_is_free(config.state_path)
    assert not SUPERVISED & {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    await _nothing_left(before)

    again = Daemon(config, shutdown_grace_s=1.0)  # the directory is free for the next daemon
    await again.start()
    await again.stop()
    await _nothing_left(before)


async def test_a_second_daemon_on_the_same_directory_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    config = _config(tmp_path)
    before = _store_threads()
    first = Daemon(config, shutdown_grace_s=1.0)
    await first.start()
    try:
        threads = _store_threads()
        second = Daemon(config, shutdown_grace_s=1.0)
        with pytest.raises(StateDirBusy, match="another cloudtaskd is running on the state directory"):
            await second.start()
        assert _store_threads() == threads  # the second opened no database
        assert config.socket_path.is_socket()  # and did not take the first's socket away
        assert await first.health() is None
    finally:
        await first.stop()
    await _nothing_left(before)


async def test_a_start_that_fails_half_way_closes_what_it_opened(tmp_path: Path) -> None:
    # The control socket's directory is writable by anyone: refused after the database is open and
    # the agent listener is up, before any background task runs.
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    (unsafe / "someone-elses").write_text("")  # not empty: not the daemon's to re-permission
    unsafe.chmod(0o777)
    config = _config(tmp_path)
    config = replace(config, api=replace(config.api, socket=str(unsafe / "cloudtaskd.sock")))
    before = _store_threads()
    tasks_before = set(asyncio.all_tasks())
    daemon = Daemon(config, shutdown_grace_s=1.0)
    with pytest.raises(ConfigError, match="writable by others"):
        await daemon.start()
    assert daemon.agent_url  # it got as far as the agent listener
    await _nothing_left(before)
    assert _lock_is_free(config.state_path)
    assert not (set(asyncio.all_tasks()) - tasks_before - {asyncio.current_task()})
    # the agent port is no longer listened on
    port = int(daemon.agent_url.rsplit(":", 1)[1].split("/", 1)[0])
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()


async def test_a_supervised_task_that_dies_fails_the_daemon_loudly(tmp_path: Path) -> None:
    daemon = Daemon(_config(tmp_path), shutdown_grace_s=1.0)

    async def broken_series() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the status series hit a bug")

    daemon.series.run = broken_series  # type: ignore[method-assign]  # a loop of the daemon's that dies
    with capture_logs() as logs:
        await daemon.start()
        try:
            await asyncio.wait_for(daemon.failed.wait(), 10)
            assert await daemon.health() == "a supervised background task has died"
        finally:
            await daemon.stop()
    died = [e for e in logs if e["event"] == "background_task_died"]
    assert len(died) == 1, died
    assert died[0]["log_level"] == "error" and died[0]["task"] == "status_series"
    assert "the status series hit a bug" in died[0]["error"]


async def test_a_replica_refused_by_the_shared_identity_check_writes_no_daemon_id(tmp_path: Path, pg_dsn: str) -> None:
    """On PostgreSQL the daemon id is claimed in the shared-identity check's transaction: a replica whose
    CA is not the recorded one stops before writing anything but the (shared) migrations."""
    config = replace(_config(tmp_path), database=Secret(pg_dsn))
    assert config.agents.tls  # so agents pin the CA and every replica must have the recorded one
    recorded = "0" * 64  # as if another replica had recorded its CA
    store = PgStore(pg_dsn)
    await store.open()
    try:
        await store.write(lambda tx: tx.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                                                   (meta.TLS_CA_SHA256, recorded)))
        with pytest.raises(SharedCaMismatch):
            await Daemon(config, shutdown_grace_s=1.0).start()
        rows = await store.fetchall("SELECT key, value FROM meta ORDER BY key")
        assert [(r["key"], r["value"]) for r in rows] == [(meta.TLS_CA_SHA256, recorded)]
    finally:
        await store.close()


async def test_a_replica_starting_while_another_serves_leaves_that_ones_agents_leases_alone(
        tmp_path: Path, pg_dsn: str) -> None:
    """A replica's start renews only the leases of agents no live replica holds: "here" is written present
    every half second as another replica does for its connected agents (replica.presence), so its lease
    keeps the expiry its heartbeats gave it; "gone" was connected nowhere, so its lease gets the grace
    a reconnection needs, as on SQLite after a restart."""
    config = replace(_config(tmp_path), database=Secret(pg_dsn))
    store = PgStore(pg_dsn)
    await store.open()
    await submit(store, 2)
    (held,) = await lease(store, "here", 1, ttl=600.0)
    (orphan,) = await lease(store, "gone", 1, ttl=600.0)

    def agents(tx: Tx) -> None:
        for inst in ("here", "gone"):
            instances.add(tx, inst, provider="ssh", pool_id=1, state=InstanceState.STARTING, slots=1, token_hash="h")

    await store.write(agents)

    async def other_replica() -> None:
        while True:
            await store.write(instances.touch_many, ["here"])
            await asyncio.sleep(0.5)

    async def expiries() -> dict[int, float]:
        rows = await store.fetchall("SELECT id, lease_expires_at FROM tasks WHERE state = 'leased'")
        return {r["id"]: r["lease_expires_at"] for r in rows}

    before = await expiries()
    presence = asyncio.create_task(other_replica())
    daemon = Daemon(config, shutdown_grace_s=1.0)
    try:
        await daemon.start()
        after = await expiries()
        assert after[held["id"]] == before[held["id"]]
        # Exactly lease_ttl_s from the start: well below the 600 s its lease had.
        assert after[orphan["id"]] < before[orphan["id"]] - 300
    finally:
        presence.cancel()
        with suppress(asyncio.CancelledError):
            await presence
        await daemon.stop()
        await store.close()
