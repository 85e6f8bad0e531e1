"""The state disk fills up under a running daemon, then space returns.

A real small disk: a tmpfs of a few MiB mounted as the daemon's state directory (root only; the
tests skip elsewhere with the reason), filled at the right moment by a ballast file that is
removed to give the space back. Real daemon process, real local agents (their logs on that disk
too), real SQLite. What must hold:
- new submissions (jobs, task uploads, worker bundles, `cloudtaskctl submit`) are refused with
  507 and a message saying the state disk is full and where; nothing of them is kept;
- running work is unharmed: the daemon lives on (the systemd watchdog keeps being pinged), health
  and reads answer, agents hold their unacked reports, no task is lost or recorded twice;
- when space returns everything goes on without a restart, and the database is consistent;
- a daemon started on a full disk says so, naming the path, instead of a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudtaskd import tls
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.ctl.main import EXIT_FAILED
from tests import paths
from tests.conftest import UnixApi, wait_for
from tests.integration.test_service import NotifySocket, events, service_env
from tests.procs import DaemonProcess, bundle, free_port

ROOT = paths.ROOT
DISK_BYTES = 64 << 20
LEASE_TTL_S = 3.0  # the outage outlasts several lease lifetimes

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: w:run\n",
    "w.py": "import asyncio\nasync def run(task_id, data):\n    await asyncio.sleep(data.get('sleep', 0.05))\n"
            "    return data['n']\n",
}


# ---- the disk ----

class SmallDisk:
    """A tmpfs of its own, and a ballast file that fills it to the last page."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / "ballast"

    def fill(self, *logs: Path) -> None:
        """Write until the filesystem refuses (again, if something was freed since). Each of logs
        is topped up with blank lines to the end of its last page: appending there needs no new
        page, so the log would otherwise take a few more lines while the disk is full."""
        for path, block in ((self.ballast, b"\0"), *((p, b"\n") for p in logs)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                for size in (1 << 20, 64 << 10, 4 << 10, 512, 1):
                    while True:
                        try:
                            os.write(fd, block * size)
                        except OSError as exc:
                            if exc.errno != errno.ENOSPC:
                                raise
                            break
            finally:
                os.close(fd)

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the state disk needs root (CI runs these tests as root)")
    path = tmp_path / "disk"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount said: {proc.stderr.strip()})")
    try:
        yield SmallDisk(path)
    finally:
        # Lazy: a process of a failed test may still hold a file open there.
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---- helpers ----

def config(**extra: Any) -> dict[str, Any]:
    return {
        "log_level": "info",
        "agents": {"listen_port": free_port(), "lease_ttl_s": LEASE_TTL_S},
        "providers": {"local": {"max_instances": 2, "cpus": 2}},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 120},
        "queue": {"retry_backoff_s": 0.1},
        **extra,
    }


def tasks_body(prefix: str, n: int, start: int = 0, pad: int = 0) -> bytes:
    """Tasks as JSON Lines; padded ones (pad bytes of data each) take room and no time to run."""
    extra = {"pad": "x" * pad, "sleep": 0} if pad else {}
    return "".join(json.dumps({"id": f"{prefix}{i}", "data": {"n": i, **extra}}) + "\n"
                   for i in range(start, start + n)).encode()


