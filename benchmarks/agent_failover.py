"""How long agents take to move to another daemon when theirs dies (agents.urls, issue 17).

    python benchmarks/agent_failover.py [--agents 4] [--kills 5] [--slots 8]

A real cloudtaskd process on port A with `agents.urls: [A, B]`, and real agent processes given
both URLs (`--url A --url B`, TLS on) working through a job. Then, `--kills` times: SIGKILL the
daemon, and start it at once on the other port over the same state directory (SQLite allows one
daemon at a time: PostgreSQL replicas, already running, come later). Prints per kill:

- restart: SIGKILL to the new daemon answering its health check (the daemon's own start);
- move: SIGKILL to each agent's `agent_connected` on the new daemon (from the agents' logs), p50/max;
- after ready: the part of the move after the new daemon was up (what the agents' retry backoff adds).

Then the case of replicas already running, which SQLite cannot hold (one daemon a state directory):
a stand-in replica (a websocket server on the other port with the daemon's certificate, answering
each hello with a welcome that keeps every lease listed) is up before the daemon is SIGKILLed, and
then the stand-ins take turns (one is started, the other closed). Prints each agent's time from the
kill (or close) to its hello arriving at the replica that is up.

At the end the job must finish with each task's one result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, DaemonProcess, bundle, percentile
from aiohttp import WSMsgType, web

from cloudtask_wire.messages import Hello, Welcome, encode, parse_agent_message
from tests.procs import free_port

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(0.05)\n    return data['n']\n",
}


def config(port: int, urls: list[str]) -> dict[str, Any]:
    return {"agents": {"listen_port": port, "lease_ttl_s": 60, "urls": urls},
            "providers": {"local": {"enabled": False}}, "scaling": {"tick_s": 0.5}}


def connected_at(log: Path, url: str, after: float) -> float | None:
    """The first agent_connected to url logged after `after` (wall clock, the agent's ts)."""
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "agent_connected" and e.get("url") == url and e["ts"] >= after:
            return float(e["ts"])
    return None


async def connected_agents(daemon: DaemonProcess) -> int:
    m = re.search(r"^cloudtask_agents_connected (\S+)$", await daemon.get("/metrics"), re.M)
    return int(float(m.group(1))) if m else 0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()

    ports = [free_port(), free_port()]
    urls = [f"wss://127.0.0.1:{p}/v1/agent" for p in ports]
    daemon = DaemonProcess(config(ports[0], urls))
    await daemon.start()
    agents: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    n_tasks = 100_000  # more than the run gets through: the agents are busy at every kill
    rows = []
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "failover", "worker": worker["digest"]})
        body = "".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(n_tasks)).encode()
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=body)
        for k in range(args.agents):
            inst = await daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": args.slots})
            d = daemon.workdir / f"agent{k}"
            d.mkdir()
            (d / "ca.pem").write_text(inst["ca_cert"])
            logs.append(d / "agent.log")
            with logs[-1].open("wb") as out:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.main", *(a for u in inst["urls"] for a in ("--url", u)),
                     "--instance", inst["id"], "--worker-dir", str(daemon.state_dir / "workers" / worker["digest"]),
                     "--slots", str(args.slots), "--ca-file", str(d / "ca.pem")],
                    stdout=out, stderr=subprocess.STDOUT, cwd=d, stdin=subprocess.DEVNULL,
                    env={**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT)}))
        await _until(lambda: _all_connected(daemon, args.agents), 60)
        current = 0
        for kill in range(1, args.kills + 1):
            await asyncio.sleep(2.0)  # working: leases in flight
            nxt = 1 - current
            daemon.config_path.write_text(yaml.safe_dump({"state_dir": str(daemon.state_dir), "log_level": "warning",
                                                          **config(ports[nxt], urls)}))
            t_kill = time.time()
            daemon.kill()
            await daemon.start()
            t_ready = time.time()
            await _until(lambda: _all_connected(daemon, args.agents), 60)
            moved = [connected_at(log, urls[nxt], t_kill) for log in logs]
            move_s = [m - t_kill for m in moved if m is not None]
            rows.append((kill, t_ready - t_kill, move_s, [m - (t_ready - t_kill) for m in move_s]))
            current = nxt
        j = await daemon.get(f"/v1/jobs/{job['id']}")
        succeeded = j["counts"]["succeeded"]
        up_rows = await replicas_up(daemon, ports, current, args.agents, args.kills)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
        await daemon.stop()

    print(f"agents: {args.agents} x {args.slots} slots, TLS, SQLite; {args.kills} kills; "
          f"{succeeded} tasks done meanwhile")
    print(f"{'kill':>4} {'restart s':>10} {'move p50 s':>11} {'move max s':>11} {'after ready max s':>18}")
    for kill, restart, move, after in rows:
        print(f"{kill:>4} {restart:>10.2f} {percentile(move, 50):>11.2f} {max(move):>11.2f} {max(after):>18.2f}")
    print("with the other replica already up (stand-in replicas; the first row: the real daemon SIGKILLed)")
    for i, hellos in enumerate(up_rows, start=1):
        print(f"{i:>4} {'-':>10} {percentile(hellos, 50):>11.2f} {max(hellos):>11.2f}")
    up_all = [h for hellos in up_rows for h in hellos]
    print(f"replica up: move p50 {percentile(up_all, 50):.2f} s, max {max(up_all):.2f} s")
    every = [m for _, _, move, _ in rows for m in move]
    after_all = [a for _, _, _, after in rows for a in after]
    print(f"all: restart median {statistics.median(r for _, r, _, _ in rows):.2f} s; move p50 "
          f"{percentile(every, 50):.2f} s, max {max(every):.2f} s; after ready p50 {percentile(after_all, 50):.2f} s, "
          f"max {max(after_all):.2f} s")


