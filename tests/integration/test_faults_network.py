"""An agent cut off from the daemon past its visibility timeout while it holds finished results,
then reconnected: its stale reports are refused, another agent's redo is what counts, every task
succeeds exactly once, and the cut agent works again.

A real daemon process and real agent processes (`python -m agent.main`), TLS on. Agent A reaches
the daemon through a fault (a proxy that stalls or black-holes its bytes, or a network namespace
whose link is taken down); agent B dials it directly and is started only once A's leases have
expired, to redo them. Each round:

1. A leases `slots` tasks (no prefetch) and runs them; they wait at a gate (a file).
2. The path is cut, then the gate opens: A finishes every task while cut off (a marker file each).
3. The daemon expires A's leases (no heartbeat for lease_ttl_s) and B redoes the tasks.
4. The path comes back: A's results, sent or resent, are refused as stale.
Then, with B gone, a batch that only A can run shows it works again.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.core.tables import tasks as queue
from tests.conftest import wait_for
from tests.fakes import netns as netns_mod
from tests.fakes.netns import Netns
from tests.fakes.netproxy import Proxy
from tests.procs import ROOT, DaemonProcess, bundle

LEASE_TTL_S = 2.0
# python mode runs in the agent's own process: the worker names the agent that ran it (its
# environment) and leaves a marker file per finished task; a task given a gate marks its start and
# waits for the gate.
WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": (
        "import asyncio, os, pathlib\n"
        "async def run(task_id, data):\n"
        "    by = os.environ['CT_AGENT_NAME']\n"
        "    gate = data.get('gate')\n"
        "    if gate:\n"
        "        pathlib.Path(data['marks'], f'{by}-{task_id}.started').touch()\n"
        "    while gate and not os.path.exists(gate):\n"
        "        await asyncio.sleep(0.02)\n"
        "    pathlib.Path(data['marks'], f'{by}-{task_id}').touch()\n"
        "    return {'n': data['n'], 'by': by}\n"
    ),
}


@dataclass
class AgentProc:
    name: str
    instance: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, event: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a traceback's lines, if any: shown by tail() on failure
            if isinstance(doc, dict) and doc.get("event") == event:
                lines.append(doc)
        return lines

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (drain: hand back, wait for acks, exit), SIGKILL if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Rig:
    """A real cloudtaskd process with one worker and one job, and the agents started against it."""

    def __init__(self, workdir: Path, *, listen_host: str = "127.0.0.1", lease_ttl_s: float = LEASE_TTL_S,
                 worker: dict[str, str] | None = None, queue: dict[str, float] | None = None) -> None:
        self.workdir = workdir
        self.worker = worker or WORKER
        self.daemon = DaemonProcess(workdir, {
            "agents": {"listen_host": listen_host, "lease_ttl_s": lease_ttl_s},
            "providers": {"local": {"max_instances": 0}},
            "queue": queue or {"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2},
        })
        self.marks = workdir / "marks"
        self.marks.mkdir()
        self.agents: list[AgentProc] = []
        self.digest = ""
        self.job = 0
        self.submitted = 0
        self.ca = workdir / "ca.pem"
        self.proxies: list[Proxy] = []

    async def start(self) -> None:
        await self.daemon.start()
        worker = await self.daemon.post("/v1/workers", data=bundle(self.worker))
        self.digest = worker["digest"]
        job = await self.daemon.post("/v1/jobs", json={"name": "faults", "worker": self.digest, "max_attempts": 10})
        self.job = int(job["id"])

    async def register(self, slots: int) -> dict[str, Any]:
        inst: dict[str, Any] = await self.daemon.post("/v1/instances", json={"worker": self.digest, "slots": slots})
        self.ca.write_text(inst["ca_cert"])
        return inst

    def start_agent(self, name: str, inst: dict[str, Any], url: str, slots: int, *,
                    wrapper: Sequence[str] = (), env: dict[str, str] | None = None) -> AgentProc:
        home = self.workdir / f"agent-{name}"
        home.mkdir(exist_ok=True)
        log_path = home / "agent.log"
        full_env = {**os.environ, "CLOUDTASK_AGENT_TOKEN": inst["token"], "PYTHONPATH": str(ROOT),
                    "CT_AGENT_NAME": name, **(env or {})}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "agent.main", "--url", url, "--instance", inst["id"],
                 "--worker-dir", str(self.daemon.state_dir / "workers" / self.digest), "--slots", str(slots),
                 "--prefetch", "0", "--ca-file", str(self.ca), "--drain-grace", "10"],
                env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
            )
        agent = AgentProc(name, inst["id"], proc, log_path)
        self.agents.append(agent)
        return agent

    async def start_agent_behind_proxy(self, name: str, slots: int, *, env: dict[str, str] | None = None,
                                       ) -> tuple[dict[str, Any], AgentProc, Proxy]:
        """A new instance whose agent dials the daemon through a proxy of its own (stopped with the
        rig), started and connected: (the instance, its agent, the proxy)."""
        inst = await self.register(slots)
        proxy = Proxy("127.0.0.1", int(inst["url"].rsplit(":", 1)[1].split("/")[0]))
        await proxy.start()
        self.proxies.append(proxy)
        agent = self.start_agent(name, inst, proxied_url(inst["url"], proxy.port), slots, env=env)
        await self.until(f"{name} connected", lambda: bool(agent.log("agent_connected")))
        return inst, agent, proxy

    async def submit(self, n: int, *, gate: Path | None = None) -> list[int]:
        """n more tasks; returns their ids in the store."""
        first = self.submitted
        self.submitted += n
        lines = "".join(json.dumps({"id": f"t{i}", "data": {"n": i, "marks": str(self.marks),
                                                             "gate": str(gate) if gate else ""}}) + "\n"
                        for i in range(first, first + n))
        await self.daemon.post(f"/v1/jobs/{self.job}/tasks", data=lines.encode())
        rows = self.query("SELECT id FROM tasks WHERE job_id = ? AND key IN (SELECT value FROM json_each(?))",
                          self.job, json.dumps([f"t{i}" for i in range(first, first + n)]))
        return sorted(r[0] for r in rows)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(f"file:{self.daemon.state_dir / 'cloudtask.db'}?mode=ro", uri=True)) as db:
            return db.execute(sql, params).fetchall()

    def count(self, sql: str, *params: Any) -> int:
        return int(self.query(sql, *params)[0][0])

    def states(self, ids: list[int]) -> dict[int, tuple[str, str | None]]:
        rows = self.query("SELECT id, state, instance_id FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                          json.dumps(ids))
        return {r[0]: (r[1], r[2]) for r in rows}

    async def until(self, what: str, predicate: Callable[[], bool], timeout_s: float = 30) -> None:
        async def check() -> bool:
            for agent in self.agents:
                code = agent.proc.poll()
                if code is not None and code != 0:
                    raise AssertionError(f"agent {agent.name} exited with {code}:\n{agent.tail()}")
            return predicate()
        await wait_for(check, timeout=timeout_s, message=what)

    async def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        await self.daemon.stop()
        for proxy in self.proxies:
            await proxy.stop()


def cut_round_checks(rig: Rig, a: AgentProc, b: AgentProc, ids: list[int]) -> None:
    """After a round: A's results were all refused, B's redo is the one recorded, once."""
    for tid in ids:
        key, state, inst, attempt, result = rig.query(
            "SELECT key, state, instance_id, attempt, result FROM tasks WHERE id = ?", tid)[0]
        assert (state, inst) == ("succeeded", b.instance), f"task {tid}"
        assert json.loads(result)["by"] == b.name, f"task {tid}: the stale result was recorded: {result}"
        # The recorded result is the current attempt's: the last lease, which went to B.
        grants = rig.query("SELECT instance_id, detail FROM events WHERE kind = 'lease_granted' AND task_id = ?"
                           " ORDER BY id", tid)
        assert grants[0][0] == a.instance and grants[-1] == (b.instance, str(attempt)), grants
        assert (rig.marks / f"{a.name}-{key}").exists(), f"task {tid}: A never finished it"
        succeeded = rig.query("SELECT instance_id FROM events WHERE kind = 'task_succeeded' AND task_id = ?", tid)
        assert succeeded == [(b.instance,)], f"task {tid} succeeded {succeeded}"
        expired = rig.count("SELECT count(*) FROM events WHERE kind = 'lease_expired' AND task_id = ?"
                            " AND instance_id = ?", tid, a.instance)
        assert expired == 1, f"task {tid}: {expired} expiries of A's lease"
        refused = rig.count("SELECT count(*) FROM events WHERE kind = 'stale_report_refused' AND task_id = ?"
                            " AND instance_id = ?", tid, a.instance)
        assert refused == 1, f"task {tid}: A's stale report refused {refused} times"
    assert {r["task"] for r in a.log("report_refused")} >= set(ids)


def final_checks(rig: Rig) -> None:
    with closing(sqlite3.connect(rig.daemon.state_dir / "cloudtask.db")) as db:
        assert queue.check_counters(db) == []
        states = dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        assert states == {"succeeded": rig.submitted}, states
        per_task = db.execute("SELECT task_id, count(*) FROM events WHERE kind = 'task_succeeded'"
                              " GROUP BY task_id HAVING count(*) != 1").fetchall()
        assert per_task == []
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == rig.submitted


async def run_rounds(rig: Rig, a: AgentProc, slots: int, rounds: int, *, b_url: str,
                     cut: Callable[[], Awaitable[None]], restore: Callable[[], Awaitable[None]],
                     before_restore: Callable[[], Awaitable[None]] | None = None) -> None:
    """The rounds of the module docstring, then a batch for A alone."""
    for r in range(rounds):
        await cut_round(rig, a, slots, r, b_url=b_url, cut=cut, restore=restore, before_restore=before_restore)
    # A alone (every B has drained and exited): it works again.
    ids = await rig.submit(2 * slots)
    await rig.until("A ran a batch after the faults", lambda: all(
        s == ("succeeded", a.instance) for s in rig.states(ids).values()))


async def cut_round(rig: Rig, a: AgentProc, slots: int, r: int, *, b_url: str,
                    cut: Callable[[], Awaitable[None]], restore: Callable[[], Awaitable[None]],
                    before_restore: Callable[[], Awaitable[None]] | None) -> None:
    gate = rig.workdir / f"gate-{r}"
    ids = await rig.submit(slots, gate=gate)
    keys = [k for (k,) in rig.query("SELECT key FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                                    json.dumps(ids))]
    # Started, not only leased in the store: a grant still on its way would be cut off too.
    await rig.until(f"round {r}: A runs the batch", lambda: all(
        (rig.marks / f"{a.name}-{k}.started").exists() for k in keys))
    await cut()
    gate.touch()
    await rig.until(f"round {r}: A finished the batch while cut off",
                    lambda: all((rig.marks / f"{a.name}-{k}").exists() for k in keys))
    await rig.until(f"round {r}: A's leases expired", lambda: rig.count(
        "SELECT count(*) FROM events WHERE kind = 'lease_expired' AND instance_id = ?"
        " AND task_id IN (SELECT value FROM json_each(?))", a.instance, json.dumps(ids)) == len(ids))
    b = rig.start_agent(f"B{r}", await rig.register(slots), b_url, slots)
    await rig.until(f"round {r}: B redid the batch", lambda: all(
        s == ("succeeded", b.instance) for s in rig.states(ids).values()))
    assert b.stop() == 0, b.tail()
    if before_restore is not None:
        await before_restore()
    refused_before = len(a.log("report_refused"))
    await restore()
    await rig.until(f"round {r}: A's stale reports refused", lambda: rig.count(
        "SELECT count(*) FROM events WHERE kind = 'stale_report_refused' AND instance_id = ?"
        " AND task_id IN (SELECT value FROM json_each(?))", a.instance, json.dumps(ids)) >= len(ids)
        and len(a.log("report_refused")) >= refused_before + len(ids))
    cut_round_checks(rig, a, b, ids)


def proxied_url(url: str, port: int) -> str:
    host, _, rest = url.removeprefix("wss://").partition("/")
    return f"wss://{host.rsplit(':', 1)[0]}:{port}/{rest}"


@pytest.mark.parametrize("fault", ["stall", "blackhole"])
async def test_agent_cut_off_past_its_lease_ttl(tmp_path: Path, soak: bool, fault: str) -> None:
    rounds, slots = (4, 8) if soak else (1, 4)
    rig = Rig(tmp_path)
    try:
        await rig.start()
        inst_a, a, p = await rig.start_agent_behind_proxy("A", slots)
        closes_at_cut = 0

        async def cut() -> None:
            nonlocal closes_at_cut
            closes_at_cut = p.client_closes
            if fault == "stall":
                p.stall()
            else:
                p.blackhole()

        async def gave_up() -> None:
            # Its connection is dead without a FIN or RST: A must find out by itself (the
            # websocket heartbeat) and leave it. Only then does the path come back.
            await rig.until("A gave up its black-holed connection", lambda: p.client_closes > closes_at_cut,
                            timeout_s=90)

        async def restore() -> None:
            p.resume()

        await run_rounds(rig, a, slots, rounds, b_url=inst_a["url"], cut=cut, restore=restore,
                         before_restore=gave_up if fault == "blackhole" else None)
        if fault == "stall":
            # Held, not lost: the one connection carried A through every stall.
            assert p.connections == 1 and len(a.log("agent_connected")) == 1
        else:
            assert len(a.log("agent_connected")) >= rounds + 1
        assert a.stop() == 0, a.tail()
        final_checks(rig)
    finally:
        await rig.stop()


# ---- a real network namespace --------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    why = netns_mod.unavailable()
    if why is not None:
        pytest.skip(why)
    with netns_mod.namespace("ct-fault") as ns:
        yield ns


async def test_agent_in_a_namespace_whose_link_goes_down(tmp_path: Path, soak: bool, netns: Netns) -> None:
    """The real thing: A runs in its own network namespace and the host side of its veth is taken
    down (TCP retransmits across the outage; nothing in our code sits on the path), then up."""
    rounds, slots = (3, 8) if soak else (1, 4)
    # The daemon's agent listener on the host end of the veth: reachable from the namespace, and
    # from the host itself (a local address stays reachable while its link is down).
    rig = Rig(tmp_path, listen_host=netns.host_ip)
    try:
        await rig.start()
        inst_a = await rig.register(slots)
        assert inst_a["url"].startswith(f"wss://{netns.host_ip}:"), inst_a["url"]
        a = rig.start_agent("A", inst_a, inst_a["url"], slots, wrapper=("ip", "netns", "exec", netns.name))
        await rig.until("A connected from its namespace", lambda: bool(a.log("agent_connected")))

        async def link(state: str) -> None:
            done = netns_mod.ip("link", "set", netns.host_if, state)
            assert done.returncode == 0, done.stderr

        await run_rounds(rig, a, slots, rounds, b_url=inst_a["url"],
                         cut=lambda: link("down"), restore=lambda: link("up"))
        assert a.stop() == 0, a.tail()
        final_checks(rig)
    finally:
        await rig.stop()


async def test_a_silently_dead_connection_is_left_before_the_leases_expire(tmp_path: Path) -> None:
    """A's connection dies without a FIN or RST while a new one would pass at once (a NAT entry
    lost). With a lease TTL of 30 s, A must notice and reconnect in time for its hello to keep its
    leases: the websocket heartbeat alone (no frame for 20 s, then 10 s for a pong) notices after
    the leases have expired, and the work is done twice."""
    slots = 4
    rig = Rig(tmp_path, lease_ttl_s=30)
    try:
        await rig.start()
        _, a, proxy = await rig.start_agent_behind_proxy("A", slots)
        gate = tmp_path / "gate"
        ids = await rig.submit(slots, gate=gate)
        await rig.until("A runs the batch", lambda: len(list(rig.marks.glob("A-*.started"))) == slots)
        proxy.blackhole()
        proxy.resume()  # the open connection stays dead; new ones pass
        gate.touch()
        await rig.until("A noticed and reconnected", lambda: len(a.log("agent_connected")) == 2, timeout_s=60)
        assert a.log("agent_connected")[1]["kept"] == slots
        assert a.log("agent_disconnected"), a.tail()
        await rig.until("the batch done", lambda: all(
            s == ("succeeded", a.instance) for s in rig.states(ids).values()))
        for kind in ("lease_expired", "stale_report_refused"):
            assert rig.count("SELECT count(*) FROM events WHERE kind = ?", kind) == 0, kind
        assert rig.query("SELECT DISTINCT attempt FROM tasks") == [(1,)]
        assert a.stop() == 0, a.tail()
        final_checks(rig)
    finally:
        await rig.stop()
