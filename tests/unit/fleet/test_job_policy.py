"""What a job allows: validated when it is created, honoured when the daemon buys instances."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.fleet.orchestrator.selection import Policy, combine
from tests.conftest import wait_for
from tests.integration.test_daemon_e2e import daemon, finished, jsonl, submit  # noqa: F401 - daemon is a fixture

WORKER = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(i, d):\n    return d\n"}


def test_jobs_sharing_a_pool_get_what_all_of_them_allow() -> None:
    a = Policy(providers=("aws", "gcp"), regions=(), spot=True, on_demand=True, max_price_per_hour=0.5)
    b = Policy(providers=("gcp", "azure"), regions=("us-central1",), spot=True, on_demand=False,
               max_price_per_hour=0.2)
    assert combine([a, b]) == Policy(("gcp",), ("us-central1",), True, False, 0.2)
    assert combine([]) == Policy()
    nothing = combine([Policy(providers=("aws",)), Policy(providers=("gcp",))])
    assert not nothing.spot and not nothing.on_demand  # no provider in common: nothing may be bought
    assert Policy.from_dict(b.to_dict()) == b


@pytest.mark.parametrize(("policy", "field"), [
    ("aws", "policy"),
    ({"providers": "aws"}, "policy.providers"),
    ({"regions": [""]}, "policy.regions"),
    ({"spot": "no"}, "policy.spot"),
    ({"max_price_per_hour": -1}, "policy.max_price_per_hour"),
    ({"zone": "x"}, "policy.zone"),
])
async def test_a_bad_policy_is_refused_naming_the_field(daemon: Any, policy: Any, field: str) -> None:  # noqa: F811
    _, api = daemon
    with pytest.raises(AssertionError) as info:
        await submit(api, WORKER, jsonl([{"id": 1, "data": 1}]), policy=policy)
    assert f"'field': '{field}'" in str(info.value)
    _, jobs = await api.request("GET", "/v1/jobs")
    assert jobs["jobs"] == []  # nothing was created


async def test_the_daemon_buys_only_what_the_job_allows(daemon: Any) -> None:  # noqa: F811
    """A job that allows only aws (not configured here) gets no instance; one that allows local runs."""
    d, api = daemon
    held = await submit(api, WORKER, jsonl([{"id": i, "data": i} for i in range(3)]),
                        policy={"providers": ["aws"], "spot": False})
    _, job = await api.request("GET", f"/v1/jobs/{held}")
    assert job["policy"]["providers"] == ["aws"] and job["policy"]["spot"] is False
    for _ in range(10):  # ten ticks of the reconciler: nothing it may buy
        await asyncio.sleep(d.config.scaling.tick_s)
    rows = await d.store.fetchall("SELECT id FROM instances")
    assert rows == []
    # A second job of another worker, allowed the local host, runs to the end meanwhile.
    other = {**WORKER, "w.py": "def run(i, d):\n    return -d\n"}
    ok = await submit(api, other, jsonl([{"id": i, "data": i} for i in range(3)]), policy={"providers": ["local"]})
    await wait_for(lambda: finished(api, ok), timeout=60, message="the allowed job finished")
    _, job = await api.request("GET", f"/v1/jobs/{held}")
    assert job["counts"]["queued"] == 3  # still waiting for what it allows


def test_cli_flags_make_the_policy(tmp_path: Path) -> None:
    from cloudtaskd.ctl.main import _parse
    from cloudtaskd.ctl.run import job_policy

    args = _parse(["submit", "--tasks", "t.json", "--worker", "w", "--providers", "aws, gcp", "--regions", "us-east-1",
                   "--no-on-demand-fallback", "--max-price-per-hour", "0.25"])
    assert job_policy(args) == {"providers": ["aws", "gcp"], "regions": ["us-east-1"], "on_demand_fallback": False,
                                "max_price_per_hour": 0.25}
    assert job_policy(_parse(["submit", "--tasks", "t.json", "--worker", "w"])) is None
    with pytest.raises(SystemExit):
        _parse(["submit", "--tasks", "t.json", "--worker", "w", "--no-spot", "--no-on-demand-fallback"])