class StandIn:
    """A replica that is up: answers each hello with a welcome keeping every lease listed, and
    records when each agent's hello arrived."""

    def __init__(self, port: int, tls_dir: Path) -> None:
        self.port = port
        self.hellos: dict[str, float] = {}
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
        self.runner: web.AppRunner | None = None
        self.transports: list[asyncio.BaseTransport] = []

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.transport is not None:
            self.transports.append(request.transport)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            parsed = parse_agent_message(msg.data)
            if isinstance(parsed, Hello):
                self.hellos.setdefault(parsed.instance, time.time())
                await ws.send_str(encode(Welcome(60.0, 15.0, [tid for tid, _ in parsed.held], [])))
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/agent", self.handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ctx, reuse_address=True).start()

    def kill(self) -> None:
        """Its connections cut as a SIGKILL cuts them (the kernel closes the sockets at once), not
        closed with a websocket handshake."""
        for transport in self.transports:
            transport.abort()

    async def stop(self) -> None:
        self.kill()
        if self.runner is not None:
            await self.runner.cleanup()


async def replicas_up(daemon: DaemonProcess, ports: list[int], current: int, n_agents: int,
                      rounds: int) -> list[list[float]]:
    """Each agent's move time (s) with the replica it moves to already up: first from the real
    daemon (SIGKILL), then between stand-ins."""
    out = []
    up = StandIn(ports[1 - current], daemon.state_dir / "tls")
    await up.start()
    t0 = time.time()
    daemon.kill()
    down: StandIn | None = None
    try:
        for r in range(rounds):
            await _until(partial(_hellos, up, n_agents), 60)
            out.append([t - t0 for t in up.hellos.values()])
            if r == rounds - 1:
                break
            if down is not None:
                await down.stop()
            down, up = up, StandIn(ports[ports.index(up.port) ^ 1], daemon.state_dir / "tls")
            await up.start()
            await asyncio.sleep(1.0)  # settled on the old one: its backoff reset
            t0 = time.time()
            down.kill()
    finally:
        await up.stop()
        if down is not None:
            await down.stop()
    return out


async def _hellos(standin: StandIn, n: int) -> bool:
    return len(standin.hellos) == n


async def _all_connected(daemon: DaemonProcess, n: int) -> bool:
    return await connected_agents(daemon) == n


async def _until(check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s")
        await asyncio.sleep(0.02)


if __name__ == "__main__":
    asyncio.run(main())
