"""Spot interruptions end to end: a real daemon, real agent processes (the local provider) watching
each cloud's interruption notice on a metadata stand-in of their own, real SQLite.

What must hold: the agent hands back what it cannot finish before the cloud's deadline, the daemon
requeues it without counting an attempt, records the interruption against the offer and starts
replacement capacity at once; a rebalance recommendation replaces the instance before it is lost;
an instance taken before it could hand anything back loses no attempt either.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.providers.local import LocalProvider
from tests.conftest import UnixApi, make_config, wait_for
from tests.fakes.metadata_standin import MetadataFleet, iso_z, rfc1123
from tests.integration.test_daemon_e2e import finished, jsonl, submit

# Tasks hold until the test removes their flag file: what runs where, and when, is the test's to say.
HOLD_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\ncpus_per_task: 1\n",
    "work.py": (
        "import asyncio, os\n"
        "async def run(task_id, data):\n"
        "    while os.path.exists(data['flag']):\n"
        "        await asyncio.sleep(0.05)\n"
        "    return {'n': data['n']}\n"
    ),
}


async def start(tmp_path: Path, fleet: MetadataFleet, **scaling: Any) -> tuple[Daemon, UnixApi]:
    local = LocalProviderConfig(max_instances=3, cpus=2, interruption_source=fleet.cloud,
                                metadata_url=fleet.url + "/{instance}")
    config = make_config(tmp_path, providers=ProvidersConfig(local=local))
    daemon = Daemon(config, shutdown_grace_s=5)
    await daemon.start()
    return daemon, UnixApi(config.socket_path)


@pytest.fixture(params=["aws", "gcp", "azure"])
async def fleet(request: pytest.FixtureRequest) -> AsyncIterator[MetadataFleet]:
    async with MetadataFleet(request.param).serve() as f:
        yield f


async def busiest(daemon: Daemon, n: int) -> str:
    """The instance holding n leases, once its agent has them."""
    async def check() -> str | None:
        row = await daemon.store.fetchone(
            "SELECT instance_id, count(*) AS n FROM tasks WHERE state = 'leased' GROUP BY instance_id"
            " ORDER BY n DESC LIMIT 1")
        return row["instance_id"] if row is not None and row["n"] >= n else None
    found: str = await wait_for(check, message=f"an instance holding {n} leases")
    return found


async def watched(fleet: MetadataFleet, instance: str) -> None:
    """Its agent's watcher has read the metadata service (a notice set now is one it will see)."""
    standin = await fleet.get(instance)

    async def polled() -> bool:
        return sum(standin.requests.values()) - sum(standin.refused.values()) >= 2
    await wait_for(polled, message="the agent's watcher polling its metadata stand-in")


def notify(fleet: MetadataFleet, standin: Any, seconds: float) -> None:
    when = datetime.now(UTC) + timedelta(seconds=seconds)
    if fleet.cloud == "aws":
        standin.aws_interrupt("terminate", iso_z(when))
    elif fleet.cloud == "gcp":
        standin.gcp_preempt()  # GCP gives no time: about 30 s
    else:
        standin.azure_event("Preempt", not_before=rfc1123(when))


async def test_an_interrupted_instance_hands_back_and_is_replaced_without_counting_attempts(
        tmp_path: Path, fleet: MetadataFleet) -> None:
    flag = tmp_path / "hold"
    flag.write_text("")
    daemon, api = await start(tmp_path, fleet)
    try:
        job = await submit(api, HOLD_WORKER, jsonl([{"id": f"t{i}", "data": {"n": i, "flag": str(flag)}}
                                                     for i in range(4)]))
        victim = await busiest(daemon, 4)  # 2 running, 2 held ready (prefetch)
        await watched(fleet, victim)
        noticed_at = time.time()
        # AWS and Azure: 12 s of notice, so the 10 s margin leaves 2 s: what runs is handed back.
        # GCP: its usual 30 s, 20 s of grace: the running tasks finish there once the flag goes.
        notify(fleet, await fleet.get(victim), 12)

        async def recorded() -> Any:
            return await daemon.store.fetchone("SELECT * FROM interruptions WHERE instance_id = ?", (victim,))
        row = await wait_for(recorded, message="the interruption recorded")
        assert (row["kind"], row["source"]) == ("interruption", fleet.cloud)
        assert row["offer_key"] == "local/localhost/local/on-demand"
        if fleet.cloud != "gcp":
            assert row["deadline"] == pytest.approx(noticed_at + 12, abs=2)

        async def handed_back(n: int) -> bool:
            got = await daemon.store.fetchone(
                "SELECT count(*) AS n FROM events WHERE kind = 'lease_handed_back' AND instance_id = ?", (victim,))
            return got is not None and got["n"] >= n
        # The two not started go back at once; the two running ones at the end of the grace (AWS, Azure).
        await wait_for(lambda: handed_back(2), message="the not-started tasks handed back")
        if fleet.cloud == "gcp":
            flag.unlink()  # within the grace: they finish where they are
        else:
            await wait_for(lambda: handed_back(4), message="the running tasks handed back before the deadline")

        async def replaced() -> Any:
            return await daemon.store.fetchone(
                "SELECT id FROM instances WHERE id != ? AND created_at >= ? AND state IN ('starting', 'running')",
                (victim, row["noticed_at"]))
        await wait_for(replaced, message="replacement capacity started")
        flag.unlink(missing_ok=True)
        assert await wait_for(lambda: finished(api, job), timeout=60, message="the job to finish")

        tasks = await daemon.store.fetchall("SELECT key, state, failures, instance_id FROM tasks WHERE job_id = ?",
                                            (job,))
        assert [t["state"] for t in tasks] == ["succeeded"] * 4
        assert [t["failures"] for t in tasks] == [0] * 4  # an interruption is never a failed attempt
        ran_on_victim = sorted(t["key"] for t in tasks if t["instance_id"] == victim)
        assert len(ran_on_victim) == (2 if fleet.cloud == "gcp" else 0)

        async def victim_stopped() -> bool:
            got = await daemon.store.fetchone("SELECT state FROM instances WHERE id = ?", (victim,))
            return got is not None and got["state"] == "stopped"
        await wait_for(victim_stopped, message="the interrupted instance stopped")
        status, report = await api.request("GET", "/v1/interruptions")
        assert status == 200
        assert [(o["offer"], o["interruptions"]) for o in report["offers"]] == [("local/localhost/local/on-demand", 1)]
        assert report["recent"][0]["instance_id"] == victim
    finally:
        flag.unlink(missing_ok=True)
        await api.close()
        await daemon.stop()


