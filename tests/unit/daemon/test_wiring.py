"""The parts as daemon.py wires them: collaborators passed in, and each part's apply_config
taking what it reads from a reloaded config (Daemon.reload calls these; the daemon-level reload is
tested end to end in tests/integration/test_service.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from cloudtaskd.config import Config
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.hub import AgentHub
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.store import Store
from cloudtaskd.errors import NotFound
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.http.bundles import Bundles
from cloudtaskd.http.feeds import ReadGate
from cloudtaskd.http.submissions import Submissions
from tests.conftest import make_config


@dataclass
class _Named:
    """Only what the reconciler reads of a provider at construction and reload: its name."""

    name: str


def _changed(config: Config) -> Config:
    agents = replace(config.agents, lease_ttl_s=config.agents.lease_ttl_s * 2, lease_batch_max=7,
                     max_connections_per_instance=5, max_messages_per_s=123.0)
    queue = replace(config.queue, retry_backoff_s=1.5, retry_backoff_max_s=9.0, max_attempts=9)
    return replace(config, agents=agents, queue=queue)


async def test_dispatcher_and_hub_take_their_keys_from_a_new_config(store: Store, tmp_path: Path) -> None:
    old = make_config(tmp_path)
    metrics = Metrics()
    dispatcher = Dispatcher(store, old, metrics=metrics)
    hub = AgentHub(store=store, dispatcher=dispatcher, config=old)
    assert dispatcher.metrics is metrics  # the daemon's one Metrics, not one of its own
    new = _changed(old)
    dispatcher.apply_config(new)
    hub.apply_config(new)
    assert (dispatcher.ttl_s, dispatcher.batch_max, dispatcher.backoff) == (old.agents.lease_ttl_s * 2, 7, (1.5, 9.0))
    assert (hub.max_connections_per_instance, hub.max_messages_per_s) == (5, 123.0)
    # Bound at start: the listener's frame limit stays until a restart (reload.py).
    assert hub.max_message_bytes == old.agents.max_message_bytes


async def test_reconciler_takes_limits_of_running_providers_and_unblocks_launches(store: Store,
                                                                                 tmp_path: Path) -> None:
    old = make_config(tmp_path)
    dispatcher = Dispatcher(store, old)
    metrics = Metrics()
    reconciler = Reconciler(store=store, dispatcher=dispatcher, providers=[(_Named("local"), 2)],  # type: ignore[list-item]
                            config=old, agent_url="ws://x", metrics=metrics, sessions=dispatcher.sessions)
    assert reconciler.metrics is metrics and reconciler.sessions is dispatcher.sessions
    for _ in range(reconciler.failures.block_after):
        reconciler.failures.failed(1, "local/any", "boom")
    assert reconciler.failures.is_blocked(1, "local/any")
    providers = old.providers
    new = replace(old, providers=replace(providers, local=replace(providers.local, max_instances=6)))
    reconciler.apply_config(new)
    assert reconciler.config is new
    assert reconciler.limits == {"local": 6}  # aws is not running: its limit is not taken
    assert not reconciler.failures.is_blocked(1, "local/any")


async def test_submissions_and_bundles_read_the_new_config(store: Store, tmp_path: Path) -> None:
    old = make_config(tmp_path)
    subs = Submissions(store=store, reads=ReadGate(store), dispatcher=Dispatcher(store, old), config=old)
    bundles = Bundles(store, tmp_path / "workers", old.workers)
    new = _changed(old)
    subs.apply_config(new)
    bundles.apply_config(replace(new.workers, max_files=3))
    assert subs.config.queue.max_attempts == 9
    assert bundles.limits.max_files == 3


async def test_an_upload_to_no_job_is_refused_and_its_lock_can_go(store: Store, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    subs = Submissions(store=store, reads=ReadGate(store), dispatcher=Dispatcher(store, config), config=config)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"x": 1}\n'

    with pytest.raises(NotFound):
        await subs.upload(404, chunks(), "tasks")
    assert subs.lock(404) is subs.lock(404)  # one lock per job, shared by its uploads and its delete
    lock = subs.lock(404)
    subs.forget(404)
    assert subs.lock(404) is not lock
    assert await store.fetchone("SELECT 1 FROM uploads") is None  # nothing staged for it
