"""cloudtaskd as a systemd service: the unit file, sd_notify (READY, STATUS, WATCHDOG, STOPPING,
RELOADING), the health-gated watchdog, and config reloads (in process and by SIGHUP)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from structlog.testing import capture_logs

from cloudtaskd.config import (
    AgentsConfig,
    AwsProviderConfig,
    Config,
    LocalProviderConfig,
    ProvidersConfig,
    QueueConfig,
    Secret,
)
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.daemon import SHUTDOWN_GRACE_S, Daemon
from cloudtaskd.fleet.providers.local import TERMINATE_GRACE_S
from cloudtaskd.reload import changed_keys, plan
from cloudtaskd.service import Notifier, Systemd, watchdog
from tests import paths
from tests.conftest import make_config, wait_for
from tests.integration.test_daemon_e2e import jsonl
from tests.procs import DaemonProcess, bundle, free_port

ROOT = paths.ROOT
UNIT = ROOT / "systemd" / "cloudtaskd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "def run(task_id, data):\n    return data['n'] * 2\n",
}


# ---- helpers ----

class NotifySocket:
    """What systemd listens on: a unix datagram socket; messages are read as dicts of KEY=VALUE."""

    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path) if not str(path).startswith("@") else "\0" + str(path)[1:])
        self.sock.setblocking(False)
        self.address = str(path)

    async def receive(self, timeout: float = 30.0) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def until(self, key: str, timeout: float = 30.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The first message holding key, and every message before it."""
        before: list[dict[str, str]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.receive(max(0.01, deadline - loop.time()))
            if key in msg:
                return msg, before
            before.append(msg)

    def drain(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def events(log_path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (anything else, a traceback, is kept as {"raw": line})."""
    out = []
    for line in log_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"raw": line})
    return out


async def health(socket_path: Path) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as http, \
            http.get("http://cloudtaskd/v1/health") as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
        return body


def service_env(notify: NotifySocket, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return {**env, "NOTIFY_SOCKET": notify.address, **extra}


# ---- the unit file ----

def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "ms": 0.001}
    return sum(float(n) * units[u or "s"] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s)?", value))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this venv's cloudtaskd.
    daemon = Path(sys.prefix) / "bin" / "cloudtaskd"
    assert daemon.exists(), f"{daemon} is missing: install the project (./install.sh)"
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/cloudtask/.venv/bin/cloudtaskd ") == 1
    unit = tmp_path / "cloudtaskd.service"
    unit.write_text(text.replace("ExecStart=/opt/cloudtask/.venv/bin/cloudtaskd ", f"ExecStart={daemon} "))
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (proc.stdout + proc.stderr).splitlines() if "cloudtaskd.service" in line]
    assert proc.returncode == 0 and about_unit == [], proc.stdout + proc.stderr


def test_unit_file_matches_the_daemon() -> None:
    s = _unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    # A stop drains local agents for the daemon's grace, then stops each one (its own grace):
    # systemd must not SIGKILL the daemon while it still does that.
    assert _seconds(s["TimeoutStopSec"][0]) > SHUTDOWN_GRACE_S + TERMINATE_GRACE_S
    assert _seconds(s["WatchdogSec"][0]) > 0
    assert s["StateDirectory"] == ["cloudtask"] and s["StateDirectoryMode"] == ["0750"]
    assert s["User"] == ["cloudtask"] and s["UMask"] == ["0027"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]


# ---- sd_notify ----

async def test_notifier_sends_to_a_path_and_to_an_abstract_socket(tmp_path: Path) -> None:
    for address in (str(tmp_path / "n.sock"), f"@cloudtask-test-{os.getpid()}-{id(tmp_path)}"):
        listener = NotifySocket(address)
        try:
            n = Notifier(address)
            assert n.ready("serving\nat a socket")
            assert await listener.receive() == {"READY": "1", "STATUS": "serving at a socket"}
            assert n.watchdog()
            assert await listener.receive() == {"WATCHDOG": "1"}
            assert n.reloading()
            msg = await listener.receive()
            # systemd compares it with its own CLOCK_MONOTONIC: the same clock, in microseconds.
            assert msg["RELOADING"] == "1"
            assert abs(int(msg["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 60_000_000
            assert n.stopping()
            assert await listener.receive() == {"STOPPING": "1"}
            n.close()
        finally:
            listener.close()


def test_without_notify_socket_everything_is_a_no_op(tmp_path: Path) -> None:
    sd = Systemd.from_environ({})
    assert not sd.notifier.enabled and sd.watchdog_interval_s is None
    assert not sd.notifier.ready("x") and not sd.notifier.watchdog() and not sd.notifier.stopping()
    # A socket that has gone away (systemd re-executed) fails a send without raising.
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.ready() and not n.watchdog()
    n.close()


def test_systemd_environment_is_read_once_and_removed() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    sd = Systemd.from_environ(env)
    assert sd.notifier.address == "@x" and sd.watchdog_interval_s == 15.0
    sd.notifier.close()
    assert env == {"PATH": "/bin"}, "agents and commands the daemon starts must not inherit them"
    other = Systemd.from_environ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None, "WATCHDOG_PID names another process: not ours to ping"
    assert Systemd.from_environ({"WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


# ---- the watchdog ----

async def test_watchdog_withholds_pings_while_the_database_does_not_answer(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    daemon = Daemon(replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(enabled=False))),
                    shutdown_grace_s=1)
    await daemon.start()
    notifier = Notifier(notify_socket.address)
    dog: asyncio.Task[None] | None = None
    release, entered = threading.Event(), threading.Event()
    blocker: asyncio.Task[Any] | None = None
    try:
        with capture_logs() as logs:
            dog = asyncio.get_running_loop().create_task(watchdog(notifier, 0.05, daemon.health))
            await notify_socket.until("WATCHDOG")

            def stuck(tx: Any) -> None:  # a write transaction that never ends, as a wedged disk would
                entered.set()
                release.wait(60)

            blocker = asyncio.get_running_loop().create_task(daemon.store.write(stuck))

            def withheld() -> int:
                return sum(1 for e in logs if e["event"] == "watchdog_ping_withheld")

            async def withheld_at_least(n: int) -> bool:
                return withheld() >= n

            await wait_for(lambda: withheld_at_least(2), message="a ping withheld twice")
            assert entered.is_set()
            notify_socket.drain()  # a ping whose check passed before the block may still be in flight
            mark = withheld()
            await wait_for(lambda: withheld_at_least(mark + 3), message="three more pings withheld")
            assert notify_socket.drain() == [], "the watchdog pinged while the database did not answer"
            assert any("did not answer" in e.get("reason", "") for e in logs if e["event"] == "watchdog_ping_withheld")

            release.set()
            await blocker
            await notify_socket.until("WATCHDOG")  # healthy again: pings resume
            await wait_for(lambda: _has(logs, "watchdog_resumed"), message="watchdog_resumed logged")

            # A supervised task that died is as bad as a stuck database.
            daemon.failed.set()
            mark = withheld()
            await wait_for(lambda: withheld_at_least(mark + 2), message="pings withheld after a task died")
            notify_socket.drain()
            await wait_for(lambda: withheld_at_least(mark + 4), message="still withheld")
            assert notify_socket.drain() == []
            assert any("background task" in e.get("reason", "") for e in logs if e["event"] == "watchdog_ping_withheld")
    finally:
        release.set()
        if blocker is not None:
            await blocker
        if dog is not None:
            dog.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dog
        notifier.close()
        daemon.failed.clear()
        await daemon.stop()


async def test_watchdog_ends_when_cancelled_whatever_it_is_doing(notify_socket: NotifySocket) -> None:
    """The daemon's stop cancels the watchdog and waits for it: a cancel that lands just as a check
    completes must not be lost (asyncio.wait_for on 3.11 loses it, and the stop would hang)."""
    async def healthy() -> str | None:
        return None

    async def sick() -> str | None:
        return "sick"

    notifier = Notifier(notify_socket.address)
    try:
        for i in range(60):
            dog = asyncio.get_running_loop().create_task(watchdog(notifier, 0.001, healthy if i % 2 else sick))
            for _ in range(i % 9):  # cancel at a different step of the loop each time
                await asyncio.sleep(0)
            dog.cancel()
            done, _ = await asyncio.wait({dog}, timeout=10)
            lost = dog not in done
            while not dog.done():  # a lost cancel: end it anyway, or the test's loop never closes
                dog.cancel()
                await asyncio.wait({dog}, timeout=0.01)
            assert not lost and dog.cancelled(), f"try {i}: the watchdog went on after its cancel"
            notify_socket.drain()
    finally:
        notifier.close()


async def _has(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_ready_only_once_serving_then_watchdog_then_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    daemon = DaemonProcess(tmp_path, {"log_level": "info", "providers": {"local": {"enabled": False}}})
    starting = asyncio.get_running_loop().create_task(
        daemon.start(env=service_env(notify_socket, WATCHDOG_USEC="200000")))
    try:
        ready, before = await notify_socket.until("READY")
        # At READY=1 the control socket already answers, and nothing was announced before it.
        assert (await health(daemon.socket))["ok"] is True
        assert before == []
        assert str(daemon.socket) in ready["STATUS"] and "wss://" in ready["STATUS"]
        await starting
        assert daemon.proc is not None
        for _ in range(3):
            assert (await notify_socket.receive(timeout=10)) == {"WATCHDOG": "1"}
        daemon.proc.send_signal(signal.SIGTERM)
        stopping, _ = await notify_socket.until("STOPPING")
        assert "remote instances keep running" in stopping["STATUS"]
        assert await asyncio.to_thread(daemon.proc.wait, 60) == 0
    finally:
        if not starting.done():
            starting.cancel()
        await daemon.stop()
    names = [e.get("event") for e in events(daemon.log_path)]
    assert names[-1] == "daemon_stopped" and "daemon_ready" in names
    assert not [e for e in events(daemon.log_path) if e.get("level") == "error" or "raw" in e]


# A wrapper that turns on the kernel's MemoryDenyWriteExecute (PR_SET_MDWE, Linux 6.3; kept across
# execve) and then execs the daemon: what systemd's MemoryDenyWriteExecute=yes enforces.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_SET_MDWE failed: errno %d' % ctypes.get_errno())\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _mdwe_supported() -> bool:
    """The wrapper works here, and the flag it sets survives execve (PR_GET_MDWE in the new program)."""
    proc = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c",
                           "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _mdwe_supported(),
                    reason="this kernel has no PR_SET_MDWE (Linux >= 6.3)")
async def test_daemon_and_local_agents_work_without_writable_executable_memory(tmp_path: Path) -> None:
    """The unit leaves MemoryDenyWriteExecute out for local workers' JITs, not for the daemon: it
    starts its TLS CA (cryptography), serves, and a local agent (aiohttp, TLS) runs a job under it."""
    daemon = DaemonProcess(tmp_path, {"providers": {"local": {"max_instances": 1, "cpus": 2}},
                                      "scaling": {"tick_s": 0.2, "idle_timeout_s": 1}})
    await daemon.start(wrapper=(sys.executable, "-c", MDWE_EXEC))
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "mdwe", "worker": worker["digest"]})
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=jsonl([{"id": i, "data": {"n": i}}
                                                                      for i in range(10)]).encode())

        async def done() -> Any:
            j = await daemon.get(f"/v1/jobs/{job['id']}")
            return j if j["done"] else None
        j = await wait_for(done, timeout=60, message="the job done under MDWE")
        assert j["counts"]["succeeded"] == 10
    finally:
        assert await daemon.stop() == 0



# ---- SIGTERM ----

async def test_sigterm_during_startup_leaves_a_state_the_next_start_takes(tmp_path: Path,
                                                                          notify_socket: NotifySocket) -> None:
    daemon = DaemonProcess(tmp_path, {"log_level": "info", "providers": {"local": {"enabled": False}}})
    # A state with work in it, so that a start has something to recover.
    await daemon.start()
    worker = await daemon.post("/v1/workers", data=bundle(WORKER))
    job = await daemon.post("/v1/jobs", json={"name": "j", "worker": worker["digest"]})
    await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=jsonl([{"id": i, "data": {"n": i}}
                                                                  for i in range(50)]).encode())
    assert await daemon.stop() == 0
    for moment in ("store_opened", "daemon_ready"):
        daemon.log_path.write_text("")
        starting = asyncio.get_running_loop().create_task(daemon.start(env=service_env(notify_socket)))
        try:
            async def reached(moment: str = moment) -> bool:
                return any(e.get("event") == moment for e in events(daemon.log_path))
            await wait_for(reached, message=f"{moment} logged")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.proc.wait, 60) == 0, daemon.log_path.read_text()
        finally:
            starting.cancel()
            with suppress(asyncio.CancelledError, RuntimeError):  # it may have seen the daemon up, or gone
                await starting
            await daemon.stop()
        log = events(daemon.log_path)
        assert log[-1].get("event") == "daemon_stopped", log
        assert not [e for e in log if e.get("level") == "error" or "raw" in e], log
        messages = notify_socket.drain()
        assert any("STOPPING" in m for m in messages)
        assert not daemon.socket.exists(), "the stopped daemon's socket is left behind"
    # Nothing half-written: the database is whole, its counters agree, and the next start serves.
    db = sqlite3.connect(daemon.state_dir / "cloudtask.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert queue.check_counters(db) == []
        assert db.execute("SELECT count(*) FROM tasks WHERE state = 'queued'").fetchone()[0] == 50
    finally:
        db.close()
    await daemon.start()
    try:
        assert (await daemon.get(f"/v1/jobs/{job['id']}"))["counts"]["queued"] == 50
    finally:
        assert await daemon.stop() == 0


async def test_a_second_daemon_on_the_same_state_leaves_the_first_alone(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(enabled=False)))
    first = Daemon(config, shutdown_grace_s=1)
    await first.start()
    try:
        second = Daemon(config, shutdown_grace_s=1)
        with pytest.raises(Exception, match="another cloudtaskd is running"):
            await second.start()
        await second.stop()
        assert (await health(config.socket_path))["ok"] is True, "the failed start removed the running one's socket"
    finally:
        await first.stop()


# ---- reload ----

def test_changed_keys_walks_sections_and_treats_lists_as_values() -> None:
    old = Config()
    new = replace(old, log_level="debug", scaling=replace(old.scaling, max_instances=3),
                  agents=replace(old.agents, tls_names=("a.example",)), source="other.yaml")
    assert changed_keys(old, new) == ["log_level", "agents.tls_names", "scaling.max_instances"]
    assert changed_keys(old, old) == []


def test_reload_plan_keeps_what_is_bound_at_start() -> None:
    old = Config(state_dir="/a", agents=AgentsConfig(lease_ttl_s=60.0))
    new = replace(old, state_dir="/b", log_level="debug",
                  agents=replace(old.agents, lease_ttl_s=30.0, lease_batch_max=7, listen_port=9000),
                  providers=replace(old.providers, local=replace(old.providers.local, max_instances=3),
                                    aws=replace(old.providers.aws, max_instances=9)))
    p = plan(old, new, {"local": 1})
    assert set(p.applied) == {"log_level", "agents.lease_batch_max", "providers.local.max_instances"}
    assert set(p.needs_restart) == {"state_dir", "agents.lease_ttl_s", "agents.listen_port",
                                    "providers.aws.max_instances"}
    assert p.config.state_dir == "/a" and p.config.agents.lease_ttl_s == 60.0 and p.config.agents.listen_port == 0
    assert p.config.log_level == "debug" and p.config.providers.local.max_instances == 3
    assert p.config.providers.aws.max_instances == old.providers.aws.max_instances
    assert "not running" in p.reasons["providers.aws.max_instances"]
    # A longer lease is safe while agents are connected.
    longer = plan(old, replace(old, agents=replace(old.agents, lease_ttl_s=120.0)), {})
    assert longer.applied == ("agents.lease_ttl_s",) and longer.config.agents.lease_ttl_s == 120.0


def test_reload_raises_the_task_limit_only_while_it_fits_the_agents_frames() -> None:
    """Agents read frames up to the limit they were started with (agents.max_message_bytes waits for
    a restart): a task limit past it would accept tasks no agent can be given."""
    old = Config()  # frames of 4 MiB
    within = plan(old, replace(old, queue=replace(old.queue, max_task_bytes=2 * 1024 * 1024)), {})
    assert within.applied == ("queue.max_task_bytes",) and within.config.queue.max_task_bytes == 2 * 1024 * 1024
    past = replace(old, queue=replace(old.queue, max_task_bytes=8 * 1024 * 1024),
                                 agents=replace(old.agents, max_message_bytes=0))  # as a file leaving it out
    assert past.agents.max_message_bytes == 8 * 1024 * 1024 + 8192
    p = plan(old, past, {})
    assert set(p.needs_restart) == {"queue.max_task_bytes", "agents.max_message_bytes"} and p.applied == ()
    assert p.config.queue.max_task_bytes == old.queue.max_task_bytes
    assert "agents read frames of at most 4194304 bytes until a restart" in p.reasons["queue.max_task_bytes"]


async def test_daemon_reload_applies_live_settings_and_warns_about_the_rest(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=1)))
    daemon = Daemon(config, shutdown_grace_s=1)
    levels: list[str] = []
    daemon.on_log_level = levels.append
    await daemon.start()
    try:
        assert daemon.reconciler is not None and daemon.api is not None
        new = replace(
            config, log_level="debug",
            scaling=replace(config.scaling, max_instances=2, idle_timeout_s=99.0),
            queue=QueueConfig(max_attempts=7, retry_backoff_s=1.5, retry_backoff_max_s=9.0),
            agents=replace(config.agents, lease_batch_max=11, lease_ttl_s=config.agents.lease_ttl_s * 2,
                           listen_port=free_port(), max_message_bytes=2048),
            api=replace(config.api, socket=str(tmp_path / "elsewhere.sock")),
            state_dir=str(tmp_path / "other-state"),
            providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0, cpus=3),
                                      aws=AwsProviderConfig(secret_key=Secret("hunter2-do-not-log"))),
            source="reloaded.yaml")
        with capture_logs() as logs:
            result = daemon.reload(new)
        assert set(result.applied) == {"log_level", "scaling.max_instances", "scaling.idle_timeout_s",
                                       "queue.max_attempts", "queue.retry_backoff_s", "queue.retry_backoff_max_s",
                                       "agents.lease_batch_max", "agents.lease_ttl_s",
                                       "providers.local.max_instances"}
        assert set(result.needs_restart) == {"agents.listen_port", "agents.max_message_bytes", "api.socket",
                                             "state_dir", "providers.local.cpus", "providers.aws.secret_key"}
        # Applied where it is read: each holder of a copy has the new value.
        assert levels == ["debug"]
        assert daemon.reconciler.config.scaling.max_instances == 2 and daemon.reconciler.limits["local"] == 0
        assert daemon.dispatcher.backoff == (1.5, 9.0) and daemon.dispatcher.batch_max == 11
        assert daemon.dispatcher.ttl_s == config.agents.lease_ttl_s * 2
        assert daemon.api.config.queue.max_attempts == 7
        # Kept: what was bound at start.
        assert daemon.config.state_dir == config.state_dir and daemon.config.api.socket == config.api.socket
        assert daemon.config.agents.listen_port == config.agents.listen_port
        assert daemon.config.providers.aws.secret_key == ""
        assert (await health(config.socket_path))["ok"] is True
        warned = {e["key"] for e in logs if e["event"] == "config_change_needs_restart" and e["log_level"] == "warning"}
        assert warned == set(result.needs_restart)
        assert "hunter2" not in repr(logs), "a secret's value reached the log"
        summary = [e for e in logs if e["event"] == "config_reloaded"]
        assert len(summary) == 1 and set(summary[0]["applied"]) == set(result.applied)
        # A job created now takes the reloaded max_attempts.
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(config.socket_path))) as http:
            async with http.post("http://cloudtaskd/v1/workers", data=bundle(WORKER)) as resp:
                worker = await resp.json()
            async with http.post("http://cloudtaskd/v1/jobs", json={"worker": worker["digest"]}) as resp:
                status, job = resp.status, await resp.json()
        assert status == 201
        row = await daemon.store.fetchone("SELECT max_attempts FROM jobs WHERE id = ?", (job["id"],))
        assert row is not None and row["max_attempts"] == 7
    finally:
        await daemon.stop()


async def test_sighup_reloads_the_file_and_a_bad_file_changes_nothing(tmp_path: Path,
                                                                       notify_socket: NotifySocket) -> None:
    port = free_port()
    settings: dict[str, Any] = {"log_level": "warning", "agents": {"listen_port": port},
                                "scaling": {"max_instances": 8}, "providers": {"local": {"enabled": False}}}
    daemon = DaemonProcess(tmp_path, settings)
    await daemon.start(env=service_env(notify_socket))
    try:
        assert daemon.proc is not None
        await notify_socket.until("READY")
        assert not [e for e in events(daemon.log_path) if e.get("level") == "info"]

        def rewrite(**changes: Any) -> None:
            doc = yaml.safe_load(daemon.config_path.read_text())
            for key, value in changes.items():
                section, _, name = key.rpartition(".")
                (doc.setdefault(section, {}) if section else doc)[name] = value
            daemon.config_path.write_text(yaml.safe_dump(doc))

        rewrite(log_level="info", **{"scaling.max_instances": 3, "agents.listen_port": free_port()})
        good = daemon.config_path.read_text()
        daemon.proc.send_signal(signal.SIGHUP)
        reloading, _ = await notify_socket.until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        ready, _ = await notify_socket.until("READY")
        assert "1 changed key(s) need a restart" in ready["STATUS"]

        async def logged(event: str) -> Any:
            return next((e for e in events(daemon.log_path) if e.get("event") == event), None)
        reloaded = await wait_for(lambda: logged("config_reloaded"), message="config_reloaded logged")
        # Logged at info: it shows only because the new log_level is in force.
        assert set(reloaded["applied"]) == {"log_level", "scaling.max_instances"}
        assert reloaded["needs_restart"] == ["agents.listen_port"]
        restart = await logged("config_change_needs_restart")
        assert restart["key"] == "agents.listen_port" and restart["level"] == "warning"

        # A file that does not load: logged with its file and key, the daemon runs on.
        rewrite(**{"scaling.max_instancs": 2})
        daemon.proc.send_signal(signal.SIGHUP)
        failed = await wait_for(lambda: logged("config_reload_failed"), message="config_reload_failed logged")
        assert str(daemon.config_path) in failed["error"] and "scaling.max_instancs" in failed["error"]
        assert failed["key"] == "scaling.max_instancs" and failed["level"] == "error"
        ready, _ = await notify_socket.until("READY")
        assert "reload failed" in ready["STATUS"]
        assert daemon.proc.poll() is None
        assert (await daemon.get("/v1/health"))["ok"] is True
        daemon.config_path.write_text("{not yaml: [")
        daemon.proc.send_signal(signal.SIGHUP)
        await notify_socket.until("RELOADING")
        await notify_socket.until("READY")
        assert (await daemon.get("/v1/health"))["ok"] is True

        # A reloaded file that others can read and that now holds a secret: warned about, by key only.
        doc = yaml.safe_load(good)  # the file as it was reloaded first, plus secrets
        doc["providers"]["aws"] = {"access_key": "AKIAEXAMPLE", "secret_key": "hunter2-sighup"}
        daemon.config_path.write_text(yaml.safe_dump(doc))
        daemon.config_path.chmod(0o644)
        daemon.proc.send_signal(signal.SIGHUP)
        await notify_socket.until("READY")
        readable = await wait_for(lambda: logged("config_secrets_readable"), message="config_secrets_readable")
        assert "providers.aws.secret_key" in readable["keys"]
        assert "hunter2-sighup" not in daemon.log_path.read_text()
    finally:
        assert await daemon.stop() == 0
    assert events(daemon.log_path)[-1]["event"] == "daemon_stopped"