@pytest.mark.parametrize("cloud", ["aws"])
async def test_a_rebalance_recommendation_replaces_the_instance_before_it_is_lost(
        tmp_path: Path, cloud: str) -> None:
    flag = tmp_path / "hold"
    flag.write_text("")
    async with MetadataFleet(cloud).serve() as fleet:
        daemon, api = await start(tmp_path, fleet)
        try:
            job = await submit(api, HOLD_WORKER, jsonl([{"id": f"t{i}", "data": {"n": i, "flag": str(flag)}}
                                                         for i in range(4)]))
            risky = await busiest(daemon, 4)
            await watched(fleet, risky)
            (await fleet.get(risky)).aws_rebalance()

            async def at_risk() -> bool:
                got = await daemon.store.fetchone("SELECT at_risk_since, state FROM instances WHERE id = ?", (risky,))
                return got is not None and got["at_risk_since"] is not None
            await wait_for(at_risk, message="the rebalance recorded")
            state = await daemon.store.fetchone("SELECT state FROM instances WHERE id = ?", (risky,))
            assert state is not None and state["state"] == "running"  # it keeps working meanwhile

            async def drained_after_replacement() -> bool:
                rows = await daemon.store.fetchall("SELECT id, state, started_at, state_changed_at FROM instances")
                mine = next(r for r in rows if r["id"] == risky)
                others = [r for r in rows if r["id"] != risky and r["started_at"] is not None]
                return mine["state"] != "running" and any(o["started_at"] <= mine["state_changed_at"] for o in others)
            await wait_for(drained_after_replacement, message="the at-risk instance drained once a replacement ran")
            flag.unlink()
            assert await wait_for(lambda: finished(api, job), timeout=60, message="the job to finish")
            tasks = await daemon.store.fetchall("SELECT state, failures FROM tasks WHERE job_id = ?", (job,))
            assert [(t["state"], t["failures"]) for t in tasks] == [("succeeded", 0)] * 4
        finally:
            flag.unlink(missing_ok=True)
            await api.close()
            await daemon.stop()


async def test_an_instance_taken_before_it_hands_back_loses_no_attempt(tmp_path: Path) -> None:
    """The cloud can be faster than the agent: the notice arrives, then the machine is gone with its
    leases still on record. They are requeued uncounted when the instance is seen gone."""
    flag = tmp_path / "hold"
    flag.write_text("")
    async with MetadataFleet("aws").serve() as fleet:
        daemon, api = await start(tmp_path, fleet)
        try:
            job = await submit(api, HOLD_WORKER, jsonl([{"id": f"t{i}", "data": {"n": i, "flag": str(flag)}}
                                                         for i in range(4)]))
            victim = await busiest(daemon, 4)
            await watched(fleet, victim)
            # Two minutes of notice: the agent holds on to its running tasks ...
            (await fleet.get(victim)).aws_interrupt("terminate", iso_z(datetime.now(UTC) + timedelta(minutes=2)))

            async def recorded() -> Any:
                return await daemon.store.fetchone("SELECT 1 FROM interruptions WHERE instance_id = ?", (victim,))
            await wait_for(recorded, message="the interruption recorded")
            # ... and the machine vanishes long before its 30 s leases would expire.
            local = next(p for p, _ in daemon.providers if isinstance(p, LocalProvider))
            pid = local._alive(victim)
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)

            async def requeued() -> bool:
                rows = await daemon.store.fetchall("SELECT state, instance_id FROM tasks WHERE job_id = ?", (job,))
                return all(r["instance_id"] != victim or r["state"] != "leased" for r in rows)
            await wait_for(requeued, timeout=15, message="the vanished instance's leases requeued")
            flag.unlink()
            assert await wait_for(lambda: finished(api, job), timeout=60, message="the job to finish")
            tasks = await daemon.store.fetchall("SELECT state, failures FROM tasks WHERE job_id = ?", (job,))
            assert [(t["state"], t["failures"]) for t in tasks] == [("succeeded", 0)] * 4
        finally:
            flag.unlink(missing_ok=True)
            await api.close()
            await daemon.stop()
