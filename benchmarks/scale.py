"""A large fleet against one daemon: thousands of agents connected at once, a million tasks queued.

    python benchmarks/scale.py [--agents 2000] [--tasks 1000000] [--procs 4] [--slots 4]
                               [--task-ms 0] [--jobs 1000] [--tasks-per-job 100]

A real cloudtaskd process (TLS on the agent channel, WAL, synchronous=FULL). The agents are simulated,
several hundred per process, but each speaks the real protocol over its own TLS websocket: hello with
its own instance token, credit, grants, `done` reports kept until acked, heartbeats for what it holds.
A simulated task takes --task-ms +-50 % (0: done as soon as it is granted, the daemon's worst case),
at most --slots at once per agent, the rest prefetched.

--tasks tasks are queued in one job before the agents connect. Then, each measured for --duration s:
Phase 1: simulated tasks take --task-ms (a busy fleet, not a saturated daemon): tasks/s, lease round
  trip p50/p99 (credit sent -> the grant that covers it, as the real agent measures it), daemon CPU.
Phase 2: tasks end as soon as they are granted: the most the daemon can dispatch to this fleet. In a
  closed loop the round trip is then mostly queueing (agents x credit / throughput, Little's law).
Phase 3: the big job is cancelled and --jobs jobs are submitted at once (each its own upload of
  --tasks-per-job tasks): how long until all were leased out, and the longest gap with no grant
  anywhere while work was queued.
Also printed: the daemon's RSS with every agent connected and at its peak, and errors of any kind
(a refused report, a revoke, a dropped connection, an error line in the daemon's log).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
from _common import ROOT, DaemonProcess, bundle, cpu_seconds, peak_rss_mb, percentile

from cloudtask_wire import jsonx
from cloudtask_wire.messages import CREDIT_IN_REPORT, FEATURES, Hello, encode

WORKER = {"cloudtask.yaml": "mode: python\nfunction: noop:run\n", "noop.py": "async def run(i, d):\n    return None\n"}
CONNECT_CONCURRENCY = 100  # per simulator process: the daemon admits 1024 unauthenticated at once


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the simulated agents (one simulator process runs many) ---------------------------------------


class SimAgent:
    """One agent: the real wire protocol, no worker. Reports are kept until acked, like the real one."""

    def __init__(self, inst: dict[str, Any], sim: Simulator) -> None:
        self.inst = inst
        self.sim = sim
        self.held: dict[int, int] = {}  # task id -> token
        self.ready: deque[int] = deque()  # granted, not started (prefetched)
        self.running = 0
        self.finished: list[str] = []  # encoded results not yet sent
        self.flush_scheduled = False
        self.unacked: set[int] = set()
        self.credit_sent: deque[list[float]] = deque()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.heartbeat_s = 30.0
        self.credit_in_report = False

    async def run(self, http: aiohttp.ClientSession) -> None:
        sim = self.sim
        while not sim.stopping:
            try:
                async with sim.connect_slots:
                    ws = await http.ws_connect(self.inst["url"], ssl=sim.ssl, max_msg_size=0, heartbeat=None)
                    await ws.send_str(encode(Hello(self.inst["id"], self.inst["token"], sim.slots, [],
                                                   features=list(FEATURES))))
                    first = await ws.receive(timeout=60)
                if first.type != aiohttp.WSMsgType.TEXT or jsonx.loads(first.data).get("t") != "welcome":
                    sim.errors.append(f"{self.inst['id']}: no welcome: {first.type} {str(first.data)[:200]}")
                    await ws.close()
                    await asyncio.sleep(1)
                    continue
                welcome = jsonx.loads(first.data)
                self.heartbeat_s = float(welcome["heartbeat_s"])
                self.credit_in_report = CREDIT_IN_REPORT in welcome.get("features", [])
                await self._session(ws)
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                sim.reconnects += 1
                if sim.reconnects <= 20:
                    sim.errors.append(f"{self.inst['id']}: connect: {exc!r}") if not _retryable(exc) else None
                await asyncio.sleep(0.5)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        sim = self.sim
        self._ask(sim.slots + sim.prefetch)
        beater = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                obj = jsonx.loads(msg.data)
                kind = obj["t"]
                if kind == "grant":
                    if "ok" in obj:  # the round's acks ride in the grant (ACK_IN_GRANT)
                        self._acked(obj)
                    self._granted(obj["tasks"])
                elif kind == "ack":
                    self._acked(obj)
                elif kind == "revoke":  # expected only when phase 3 cancels the big job
                    sim.revokes.append(time.monotonic())
                    for tid in obj["ids"]:
                        if self.held.pop(tid, None) is not None and tid in self.ready:
                            self.ready.remove(tid)
                elif kind in ("drain", "error"):
                    sim.errors.append(f"{self.inst['id']}: unexpected {str(msg.data)[:200]}")
        finally:
            beater.cancel()
        if not sim.stopping:
            sim.errors.append(f"{self.inst['id']}: connection closed by the daemon ({ws.close_code})")

    def _acked(self, obj: dict[str, Any]) -> None:
        self.unacked.difference_update(obj["ok"])
        if obj["refused"]:
            self.sim.errors.append(f"{self.inst['id']}: {len(obj['refused'])} reports refused")
            self.unacked.difference_update(obj["refused"])

    def _ask(self, n: int) -> None:
        assert self.ws is not None
        self.credit_sent.append([time.monotonic(), n])
        self._send(f'{{"t":"lease","n":{n}}}')

    def _send(self, frame: str) -> None:
        assert self.ws is not None
        asyncio.get_running_loop().create_task(self.ws.send_str(frame))

    def _granted(self, tasks: list[dict[str, Any]]) -> None:
        sim = self.sim
        now = time.monotonic()
        n = len(tasks)
        sim.grant_times.append(now)
        left = n
        while left > 0 and self.credit_sent:
            entry = self.credit_sent[0]
            take = min(left, int(entry[1]))
            entry[1] -= take
            left -= take
            if entry[1] <= 0:
                self.credit_sent.popleft()
                sim.rtts.append(now - entry[0])
                sim.rtt_at.append(now)
        for t in tasks:
            self.held[t["id"]] = t["token"]
            self.ready.append(t["id"])
            key = t["key"]
            if key[0] == "j":  # phase 3's tasks: j<job>t<n>; when each job was first leased
                sim.job_first_grant.setdefault(key[1:key.index("t")], now)
        self._start()

    def _start(self) -> None:
        """Run up to `slots` tasks at once, like the real agent; the rest wait (prefetched)."""
        while self.ready and self.running < self.sim.slots:
            tid = self.ready.popleft()
            self.running += 1
            if self.sim.task_s > 0:  # +-50 %: tasks of one grant do not all end at once
                asyncio.get_running_loop().call_later(self.sim.task_s * random.uniform(0.5, 1.5), self._finish, tid)
            else:
                self._finish(tid)

    def _finish(self, tid: int) -> None:
        self.running -= 1
        token = self.held.pop(tid, None)
        if token is not None:
            self.finished.append(f'{{"id":{tid},"token":{token},"result":null,"duration_s":{self.sim.task_s}}}')
            self.unacked.add(tid)
            if not self.flush_scheduled:  # completions of one loop iteration share a frame
                self.flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        self._start()

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.ws is None or self.ws.closed or not self.finished:
            return
        n = len(self.finished)
        if self.credit_in_report:  # the credit for what left our hands rides in the report
            self.credit_sent.append([time.monotonic(), n])
            self._send('{"t":"done","results":[' + ",".join(self.finished) + f'],"n":{n}}}')
        else:
            self._send('{"t":"done","results":[' + ",".join(self.finished) + "]}")
            self._ask(n)
        self.finished = []

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.held and self.ws is not None:
                leases = ",".join(f"[{tid},{tok}]" for tid, tok in self.held.items())
                self._send(f'{{"t":"hb","leases":[{leases}]}}')


def _retryable(exc: BaseException) -> bool:
    # 503 while over 1024 connections wait to authenticate: the real agent retries too
    return isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 503


class Simulator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.slots = spec["slots"]
        self.prefetch = spec["prefetch"]
        self.task_s = spec["task_ms"] / 1000
        self.ssl = ssl.create_default_context(cadata=spec["ca_cert"])
        self.instances = spec["instances"]
        self.connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.rtts = array("d")
        self.rtt_at = array("d")
        self.job_first_grant: dict[str, float] = {}
        self.grant_times = array("d")
        self.errors: list[str] = []
        self.reconnects = 0
        self.revokes: list[float] = []  # when a revoke arrived (monotonic)
        self.stopping = False

    async def run(self, out: Path) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, setattr, self, "task_s", 0.0)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            agents = [SimAgent(inst, self) for inst in self.instances]
            tasks = [asyncio.get_running_loop().create_task(a.run(http)) for a in agents]
            await stop.wait()
            self.stopping = True
            for a in agents:
                if a.ws is not None:
                    await a.ws.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        out.write_text(json.dumps({
            "rtts": self.rtts.tolist(), "rtt_at": self.rtt_at.tolist(), "job_first_grant": self.job_first_grant,
            "grant_times": self.grant_times.tolist(), "errors": self.errors, "reconnects": self.reconnects,
            "revokes": self.revokes,
            "rss_mb": peak_rss_mb(os.getpid()),
            "cpu_s": cpu_seconds(os.getpid()),
        }))


def simulator_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    asyncio.run(Simulator(spec).run(Path(out_path)))


# ---- the benchmark ------------------------------------------------------------------------------


async def wait_done(daemon: DaemonProcess, job_ids: list[int], poll_s: float = 0.1) -> None:
    pending = set(job_ids)
    while pending:
        for j in (await daemon.get("/v1/jobs"))["jobs"]:
            if j["id"] in pending and j["done"]:
                pending.discard(j["id"])
        if pending:
            await asyncio.sleep(poll_s)


async def lease_wait_buckets(daemon: DaemonProcess) -> dict[float, float]:
    """cloudtask_lease_wait_seconds, cumulative count per bucket bound, from /metrics."""
    out = {}
    for line in (await daemon.get("/metrics")).splitlines():
        if line.startswith("cloudtask_lease_wait_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(cumulative: dict[float, float], q: float) -> str:
    total = cumulative.get(float("inf"), 0)
    for le in sorted(cumulative):
        if total and cumulative[le] >= q * total:
            return f"{le * 1000:g} ms"
    return "n/a"


class Window:
    """One measured phase: tasks/s from the daemon's own counters, the daemon's CPU, and (after the
    simulators report) the lease round trips whose grant arrived inside it."""

    def __init__(self, name: str, daemon: DaemonProcess, job_id: int) -> None:
        self.name, self.daemon, self.job_id = name, daemon, job_id

    async def __aenter__(self) -> Window:
        assert self.daemon.proc is not None
        self.wait0 = await lease_wait_buckets(self.daemon)
        self.t0, self.cpu0 = time.monotonic(), cpu_seconds(self.daemon.proc.pid)
        self.done0 = (await self.daemon.get(f"/v1/jobs/{self.job_id}"))["counts"]["succeeded"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.daemon.proc is not None
        self.t1, self.cpu = time.monotonic(), cpu_seconds(self.daemon.proc.pid) - self.cpu0
        self.done = (await self.daemon.get(f"/v1/jobs/{self.job_id}"))["counts"]["succeeded"] - self.done0
        self.wait = {le: n - self.wait0.get(le, 0) for le, n in (await lease_wait_buckets(self.daemon)).items()}

    def report(self, stats: list[dict[str, Any]]) -> list[float]:
        rtts = [r for s in stats for t, r in zip(s["rtt_at"], s["rtts"], strict=True) if self.t0 <= t <= self.t1]
        span = self.t1 - self.t0
        print(f"{self.name}: {self.done:,} tasks in {span:.0f} s = {self.done / span:,.0f} tasks/s;"
              f" lease round trip p50 {percentile(rtts, 50) * 1000:.1f} ms, p99 {percentile(rtts, 99) * 1000:.1f} ms,"
              f" max {max(rtts, default=0) * 1000:.0f} ms ({len(rtts):,} samples);"
              f" daemon CPU {self.cpu / span * 100:.0f}% of a core")
        print(f"  the daemon's own lease wait (credit in -> grant out, its histogram):"
              f" p50 <= {bucket_quantile(self.wait, 0.5)},"
              f" p99 <= {bucket_quantile(self.wait, 0.99)}")
        return rtts


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--tasks", type=int, default=1_000_000, help="queued before the agents connect")
    ap.add_argument("--procs", type=int, default=4, help="simulator processes the agents are spread over")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--task-ms", type=float, default=2000.0, help="phase 1: how long a simulated task takes")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds each of phases 1 and 2 is measured")
    ap.add_argument("--jobs", type=int, default=1000, help="phase 3: jobs submitted at once (0: skip)")
    ap.add_argument("--tasks-per-job", type=int, default=100)
    ap.add_argument("--py-spy", metavar="FILE", help="profile the daemon in phase 1 (py-spy, collapsed stacks)")
    args = ap.parse_args()

    daemon = DaemonProcess({
        "providers": {"local": {"max_instances": 0}},
        "agents": {"lease_ttl_s": 120},
        # One client (this script) registers thousands of instances and polls: no 429s for it.
        "api": {"rate_limit_per_s": 100000, "rate_burst": 100000},
    })
    await daemon.start()
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    sims: list[tuple[subprocess.Popen[bytes], Path]] = []
    failed = False
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        t0 = time.monotonic()
        insts = await asyncio.gather(*(
            daemon.post("/v1/instances", json={"worker": worker["digest"], "slots": args.slots})
            for _ in range(args.agents)))
        print(f"registered {args.agents} instances in {time.monotonic() - t0:.1f} s")

        job = await daemon.post("/v1/jobs", json={"name": "scale", "worker": worker["digest"]})
        tasks_file = Path(daemon.tmp.name) / "tasks.jsonl"
        with tasks_file.open("w") as f:
            for i in range(args.tasks):
                f.write(f'{{"id":"t{i}","data":{{"i":{i}}}}}\n')
        t0 = time.monotonic()
        with tasks_file.open("rb") as f:
            await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=f)
        print(f"queued {args.tasks:,} tasks in {time.monotonic() - t0:.1f} s; daemon RSS {rss_mb(dpid):.0f} MiB")

        per = -(-args.agents // args.procs)
        for p in range(args.procs):
            chunk = insts[p * per:(p + 1) * per]
            if not chunk:
                continue
            spec = Path(daemon.tmp.name) / f"sim{p}.json"
            spec.write_text(json.dumps({"slots": args.slots, "prefetch": args.prefetch, "task_ms": args.task_ms,
                                        "ca_cert": chunk[0]["ca_cert"], "instances": chunk}))
            out = Path(daemon.tmp.name) / f"sim{p}.out.json"
            proc = subprocess.Popen([sys.executable, __file__, "--simulate", str(spec), str(out)],
                                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            sims.append((proc, out))
        t0 = time.monotonic()
        while True:
            live = (await daemon.get("/v1/instances"))["instances"]
            if sum(1 for i in live if i["state"] == "running") >= args.agents:
                break
            if any(p.poll() is not None for p, _ in sims):
                raise RuntimeError("a simulator process died")
            await asyncio.sleep(0.5)
        connected_rss = rss_mb(dpid)
        print(f"all {args.agents} agents connected in {time.monotonic() - t0:.1f} s;"
              f" daemon RSS {connected_rss:.0f} MiB")
        await asyncio.sleep(min(5.0, args.task_ms / 1000 * 2))  # past the first wave of grants

        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(dpid), "--format", "raw", "--threads",
                                    "--rate", "200", "--output", args.py_spy], stdout=subprocess.DEVNULL)
        async with Window(f"phase 1, tasks of {args.task_ms:.0f} ms +-50 %", daemon, job["id"]) as steady:
            await asyncio.sleep(args.duration)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        for p, _ in sims:
            p.send_signal(signal.SIGUSR1)  # tasks end as soon as they are granted: the daemon's worst case
        await asyncio.sleep(3)
        async with Window("phase 2, saturated (tasks of 0 ms)", daemon, job["id"]) as saturated:
            await asyncio.sleep(args.duration)
        rss_12 = peak_rss_mb(dpid)

        t_submit = t_queued = t_end3 = t_cancel = 0.0
        t_cancel_at = float("inf")
        job_ids: list[int] = []
        if args.jobs:
            # The big job goes first (cancelled, a real operation on what is left of it): the new jobs
            # would otherwise queue behind its remaining tasks.
            t_cancel_at = time.monotonic()
            await daemon.post(f"/v1/jobs/{job['id']}/cancel")
            t_cancel = time.monotonic() - t_cancel_at
            files = ["".join(f'{{"id":"j{k}t{i}","data":{{}}}}\n' for i in range(args.tasks_per_job)).encode()
                     for k in range(args.jobs)]

            queued_at: dict[str, float] = {}

            async def submit(k: int) -> int:
                jb = await daemon.post("/v1/jobs", json={"name": f"many{k}", "worker": worker["digest"]})
                await daemon.post(f"/v1/jobs/{jb['id']}/tasks", data=files[k])
                queued_at[str(k)] = time.monotonic()  # the upload is committed when its POST returns
                return int(jb["id"])

            await asyncio.sleep(1)
            t_submit = time.monotonic()
            job_ids = await asyncio.gather(*(submit(k) for k in range(args.jobs)))
            t_queued = time.monotonic()
            await wait_done(daemon, job_ids)
            t_end3 = time.monotonic()
        health = await daemon.get("/v1/health")
        cpu_all = cpu_seconds(dpid)

        for p, _ in sims:
            p.send_signal(signal.SIGTERM)
        stats = []
        for p, out in sims:
            p.wait(timeout=120)
            stats.append(json.loads(out.read_text()))
        errors = [e for s in stats for e in s["errors"]]
        # A revoke is right for the leases of the cancelled job, and a fault anywhere before it.
        errors += [f"a revoke {t_cancel_at - t:.1f} s before the cancel" for s in stats for t in s["revokes"]
                   if t < t_cancel_at]
        log_errors = [line for line in daemon.log_path.read_text().splitlines() if '"error"' in line]

        print(f"\nagents={args.agents} procs={args.procs} slots={args.slots} prefetch={args.prefetch}"
              f" tasks queued={args.tasks:,}")
        steady.report(stats)
        saturated.report(stats)
        print(f"daemon: RSS {connected_rss:.0f} MiB with all agents connected, peak {rss_12:.0f} MiB in phases 1-2")
        sim_rss = ", ".join(f"{s['rss_mb']:.0f}" for s in stats)
        print(f"simulators: peak RSS {sim_rss} MiB; CPU {sum(s['cpu_s'] for s in stats):.1f} s in all;"
              f" connect retries {sum(s['reconnects'] for s in stats)}")
        if args.jobs:
            grants = sorted(t for s in stats for t in s["grant_times"] if t > t_submit)
            gaps = [b - a for a, b in itertools.pairwise(grants)]
            first = {k: min(s["job_first_grant"][k] for s in stats if k in s["job_first_grant"]) for k in queued_at}
            # A job's wait: from its upload's commit to its first lease (negative: leased before the
            # client heard of the commit). The gaps between grants also count time when nothing was
            # queued yet (uploads still arriving).
            waits = [max(0.0, first[k] - queued_at[k]) for k in queued_at]
            print(f"phase 3: cancelling the big job ({args.tasks:,} tasks, the rest of them cancelled) took"
                  f" {t_cancel:.1f} s; then {args.jobs} jobs x {args.tasks_per_job} tasks submitted at once:"
                  f" all queued in {t_queued - t_submit:.1f} s, all done {t_end3 - t_submit:.1f} s after the"
                  f" first submission; first grant {(grants[0] - t_submit) * 1000 if grants else float('nan'):.0f} ms"
                  f" after it; longest gap between grants {max(gaps, default=0) * 1000:.0f} ms"
                  f" (p99 {percentile(gaps, 99) * 1000:.1f} ms over {len(gaps):,} gaps)")
            print(f"  each job from its upload's commit to its first lease: p50 {percentile(waits, 50) * 1000:.1f} ms,"
                  f" p99 {percentile(waits, 99) * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms")
        print(f"daemon: peak RSS {peak_rss_mb(dpid):.0f} MiB over the whole run, CPU {cpu_all:.1f} s; health: {health}")
        print(f"errors: {len(errors)} from the agents, {len(log_errors)} error lines in the daemon's log")
        for e in (errors + log_errors)[:20]:
            print("  ", e[:300])
        done_all = True
        if args.jobs:
            jobs = {jb["id"]: jb for jb in (await daemon.get("/v1/jobs"))["jobs"]}
            done_all = all(jobs[i]["counts"]["succeeded"] == args.tasks_per_job for i in job_ids)
        failed = bool(errors or log_errors or not done_all)
    finally:
        for p, _ in sims:
            if p.poll() is None:
                p.kill()
                p.wait()
        await daemon.stop()
    if failed:
        print("FAILED: errors above, or tasks not all succeeded", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--simulate":
        simulator_main(sys.argv[2], sys.argv[3])
    else:
        os.chdir(ROOT)
        asyncio.run(main())