async def request(daemon: DaemonProcess, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    assert daemon.session is not None
    async with daemon.session.request(method, f"http://cloudtaskd{path}", **kw) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


def assert_disk_full_refusal(status: int, body: Any, where: Path) -> None:
    assert status == 507, (status, body)
    err = body["error"]
    assert err["type"] == "StoreFull"
    assert "the state disk is full" in err["message"] and str(where) in err["message"], err


async def refused_while_full(disk: SmallDisk, attempt: Any, timeout: float = 30.0) -> tuple[int, Any]:
    """Fill the disk and try until the daemon refuses: the WAL may hold room for a few small
    commits after the filesystem is full (SQLite reuses it after a checkpoint). attempt() returns
    (status, body); an accepted attempt is the caller's to account for."""
    deadline = time.monotonic() + timeout
    while True:
        disk.fill()
        status, body = await attempt()
        if status == 507:
            return status, body
        assert status < 300, (status, body)
        if time.monotonic() > deadline:
            raise AssertionError(f"still accepted after {timeout} s of a full disk: {status} {body}")


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudtaskd.ctl", "--config", str(daemon.config_path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def check_database(db_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert queue.check_counters(db) == []
    assert db.execute("SELECT count(*) FROM uploads WHERE state IN ('staging', 'committing')").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM tasks WHERE state = 'staged'").fetchone()[0] == 0
    once = db.execute("SELECT count(*) FROM (SELECT task_id FROM events WHERE kind = 'task_succeeded'"
                      " GROUP BY task_id HAVING count(*) != 1)").fetchone()[0]
    assert once == 0, "a task has more than one recorded result"
    return db


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


# ---- the tests ----

@pytest.mark.timeout(900)  # soak mode: four outages over 2000 tasks (CI mode takes ~20 s)
async def test_full_state_disk_refuses_new_work_keeps_running_work_and_recovers(
        tmp_path: Path, disk: SmallDisk, notify: NotifySocket, soak: bool) -> None:
    outages = 4 if soak else 1
    n_tasks = 2000 if soak else 400
    daemon = DaemonProcess(disk.path, config())
    daemon.log_path = tmp_path / "daemon.log"  # as under systemd: the journal, not the state disk
    state = daemon.state_dir
    # The watchdog on: a daemon that withheld its pings during the outage would be killed by systemd.
    await daemon.start(env=service_env(notify, WATCHDOG_USEC="1000000"))
    expected: set[str] = set()
    refusals = accepted_while_full = committed_while_full = 0
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "disk", "worker": worker["digest"]})
        job_path = f"/v1/jobs/{job['id']}"
        await daemon.post(f"{job_path}/tasks", data=tasks_body("t", n_tasks))
        expected |= {f"t{i}" for i in range(n_tasks)}

        for outage in range(outages):
            mark = (outage + 1) * n_tasks // (outages + 3)

            async def progressed(mark: int = mark) -> bool:
                return bool((await daemon.get(job_path))["counts"]["succeeded"] >= mark)
            await wait_for(progressed, timeout=60, message=f"{mark} tasks done")
            disk.fill()
            filled_at = time.monotonic()
            notify.drain()

            # A task upload: refused whole, with 507 naming the state disk.
            attempt = 0
            while True:
                disk.fill()
                attempt += 1
                prefix = f"late{outage}-{attempt}-"
                # Padded: room left inside the database and its WAL is used up in a few attempts.
                status, body = await request(daemon, "POST", f"{job_path}/tasks",
                                             data=tasks_body(prefix, 200, pad=2000))
                if status == 507:
                    break
                assert status == 200, (status, body)
                accepted_while_full += 1
                expected.update(f"{prefix}{i}" for i in range(200))
                assert time.monotonic() - filled_at < 30, "uploads still accepted on a full disk"
            assert_disk_full_refusal(status, body, state)
            refusals += 1
            at_refusal = (await daemon.get(job_path))["counts"]
            assert at_refusal["leased"] > 0, "no work was running when the disk filled up"

            # A new job, a new worker bundle, and cloudtaskctl submit: each refused, nothing kept.
            created: list[int] = []

            async def new_job(created: list[int] = created) -> tuple[int, Any]:
                status, body = await request(daemon, "POST", "/v1/jobs", json={"name": "x", "worker": worker["digest"]})
                if status == 201:
                    created.append(body["id"])
                return status, body
            status, body = await refused_while_full(disk, new_job)
            assert_disk_full_refusal(status, body, state)
            status, body = await refused_while_full(disk, lambda o=outage: request(
                daemon, "POST", "/v1/workers", data=bundle({**WORKER, "v.txt": f"{o}\n" * 50_000})))
            assert_disk_full_refusal(status, body, state / "workers")
            assert not [p.name for p in (state / "workers").iterdir() if ".incoming-" in p.name or
                        p.name.endswith(".partial")], "a refused bundle left files behind"
            refusals += 2
            tasks_file = tmp_path / "more.jsonl"
            tasks_file.write_bytes(tasks_body("ctl", 10))
            worker_dir = tmp_path / "worker"
            worker_dir.mkdir(exist_ok=True)
            for name, text in WORKER.items():
                (worker_dir / name).write_text(text)
            disk.fill()
            jobs_before = len((await daemon.get("/v1/jobs"))["jobs"])
            out = await asyncio.to_thread(ctl, daemon, "submit", "--worker", str(worker_dir), "--tasks",
                                          str(tasks_file))
            assert out.returncode == EXIT_FAILED, out
            assert out.stderr.startswith("cloudtaskctl: the state disk is full") and str(state) in out.stderr, out
            assert "Traceback" not in out.stderr
            assert len((await daemon.get("/v1/jobs"))["jobs"]) == jobs_before
            refusals += 1

            # Meanwhile: the daemon lives, answers health and reads, and keeps pinging the watchdog,
            # through several lease lifetimes (what the agents hold must outlive them).
            pings = 0
            while time.monotonic() - filled_at < 3 * LEASE_TTL_S:
                disk.fill()
                pings += sum(m.get("WATCHDOG") == "1" for m in notify.drain())
                assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon exited"
                assert (await daemon.get("/v1/health"))["ok"] is True
                assert (await daemon.get(job_path))["id"] == job["id"]
                await daemon.get("/v1/events?limit=10")
                await asyncio.sleep(0.2)
            # Pinged every 0.5 s: at least half of them while the disk was full (the notify socket
            # holds only ~10 unread messages, so the ones sent while the test waited on a command
            # may be lost).
            assert pings >= 3 * LEASE_TTL_S / 0.5 / 2, f"the watchdog was pinged {pings} times in the outage"
            # Results may still commit now and then while the filesystem is full (a round that only
            # rewrites existing pages fits into WAL room a checkpoint freed); the rest are held by
            # the agents. Either way each is recorded once (checked at the end).
            committed_while_full += (await daemon.get(job_path))["counts"]["succeeded"] - at_refusal["succeeded"]

            # Space returns: no restart, the held reports commit, new work is accepted again.
            disk.free()
            for job_id in created:  # created before the disk filled up: empty jobs, put away
                await daemon.post(f"/v1/jobs/{job_id}/cancel")
            prefix = f"again{outage}-"
            await daemon.post(f"{job_path}/tasks", data=tasks_body(prefix, 100))
            expected.update(f"{prefix}{i}" for i in range(100))
            await daemon.post("/v1/workers", data=bundle({**WORKER, "v.txt": f"{outage}\n"}))

        async def done() -> bool:
            return bool((await daemon.get(job_path))["done"])
        await wait_for(done, timeout=120, message="the job done after the outages")
        results = [json.loads(line) for line in (await daemon.get(f"{job_path}/results")).splitlines()]
        assert (await daemon.stop()) == 0
    finally:
        await daemon.stop()
        disk.free()

    keys = [r["id"] for r in results]
    assert len(keys) == len(set(keys)), "a task was recorded twice"
    missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    assert all(r["status"] == "succeeded" for r in results)
    db = check_database(state / "cloudtask.db")
    try:
        assert db.execute("SELECT count(*) FROM events WHERE kind = 'task_succeeded'").fetchone()[0] == len(expected)
        # The leases outlived the outage: the held heartbeats and results were applied before expiry.
        assert db.execute("SELECT kind, count(*) FROM events WHERE kind IN ('lease_expired', 'lease_expired_dead',"
                          " 'task_failed') GROUP BY kind").fetchall() == []
    finally:
        db.close()
    log = events(daemon.log_path)
    names = [e.get("event") for e in log]
    # Once per outage, not once per dispatch round or reconciler tick.
    assert names.count("state_disk_full") == outages, [e for e in log if e.get("event") == "state_disk_full"]
    assert names.count("state_disk_writable_again") == outages
    assert names.count("request_refused_disk_full") == refusals
    for bad in ("dispatch_round_failed", "reconcile_failed", "background_task_died", "watchdog_ping_withheld"):
        assert bad not in names, [e for e in log if e.get("event") == bad]
    assert not [e for e in log if "raw" in e], "the daemon printed something that is not a log line"
    print(f"disk-full outages: {outages}; tasks: {len(expected)}; refusals: {refusals}; uploads that still"
          f" fitted into the database's own free room: {accepted_while_full}; results committed while full:"
          f" {committed_while_full}")


