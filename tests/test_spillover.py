"""Spill-over on the emulator: the cheapest offer has no capacity, the next-best takes the work."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.moto_ec2 import MotoEc2, PricingStandin
from tests.test_aws import REGION, console_with_keys, creds  # noqa: F401 - creds is a fixture

pytestmark = pytest.mark.skipif(__import__("tests.sshd", fromlist=["x"]).available() is not None,
                                reason="needs a real sshd")


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoEc2]:
    server = MotoEc2()
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(300)  # a VM bootstrap installs aiohttp into a fresh virtualenv
async def test_a_stocked_out_zone_spills_to_the_next_best(moto: MotoEc2, creds: None, tmp_path: Path) -> None:  # noqa: F811
    from cloudtaskd.config import AwsProviderConfig, LocalProviderConfig, ProvidersConfig
    from cloudtaskd.daemon import Daemon
    from cloudtaskd.providers.aws import AwsDriver
    from tests.conftest import UnixApi, make_config, wait_for
    from tests.procs import bundle
    from tests.sshd import Sshd
    from tests.test_daemon_e2e import finished, jsonl, results

    moto.reset()
    # us-east-1a is the cheapest spot slot-hour, but it is out of capacity.
    moto.spot_prices = [("c5.large", "us-east-1a", 0.020, "2026-11-23T09:00:00.000Z"),
                        ("c5.large", "us-east-1b", 0.031, "2026-11-23T09:00:00.000Z")]

    def stock_out(action: str, params: dict[str, list[str]]) -> tuple[str, int, str] | None:
        if action == "RunInstances" and params.get("Placement.AvailabilityZone") == ["us-east-1a"]:
            return ("InsufficientInstanceCapacity", 500, "There is no Spot capacity available in us-east-1a")
        return None

    moto.fail_if = stock_out
    pricing = PricingStandin()
    await pricing.start()
    pricing.prices = {("c5.large", REGION): 0.085}
    sshd = Sshd(tmp_path / "sshd")
    sshd.start()
    moto.console = console_with_keys(sshd.public_host_key())
    probe = AwsDriver(REGION, "x", endpoint_url=moto.url, max_attempts=1)
    image = (await (await probe._client()).describe_images())["Images"][0]["ImageId"]
    await probe.close()
    aws = AwsProviderConfig(enabled=True, max_instances=1, machine_type="c5.large", zone="us-east-1a",
                            zones=("us-east-1b",), cpus=2, spot=True, on_demand_fallback=False, image=image,
                            endpoint_url=moto.url, pricing_endpoint_url=pricing.url, ssh_user="root",
                            ssh_key_file=str(sshd.client_key), ssh_address_override=f"127.0.0.1:{sshd.port}")
    config = replace(make_config(tmp_path, idle_timeout_s=0.5),
                     providers=ProvidersConfig(local=LocalProviderConfig(enabled=False), aws=aws))
    daemon = Daemon(config, shutdown_grace_s=5)
    await daemon.start()
    api = UnixApi(config.socket_path)
    worker = {"cloudtask.yaml": "mode: python\nfunction: w:run\n", "w.py": "def run(i, d):\n    return d['n'] - 1\n"}
    try:
        refreshed = await daemon.market.refresh()
        assert [r.error for r in refreshed] == [None]
        _, w = await api.request("POST", "/v1/workers", data=bundle(worker))
        _, job = await api.request("POST", "/v1/jobs", json={"worker": w["digest"]})
        await api.request("POST", f"/v1/jobs/{job['id']}/tasks",
                          data=jsonl([{"id": i, "data": {"n": i}} for i in range(10)]).encode())
        await wait_for(lambda: finished(api, job["id"]), timeout=120, message="job done after the spill-over")
        res = await results(api, job["id"])
        assert sorted(r["result"] for r in res.values()) == [i - 1 for i in range(10)]
        zones = [p.get("Placement.AvailabilityZone", [""])[0] for a, p in moto.params if a == "RunInstances"]
        assert zones[0] == "us-east-1a" and zones[-1] == "us-east-1b"  # tried the cheapest, then spilled
        rows = await daemon.store.fetchall("SELECT state, offer, last_error FROM instances ORDER BY created_at")
        failed = [r for r in rows if r["last_error"] and "InsufficientInstanceCapacity" in r["last_error"]]
        assert failed and all('"us-east-1a"' in r["offer"] for r in failed)
        served = {r["instance"] for r in res.values()}
        offers = {r["id"]: r["offer"] for r in await daemon.store.fetchall("SELECT id, offer FROM instances")}
        assert all('"zone": "us-east-1b"' in offers[i] for i in served)
    finally:
        await api.close()
        await daemon.stop()
        sshd.stop()
        await pricing.stop()
