"""What runs on an instance, measured on a foreign host (tests/fakes/foreign_host.py: Debian 11, python3
3.9, its own network namespace): how long a bootstrap takes, and what the SSH tunnel costs.

    python benchmarks/foreign_host.py [--tasks 20000] [--rounds 2] [--slots 8]   (as root)

1. Bootstrap, from SSH ready to the agent connected (the daemon sees its hello): the first time on a
   fresh host (the runtime uploaded and unpacked; the control host's runtime cache warm), and again
   (another instance on the same host: the runtime is there).
2. Dispatch of no-op tasks (python mode) to one agent on the foreign host, through the tunnel
   (default) and dialling the daemon directly (agents.public_url on the veth), interleaved: tasks/s
   and the daemon's CPU per 1,000 tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import DaemonProcess, bundle, cpu_seconds

from cloudtaskd.config import AgentsConfig, LocalProviderConfig, ProvidersConfig
from cloudtaskd.daemon import Daemon
from cloudtaskd.fleet.bootstrap import BootstrapLog, BootstrapSpec, SshTarget, connect, install
from cloudtaskd.fleet.providers.base import LaunchSpec
from tests.conftest import UnixApi, make_config, test_runtime, wait_for
from tests.fakes import foreign_host as fh
from tests.procs import free_port

NOOP = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}


async def bootstrap_times(host: fh.ForeignHost, tmp: Path) -> list[float]:
    """Seconds from SSH ready to the agent connected, for two instances in a row on one host."""
    config = replace(make_config(tmp), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)),
                     agents=AgentsConfig(listen_host=host.net.host_ip))
    daemon = Daemon(config, shutdown_grace_s=1)
    await daemon.start()
    api = UnixApi(config.socket_path)
    runtime = test_runtime()
    out = []
    try:
        path = tmp / "w.tar.gz"
        path.write_bytes(bundle(NOOP))
        _, worker = await api.request("POST", "/v1/workers", data=path.read_bytes())
        for _ in range(2):
            _, inst = await api.request("POST", "/v1/instances", json={"worker": worker["digest"], "slots": 1})
            target = SshTarget(host.address, 22, "root", host.client_key, host.public_host_key())
            conn, _ = await connect(target, instance=inst["id"])
            started = time.monotonic()
            launch = LaunchSpec(inst["id"], 0, tmp, inst["url"], inst["token"], 1)
            await install(conn, launch, lambda url, inst=inst: BootstrapSpec(
                inst["id"], url, inst["token"], 1, path, worker["spec"], ca_cert=inst["ca_cert"].encode()),
                BootstrapLog(tmp / f"{inst['id']}.log"), runtime, None, connect_unused)

            async def connected(i: str = inst["id"]) -> bool:
                return i in daemon.dispatcher.sessions
            await wait_for(connected, timeout=60, interval=0.01, message="agent connected")
            out.append(time.monotonic() - started)
    finally:
        await api.close()
        await daemon.stop()
    return out


async def connect_unused() -> Any:
    raise AssertionError("no tunnel here")


async def dispatch(host: fh.ForeignHost, *, direct: bool, tasks: int, slots: int) -> tuple[float, float]:
    """(tasks/s, daemon CPU seconds per 1,000 tasks) for one job on the foreign host's agent."""
    agents: dict[str, Any] = {"lease_ttl_s": 60}
    if direct:
        port = free_port()
        agents.update(listen_host=host.net.host_ip, listen_port=port,
                      public_url=f"wss://{host.net.host_ip}:{port}/v1/agent")
    daemon = DaemonProcess({
        "agents": agents, "scaling": {"tick_s": 0.2, "idle_timeout_s": 600},
        "providers": {"local": {"enabled": False},
                      "ssh": {"hosts": [{"address": host.address, "user": "root", "key_file": str(host.client_key),
                                         "cpus": slots, "host_key": host.public_host_key()}]}},
    })
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle(NOOP))
        job = await daemon.post("/v1/jobs", json={"worker": worker["digest"]})
        # A first task brings the instance up; the measured stretch starts once it is connected.
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=b'{"id": "warm"}\n')

        async def warm() -> bool:
            return bool((await daemon.get(f"/v1/jobs/{job['id']}"))["counts"]["succeeded"] == 1)
        await wait_for(warm, timeout=120, message="the instance up")
        body = "".join(json.dumps({"id": i}) + "\n" for i in range(tasks)).encode()
        assert daemon.proc is not None
        cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=body)

        async def done() -> bool:
            return bool((await daemon.get(f"/v1/jobs/{job['id']}"))["counts"]["succeeded"] == tasks + 1)
        await wait_for(done, timeout=600, interval=0.05, message="all done")
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(daemon.proc.pid) - cpu0
    finally:
        await daemon.stop()
    return tasks / elapsed, cpu / tasks * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()
    why = fh.unavailable()
    if why is not None:
        sys.exit(f"no foreign host here: {why}")
    with tempfile.TemporaryDirectory(prefix="cloudtask-bench-") as d, fh.foreign_host(Path(d) / "vm") as host:
        print(f"foreign host: Debian 11, python3 {host.python_version()}, {host.address} in {host.net.name}")
        first, again = await bootstrap_times(host, Path(d))
        print(f"bootstrap, SSH ready -> agent connected: first {first:.2f} s, again {again:.2f} s")
    rows: dict[str, list[tuple[float, float]]] = {"tunnel": [], "direct": []}
    for _ in range(args.rounds):
        for mode in ("tunnel", "direct"):
            with tempfile.TemporaryDirectory(prefix="cloudtask-bench-") as d, fh.foreign_host(Path(d) / "vm") as host:
                rate, cpu = await dispatch(host, direct=mode == "direct", tasks=args.tasks, slots=args.slots)
            rows[mode].append((rate, cpu))
            print(f"{mode:6s}: {rate:8.0f} tasks/s, daemon CPU {cpu * 1000:.1f} ms per 1,000 tasks", flush=True)
    for mode, vals in rows.items():
        rates = sorted(r for r, _ in vals)
        cpus = sorted(c for _, c in vals)
        print(f"{mode:6s} over {len(vals)} runs: {rates[0]:.0f}-{rates[-1]:.0f} tasks/s, "
              f"daemon CPU {cpus[0] * 1000:.1f}-{cpus[-1] * 1000:.1f} ms per 1,000 tasks")


if __name__ == "__main__":
    asyncio.run(main())