async def test_an_upload_cut_by_a_full_disk_is_rolled_back_whole(tmp_path: Path, disk: SmallDisk) -> None:
    """More than one staging batch: the first is staged, then the disk fills and the second is
    refused. The staged rows go (once the store can delete them), the upload is refused whole."""
    batch = queue.STAGE_BATCH
    daemon = DaemonProcess(disk.path, config(providers={"local": {"enabled": False}}))
    daemon.log_path = tmp_path / "daemon.log"
    await daemon.start()
    try:
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "cut", "worker": worker["digest"]})
        job_path = f"/v1/jobs/{job['id']}"

        async def body() -> AsyncIterator[bytes]:
            yield tasks_body("u", batch + 100)

            async def staged() -> bool:
                return bool((await daemon.get(job_path))["counts"]["staged"] >= batch)
            await wait_for(staged, timeout=30, message="the first batch staged")
            disk.fill()
            for start in range(batch + 100, 3 * batch, 1000):
                yield tasks_body("u", 1000, start)

        status, refused = await request(daemon, "POST", f"{job_path}/tasks", data=body())
        assert_disk_full_refusal(status, refused, daemon.state_dir)
        held = (await daemon.get(job_path))["counts"]
        # Deleting the staged rows needs room too: until then they wait, invisible to leasing. Whole
        # batches only (a second may fit in pages the database already had when the disk filled).
        assert held["queued"] == 0 and held["staged"] % batch == 0, held
        disk.free()

        async def discarded() -> bool:
            return bool((await daemon.get(job_path))["counts"]["staged"] == 0)
        await wait_for(discarded, timeout=30, message="the cut upload's staged rows discarded")
        # The same file is taken whole once there is room: no id clashes with a leftover.
        accepted = await daemon.post(f"{job_path}/tasks", data=tasks_body("u", 3 * batch))
        assert accepted == {"accepted": 3 * batch}
        assert (await daemon.get(job_path))["counts"]["queued"] == 3 * batch
        assert (await daemon.stop()) == 0
    finally:
        await daemon.stop()
        disk.free()
    db = check_database(daemon.state_dir / "cloudtask.db")
    try:
        states = db.execute("SELECT state, count(*) FROM uploads GROUP BY state ORDER BY state").fetchall()
        assert states == [("committed", 1), ("rejected", 1)]
    finally:
        db.close()
    print(f"cut upload: {batch} tasks staged then discarded; held while full: {held['staged']}")


