"""A whole job through the daemon on one emulated cloud, bootstrapped over SSH at a real local
OpenSSH (reached through the documented `ssh_address_override`): what every cloud's end-to-end
test shares."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import CloudProviderConfig, LocalProviderConfig, ProvidersConfig
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.providers.cloud import CloudDriver, CloudProvider, CloudSettings, CloudVm, CreateRequest
from tests.conftest import UnixApi, make_config, test_runtime, wait_for
from tests.fakes.sshd import Sshd, available
from tests.integration.test_daemon_e2e import finished, jsonl, results
from tests.procs import bundle

needs_sshd = pytest.mark.skipif(available() is not None, reason="needs a real sshd")


def ssh_settings(sshd: Sshd) -> dict[str, Any]:
    """The provider-config keys that point every VM's SSH at the local sshd, as root."""
    return {"ssh_user": "root", "ssh_key_file": str(sshd.client_key),
            "ssh_address_override": f"127.0.0.1:{sshd.port}"}


@dataclass
class CloudRun:
    daemon: Daemon
    api: UnixApi
    sshd: Sshd

    async def job(self, expression: str, n: int, *, timeout: float = 120) -> dict[str, dict[str, Any]]:
        """Run `n` tasks of a python-mode worker returning `expression` of d (= {"n": i}); its results."""
        worker = {"cloudtask.yaml": "mode: python\nfunction: w:run\n",
                  "w.py": f"def run(i, d):\n    return {expression}\n"}
        _, w = await self.api.request("POST", "/v1/workers", data=bundle(worker))
        _, job = await self.api.request("POST", "/v1/jobs", json={"worker": w["digest"]})
        await self.api.request("POST", f"/v1/jobs/{job['id']}/tasks",
                               data=jsonl([{"id": i, "data": {"n": i}} for i in range(n)]).encode())
        await wait_for(lambda: finished(self.api, job["id"]), timeout=timeout, message="the job finished")
        return await results(self.api, job["id"])

    async def instance_rows(self, provider: str) -> list[Any]:
        return list(await self.daemon.store.fetchall(
            "SELECT id, host_key, offer, state, last_error FROM instances WHERE provider = ? ORDER BY created_at",
            (provider,)))

    async def until(self, check: Callable[[], Awaitable[bool]], message: str, timeout: float = 60) -> None:
        await wait_for(check, timeout=timeout, message=message)


@asynccontextmanager
async def cloud_daemon(tmp_path: Path, name: str, provider: CloudProviderConfig,
                       sshd: Sshd | None = None) -> AsyncIterator[CloudRun]:
    """A daemon whose only provider is `name` (its config given with ssh_settings(sshd) applied)."""
    sshd = sshd or Sshd(tmp_path / "sshd")
    if sshd.proc is None:
        sshd.start()
    cfg = replace(provider, **ssh_settings(sshd))
    providers = replace(ProvidersConfig(local=LocalProviderConfig(enabled=False)), **{name: cfg})
    config = replace(make_config(tmp_path, idle_timeout_s=0.5), providers=providers)
    daemon = Daemon(config, shutdown_grace_s=5)
    await daemon.start()
    api = UnixApi(config.socket_path)
    try:
        yield CloudRun(daemon, api, sshd)
    finally:
        await api.close()
        await daemon.stop()
        sshd.stop()


async def reconcile_after_crash(driver: CloudDriver, name: str, machine_type: str, zone: str,
                                known: CreateRequest, orphan: CreateRequest, tmp_path: Path) -> CloudVm:
    """Create `known` and `orphan`, record only `known` (as if the daemon died between launching
    `orphan` and recording it), run one reconcile, and check that only `known` is listed still.
    Returns the orphan's VM as created, for the cloud-specific checks."""
    from cloudtaskd.config import Config
    from cloudtaskd.core.dispatch import Dispatcher
    from cloudtaskd.core.store import Store
    from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
    from cloudtaskd.fleet.pins import InstancePins

    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        provider = CloudProvider(driver, CloudSettings(machine_type, zone, False, 2, "ubuntu", key), "daemon1",
                                 tmp_path, InstancePins(store), test_runtime())
        config = Config(state_dir=str(tmp_path))
        vm = await driver.create(known)
        orphan_vm = await driver.create(orphan)
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, cloud_id, created_at,"
            " state_changed_at) VALUES (?, ?, NULL, 'running', 2, 'x', ?, 0, ?)",
            (known.instance_id, name, vm.cloud_id, tx.now)))
        dispatcher = Dispatcher(store, config)
        reconciler = Reconciler(store=store, dispatcher=dispatcher, providers=[(provider, 5)], config=config,
                                agent_url="ws://x", metrics=dispatcher.metrics,
                                sessions=dispatcher.sessions)
        await reconciler.sync(now=1e9)
        assert {v.instance_id for v in await driver.list()} == {known.instance_id}
        return orphan_vm
    finally:
        await store.close()