async def test_a_daemon_started_on_a_full_disk_says_so_and_starts_once_there_is_room(
        tmp_path: Path, disk: SmallDisk) -> None:
    daemon = DaemonProcess(disk.path, config())
    daemon.log_path = tmp_path / "daemon.log"
    disk.fill()
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            await daemon.start(timeout_s=30)
        assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 1
        log = events(daemon.log_path)
        failed = [e for e in log if e.get("event") == "daemon_start_failed"]
        assert len(failed) == 1, log
        message = failed[0]["error"]
        assert message.startswith("the state disk is full") and str(daemon.state_dir) in message, message
        assert "start cloudtaskd again" in message
        assert not [e for e in log if "raw" in e or "exception" in e], "a traceback instead of a message"

        disk.free()  # whatever the failed start left behind must not stop the next one
        await daemon.start()
        worker = await daemon.post("/v1/workers", data=bundle(WORKER))
        job = await daemon.post("/v1/jobs", json={"name": "after", "worker": worker["digest"]})
        await daemon.post(f"/v1/jobs/{job['id']}/tasks", data=tasks_body("a", 20))

        async def done() -> bool:
            return bool((await daemon.get(f"/v1/jobs/{job['id']}"))["done"])
        await wait_for(done, timeout=60, message="a job on the daemon started after the full disk")
        assert (await daemon.stop()) == 0

        # A restart on a full disk, its state there: whatever it must write first fails, clearly.
        shutil.rmtree(daemon.state_dir / "tls")  # to be made again: more to write
        disk.fill()
        daemon.log_path.write_text("")
        with pytest.raises(RuntimeError, match="did not start"):
            await daemon.start(timeout_s=30)
        assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 1
        log = events(daemon.log_path)
        failed = [e for e in log if e.get("event") == "daemon_start_failed"]
        assert len(failed) == 1 and failed[0]["error"].startswith("the state disk is full"), log
        assert str(daemon.state_dir) in failed[0]["error"]
        assert not [e for e in log if "raw" in e or "exception" in e], "a traceback instead of a message"
        disk.free()
        await daemon.start()
        assert (await daemon.get(f"/v1/jobs/{job['id']}"))["done"] is True
        assert (await daemon.stop()) == 0
    finally:
        await daemon.stop()
        disk.free()
    check_database(daemon.state_dir / "cloudtask.db").close()


def test_a_ca_cut_by_a_full_disk_is_made_again_once_there_is_room(disk: SmallDisk) -> None:
    """The daemon's first start makes its CA: key, then certificate. A disk with room for the key
    only must not leave half a CA, which every later start refuses (it cannot tell it from a
    damaged CA that agents trust)."""
    tls_dir = disk.path / "tls"
    disk.fill()
    with open(disk.ballast, "r+b") as f:  # one page back: room for the key, not for the certificate
        f.truncate(os.path.getsize(disk.ballast) - 4096)
    with pytest.raises(OSError) as err:
        tls.ensure(tls_dir, ["127.0.0.1"], label="disk")
    assert err.value.errno == errno.ENOSPC
    assert not (tls_dir / "ca.key").exists() and not (tls_dir / "ca.pem").exists()
    disk.free()
    files = tls.ensure(tls_dir, ["127.0.0.1"], label="disk")
    assert files.ca_cert.exists() and files.cert.exists() and files.key.exists()
    assert sorted(p.name for p in tls_dir.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


@pytest.mark.timeout(600)  # soak mode: 1500 tasks (CI mode takes ~16 s)
async def test_cloudtaskctl_run_outlives_a_full_disk_under_its_own_daemon_and_log(
        tmp_path: Path, disk: SmallDisk, soak: bool) -> None:
    """`cloudtaskctl run` with no daemon running embeds one, whose log is <state_dir>/cloudtaskd.log:
    on the full disk too. The run goes on through the outage and ends with every result once."""
    n_tasks = 1500 if soak else 300
    state = disk.path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(state), **config()}))
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    for name, text in WORKER.items():
        (worker_dir / name).write_text(text)
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_bytes(tasks_body("r", n_tasks))
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudtaskd.ctl", "--config", str(cfg), "run", "--worker", str(worker_dir),
         "--tasks", str(tasks_file), "--results", str(results)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    api: UnixApi | None = None
    try:
        async def started() -> bool:
            return (state / "cloudtaskd.sock").exists()
        await wait_for(started, timeout=60, message="the embedded daemon's socket")
        api = UnixApi(state / "cloudtaskd.sock")

        async def progressed() -> bool:
            status, body = await api.request("GET", "/v1/jobs/1") if api is not None else (0, None)
            return status == 200 and body["counts"]["succeeded"] >= n_tasks // 4
        await wait_for(progressed, timeout=60, message="a quarter of the run done")
        daemon_log = state / "cloudtaskd.log"
        disk.fill(daemon_log)
        filled_at = time.monotonic()
        while time.monotonic() - filled_at < 3 * LEASE_TTL_S:
            disk.fill(daemon_log)
            assert proc.poll() is None, proc.communicate()
            status, _ = await api.request("GET", "/v1/health")
            assert status == 200
            await asyncio.sleep(0.2)
        disk.free()
        out, err = await asyncio.to_thread(proc.communicate, timeout=90)
    finally:
        if api is not None:
            await api.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        disk.free()
    assert proc.returncode == 0, (out, err)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [r["id"] for r in lines]
    assert len(keys) == len(set(keys)) == n_tasks and all(r["status"] == "succeeded" for r in lines)
    check_database(state / "cloudtask.db").close()
    log = [e for e in events(state / "cloudtaskd.log") if e.get("raw", "x").strip()]  # the blank padding out
    names = [e.get("event") for e in log]
    # What could not be written for lack of space is counted once there is room, and the recovery
    # is logged.
    assert "state_disk_full" in names and "state_disk_writable_again" in names
    assert "background_task_died" not in names and "dispatch_round_crashed" not in names
