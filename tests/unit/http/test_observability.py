"""Observability through a real daemon: /metrics (parsed as Prometheus parses it), the event log
and `cloudtaskctl events --follow`, and the status page in headless Chromium."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudtask_wire.workerspec import WorkerSpec
from cloudtaskd.config import ApiConfig, Config, LocalProviderConfig, ProvidersConfig, Secret
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.store import Store
from cloudtaskd.core.tables.events import ERROR_KINDS_SQL
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import CapacityError, QuotaExceeded
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.orchestrator.selection import Candidate
from cloudtaskd.fleet.providers.base import CloudInstance, LaunchSpec, Offer
from tests.conftest import ROOT, UnixApi, make_config, wait_for
from tests.procs import bundle

# Tasks wait for a flag file, so a test sees the job mid-way and then lets it finish.
FLAG_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": (
        "import asyncio, os\n"
        "async def run(task_id, data):\n"
        "    while not os.path.exists(data['flag']):\n"
        "        await asyncio.sleep(0.02)\n"
        "    return {'n': data['n']}\n"
    ),
}
TOKEN = "status-page-token-0123456789abcdef"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and each family's type: what a Prometheus scrape sees.
    The parser raises on anything that is not valid exposition text."""
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(api: UnixApi) -> tuple[Samples, dict[str, str]]:
    async with api.session.get("http://cloudtaskd/metrics") as resp:
        assert resp.status == 200
        # Prometheus' text format (0.0.4 unless the scraper asks for OpenMetrics).
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), resp.headers["Content-Type"]
        return parse(await resp.text())


async def submit(api: UnixApi, worker: dict[str, str], tasks: list[dict[str, Any]], name: str = "t") -> int:
    status, body = await api.request("POST", "/v1/workers", data=bundle(worker))
    assert status == 200, body
    status, job = await api.request("POST", "/v1/jobs", json={"name": name, "worker": body["digest"]})
    assert status == 201, job
    if tasks:
        text = "".join(json.dumps(t) + "\n" for t in tasks)
        status, body = await api.request("POST", f"/v1/jobs/{job['id']}/tasks", data=text.encode())
        assert status == 200, body
    return int(job["id"])


def flag_tasks(flag: Path, n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "data": {"n": i, "flag": str(flag)}} for i in range(n)]


async def job_done(api: UnixApi, job_id: int) -> dict[str, Any] | None:
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    return job if job["done"] else None


def config(tmp_path: Path, **overrides: Any) -> Config:
    # 4 slots (and 4 prefetched) on any host: one local agent takes a 5-task job at once.
    return make_config(tmp_path, providers=ProvidersConfig(local=LocalProviderConfig(cpus=4)), **overrides)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi]]:
    d = Daemon(config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


# ---- /metrics ---------------------------------------------------------------------------------


async def test_metrics_move_with_a_job_run_through_the_daemon(daemon: tuple[Daemon, UnixApi],
                                                              tmp_path: Path) -> None:
    _, api = daemon
    before, types = await scrape(api)
    for name, kind in (("cloudtask_tasks", "gauge"), ("cloudtask_jobs", "gauge"), ("cloudtask_instances", "gauge"),
                       ("cloudtask_leases_granted", "counter"), ("cloudtask_reports", "counter"),
                       ("cloudtask_lease_wait_seconds", "histogram"), ("cloudtask_provisioning_errors", "counter"),
                       ("cloudtask_spot_interruptions", "counter"), ("cloudtask_cost_per_hour_usd", "gauge"),
                       ("cloudtask_spent_usd", "gauge"), ("cloudtask_agents_connected", "gauge")):
        assert types.get(name) == kind, (name, types.get(name))
    assert value(before, "cloudtask_leases_granted_total") == 0
    assert value(before, "cloudtask_tasks", state="queued") == 0

    flag = tmp_path / "go"
    job_id = await submit(api, FLAG_WORKER, flag_tasks(flag, 5))

    async def holding() -> Samples | None:
        samples, _ = await scrape(api)
        running = value(samples, "cloudtask_instances", provider="local", machine_type="local", state="running")
        # The counter moves once the round that committed the leases resumes: a scrape can land
        # between that commit and it (seen on a loaded machine), so wait for both.
        return samples if (running >= 1 and value(samples, "cloudtask_tasks", state="leased") == 5
                           and value(samples, "cloudtask_leases_granted_total") >= 5) else None

    mid = await wait_for(holding, message="a local instance running and holding all 5 leases")
    assert value(mid, "cloudtask_tasks", state="succeeded") == value(mid, "cloudtask_tasks", state="queued") == 0
    assert value(mid, "cloudtask_jobs", state="active") == 1
    assert value(mid, "cloudtask_agents_connected") >= 1
    # Nothing is left to grant while the tasks wait: the counter is exact.
    assert value(mid, "cloudtask_leases_granted_total") == 5

    flag.touch()
    await wait_for(lambda: job_done(api, job_id), message="job done")
    after, _ = await scrape(api)
    assert value(after, "cloudtask_tasks", state="succeeded") == 5
    assert sum(value(after, "cloudtask_tasks", state=s) for s in ("staged", "queued", "leased", "failed")) == 0
    assert value(after, "cloudtask_jobs", state="done") == 1 and value(after, "cloudtask_jobs", state="active") == 0
    assert value(after, "cloudtask_leases_granted_total") >= 5
    assert value(after, "cloudtask_reports_total", outcome="accepted") >= 5
    assert value(after, "cloudtask_reports_total", outcome="refused") == 0
    assert value(after, "cloudtask_lease_wait_seconds_count") >= 1
    assert value(after, "cloudtask_lease_wait_seconds_bucket", le="+Inf") == value(
        after, "cloudtask_lease_wait_seconds_count")
    assert value(after, "cloudtask_dispatch_rounds_total") > value(before, "cloudtask_dispatch_rounds_total")
    # The local provider is free: it is listed, at zero.
    assert ("cloudtask_spent_usd", (("provider", "local"),)) in after
    assert value(after, "cloudtask_cost_per_hour_usd", provider="local") == 0.0


async def test_a_second_daemon_in_the_process_has_its_own_counters(daemon: tuple[Daemon, UnixApi],
                                                                   tmp_path: Path) -> None:
    _, api = daemon
    flag = tmp_path / "go"
    flag.touch()
    job_id = await submit(api, FLAG_WORKER, flag_tasks(flag, 3))
    await wait_for(lambda: job_done(api, job_id), message="job done")
    other = Daemon(config(tmp_path / "other"), shutdown_grace_s=5)
    await other.start()
    other_api = UnixApi(other.config.socket_path)
    try:
        mine, _ = await scrape(api)
        theirs, _ = await scrape(other_api)
        assert value(mine, "cloudtask_leases_granted_total") >= 3
        assert value(theirs, "cloudtask_leases_granted_total") == 0
        assert value(theirs, "cloudtask_tasks", state="succeeded") == 0
    finally:
        await other_api.close()
        await other.stop()


async def test_openmetrics_is_served_when_asked_for(daemon: tuple[Daemon, UnixApi]) -> None:
    _, api = daemon
    async with api.session.get("http://cloudtaskd/metrics",
                               headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await resp.text()
    assert text.rstrip().endswith("# EOF") and "cloudtask_tasks" in text


async def test_the_scrape_reads_jobs_instances_cost_and_interruptions_from_the_store(tmp_path: Path) -> None:
    """Known rows in, exact figures out: the gauges are the jobs' counters and costs.fleet."""
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        def rows(tx: Any) -> None:
            db = tx.db
            db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/', 0)")
            jobs = ((1, "active", (0, 3, 2, 1, 4, 0, 0)), (2, "active", (0, 0, 0, 0, 7, 1, 0)),
                    (3, "cancelled", (0, 0, 0, 0, 1, 0, 5)), (4, "paused", (0, 6, 0, 0, 0, 0, 0)))
            for job_id, state, counts in jobs:
                db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, n_staged, n_queued,"
                           " n_leased, n_failed, n_succeeded, n_dead, n_cancelled) VALUES (?, 'j', 1, ?, 0, 3,"
                           " ?, ?, ?, ?, ?, ?, ?)", (job_id, state, *counts))
            hour = 3600.0
            for inst, provider, machine_type, state, price, created, ended in (
                    ("aws-a", "aws", "c5.large", "running", 0.10, now - 2 * hour, None),
                    ("aws-b", "aws", "c5.large", "running", 0.10, now - hour, None),
                    ("aws-c", "aws", "m5.large", "stopped", 0.20, now - 3 * hour, now - hour),
                    ("gcp-a", "gcp", "e2-standard-2", "starting", 0.05, now - hour, None)):
                offer = json.dumps({"machine_type": machine_type, "key": f"{provider}/z/{machine_type}/spot"})
                db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer,"
                           " price_per_hour, created_at, state_changed_at, ended_at) VALUES (?, ?, 1, ?, 2, 'h', ?, ?,"
                           " ?, ?, ?)", (inst, provider, state, offer, price, created, created, ended))
            for inst, kind in (("aws-a", "interruption"), ("aws-c", "interruption"), ("aws-b", "rebalance"),
                               ("gcp-a", "interruption")):
                db.execute("INSERT INTO interruptions (instance_id, offer_key, kind, source, noticed_at)"
                           " VALUES (?, ?, ?, 'provider', 0)", (inst, f"{inst[:3]}/z/t/spot", kind))

        now = time.time()
        await store.write(rows)
        text, _ = await Metrics().render(store, sessions=2, rounds=7)
        samples, _ = parse(text.decode())
        assert {s: value(samples, "cloudtask_tasks", state=s) for s in ("staged", "queued", "leased", "failed",
                                                                        "succeeded", "dead", "cancelled")} == {
            "staged": 0, "queued": 9, "leased": 2, "failed": 1, "succeeded": 12, "dead": 1, "cancelled": 5}
        assert {s: value(samples, "cloudtask_jobs", state=s) for s in ("active", "done", "paused", "cancelled")} == {
            "active": 1, "done": 1, "paused": 1, "cancelled": 1}
        assert value(samples, "cloudtask_instances", provider="aws", machine_type="c5.large", state="running") == 2
        assert value(samples, "cloudtask_instances", provider="gcp", machine_type="e2-standard-2",
                     state="starting") == 1
        assert not any(k[0] == "cloudtask_instances" and ("state", "stopped") in k[1] for k in samples)
        assert value(samples, "cloudtask_cost_per_hour_usd", provider="aws") == pytest.approx(0.20)
        assert value(samples, "cloudtask_cost_per_hour_usd", provider="gcp") == pytest.approx(0.05)
        # 0.10 x 2 h + 0.10 x 1 h + 0.20 x 2 h (ended an hour ago), to the scrape's now.
        assert value(samples, "cloudtask_spent_usd", provider="aws") == pytest.approx(0.70, rel=1e-3)
        assert value(samples, "cloudtask_spot_interruptions_total", provider="aws") == 2  # not the rebalance
        assert value(samples, "cloudtask_spot_interruptions_total", provider="gcp") == 1
        assert value(samples, "cloudtask_agents_connected") == 2
        assert value(samples, "cloudtask_dispatch_rounds_total") == 7
    finally:
        await store.close()


class Refusing:
    """A provider that refuses every launch with the errors it is given, in turn."""

    name = "refusing"

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors

    def offers(self) -> list[Offer]:
        # Free and bigger than any local host: ranked before the local provider.
        return [Offer(self.name, "huge", "nowhere", False, 4096, price_per_hour=0.0)]

    async def launch(self, spec: LaunchSpec) -> CloudInstance:
        raise self.errors.pop(0) if len(self.errors) > 1 else self.errors[0]

    async def terminate(self, instance_id: str) -> None:
        pass

    async def list_instances(self) -> list[CloudInstance]:
        return []

    async def close(self) -> None:
        pass


async def test_a_refused_launch_counts_its_kind_and_the_job_runs_elsewhere(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    own = Daemon._providers

    def providers(self: Daemon) -> list[Any]:
        return [(Refusing([CapacityError("refusing", "launch", "no capacity in nowhere")]), 1), *own(self)]

    monkeypatch.setattr(Daemon, "_providers", providers)
    d = Daemon(config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        flag = tmp_path / "go"
        flag.touch()
        job_id = await submit(api, FLAG_WORKER, flag_tasks(flag, 4))
        job = await wait_for(lambda: job_done(api, job_id), message="job done on the local provider")
        assert job["counts"]["succeeded"] == 4
        samples, _ = await scrape(api)
        refused = value(samples, "cloudtask_provisioning_errors_total", provider="refusing", kind="CapacityError")
        _, body = await api.request("GET", "/v1/instances?all=1")
        launch_failed = [i for i in body["instances"] if i["provider"] == "refusing"]
        assert refused == len(launch_failed) >= 1
        assert value(samples, "cloudtask_provisioning_errors_total", provider="local", kind="CapacityError") == 0
    finally:
        await api.close()
        await d.stop()


async def test_failed_launches_and_starts_count_by_provider_and_kind(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        cfg = Config(state_dir=str(tmp_path))
        provider = Refusing([QuotaExceeded("refusing", "launch", "vCPU quota"),
                             CapacityError("refusing", "launch", "no capacity"), RuntimeError("install failed")])
        reconciler = Reconciler(store=store, dispatcher=(disp := Dispatcher(store, cfg)),  # type: ignore[list-item]
                                providers=[(provider, 5)], config=cfg, agent_url="ws://x", metrics=disp.metrics,
                                sessions=disp.sessions)
        cand = Candidate(provider.offers()[0], 1, 0.0)
        pool = {"path": str(tmp_path), "digest": "d",
                "spec": WorkerSpec.from_dict({"mode": "python", "function": "work:run"})}
        for _ in range(3):
            await reconciler._launch(provider, 1, cand, pool)  # type: ignore[arg-type]
        text, _ = await reconciler.metrics.render(store, sessions=0, rounds=0)
        samples, _ = parse(text.decode())
        errors = {dict(k[1])["kind"]: v for k, v in samples.items() if k[0] == "cloudtask_provisioning_errors_total"}
        # A ProviderError by its class; anything else (an install that failed) by its own.
        assert errors == {"QuotaExceeded": 1, "CapacityError": 1, "RuntimeError": 1}
    finally:
        await store.close()


# ---- events -----------------------------------------------------------------------------------


async def ctl_proc(d: Daemon, *args: str) -> asyncio.subprocess.Process:
    config = d.config.state_path.parent / "ctl.yaml"
    config.write_text(f"state_dir: {d.config.state_path}\n")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudtaskd.ctl", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


async def ctl(d: Daemon, *args: str) -> tuple[int, str, str]:
    proc = await ctl_proc(d, *args)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def read_line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line, "cloudtaskctl events ended early"
    event: dict[str, Any] = json.loads(line)
    return event


async def test_events_follow_sees_new_events_and_keeps_to_its_filter(daemon: tuple[Daemon, UnixApi]) -> None:
    d, api = daemon
    one = await submit(api, FLAG_WORKER, [], name="one")
    two = await submit(api, FLAG_WORKER, [], name="two")
    proc = await ctl_proc(d, "events", "--follow", "--job", str(two), "--json")
    try:
        first = await read_line(proc)  # the history: the newest events of job two
        assert first["kind"] == "job_created" and first["job_id"] == two
        # Recorded after it started: one event of another job, then one of job two.
        await api.request("POST", f"/v1/jobs/{one}/cancel")
        await api.request("POST", f"/v1/jobs/{two}/cancel")
        nxt = await read_line(proc)
        assert nxt["kind"] == "job_cancelled" and nxt["job_id"] == two and nxt["id"] > first["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err


async def test_events_after_and_instance_filters(daemon: tuple[Daemon, UnixApi]) -> None:
    d, api = daemon
    job_id = await submit(api, FLAG_WORKER, [], name="filters")
    _, worker = await api.request("POST", "/v1/workers", data=bundle(FLAG_WORKER))
    _, inst = await api.request("POST", "/v1/instances", json={"worker": worker["digest"], "slots": 1})
    _, page = await api.request("GET", "/v1/events?tail=1000")
    created = next(e for e in page["events"] if e["kind"] == "job_created" and e["job_id"] == job_id)

    rc, out, err = await ctl(d, "events", "--after", str(created["id"]), "--json")
    assert rc == 0, err
    later = [json.loads(line) for line in out.splitlines()]
    assert later and all(e["id"] > created["id"] for e in later)
    assert [e["kind"] for e in later] == ["instance_registered"]

    rc, out, err = await ctl(d, "events", "--instance", inst["id"], "--json")
    assert rc == 0, err
    assert [(e["kind"], e["instance_id"]) for e in map(json.loads, out.splitlines())] == [
        ("instance_registered", inst["id"])]

    rc, out, err = await ctl(d, "events", "--job", str(job_id))  # the human form: one line per event
    assert rc == 0, err
    lines = out.splitlines()
    # The job's own events and those of the instances serving its worker (this registered one).
    assert len(lines) == 2, lines
    assert "job_created" in lines[0] and f"job={job_id}" in lines[0] and '"filters"' in lines[0]
    assert "instance_registered" in lines[1] and f"instance={inst['id']}" in lines[1]


async def test_a_long_poll_answers_when_an_event_is_recorded(daemon: tuple[Daemon, UnixApi]) -> None:
    _, api = daemon
    _, page = await api.request("GET", "/v1/events?tail=1")
    cursor = page["next"]
    poll = asyncio.create_task(api.request("GET", f"/v1/events?after={cursor}&wait=30"))
    await asyncio.sleep(0)  # let the request go out first; the poll must be waiting, not answered
    job_id = await submit(api, FLAG_WORKER, [], name="wake")
    status, body = await poll
    assert status == 200 and body["events"], body
    first = body["events"][0]
    assert first["id"] > cursor and (first["kind"], first["job_id"]) == ("job_created", job_id)
    assert body["next"] >= body["events"][-1]["id"]
    # Nothing new: an empty answer at the end of the wait, with the same cursor.
    status, body = await api.request("GET", f"/v1/events?after={body['next']}&wait=0.2&job={job_id + 1}")
    assert status == 200 and body["events"] == []
    status, body = await api.request("GET", "/v1/events?after=1&tail=5")
    assert status == 400 and body["error"]["field"] == "tail"


async def test_a_filtered_follower_is_not_sent_the_same_stretch_twice(daemon: tuple[Daemon, UnixApi]) -> None:
    _, api = daemon
    await submit(api, FLAG_WORKER, [], name="noise")
    _, page = await api.request("GET", "/v1/events?after=0&job=999999")
    last = (await api.request("GET", "/v1/events?tail=1"))[1]["events"][-1]["id"]
    # No event matched, yet the cursor moved past every event the read covered.
    assert page["events"] == [] and page["next"] == last
    _, full = await api.request("GET", "/v1/events?after=0&limit=1")
    assert len(full["events"]) == 1 and full["next"] == full["events"][0]["id"]


async def test_recent_errors_use_their_partial_index(tmp_path: Path) -> None:
    """The status page's error query must not scan the events table: the index holds exactly
    ERROR_KINDS (a kind added to one and not the other fails here), and recording any other event
    never touches it."""
    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        def plan(db: sqlite3.Connection) -> str:
            rows = db.execute(f"EXPLAIN QUERY PLAN SELECT * FROM events WHERE {ERROR_KINDS_SQL} ORDER BY id DESC"
                              " LIMIT 20").fetchall()
            return " ".join(str(r[-1]) for r in rows)

        assert "USING INDEX events_errors" in await store.read(plan)

        def record(tx: Any) -> None:
            for kind in ("lease_granted", "task_succeeded", "task_dead", "instance_lost"):
                tx.event(kind)

        await store.write(record)
        indexed = await store.read(lambda db: [r[0] for r in db.execute(
            f"SELECT kind FROM events INDEXED BY events_errors WHERE {ERROR_KINDS_SQL} ORDER BY id")])
        assert indexed == ["task_dead", "instance_lost"]
    finally:
        await store.close()


# ---- the status page --------------------------------------------------------------------------


async def test_the_status_summary_over_the_socket_needs_no_token(daemon: tuple[Daemon, UnixApi],
                                                                 tmp_path: Path) -> None:
    _, api = daemon
    job_id = await submit(api, FLAG_WORKER, [{"id": "bad", "data": {"n": 1}}], name="broken")  # no flag: KeyError
    await wait_for(lambda: job_done(api, job_id), message="job done")
    status, body = await api.request("GET", "/v1/status")
    assert status == 200
    job = next(j for j in body["jobs"] if j["id"] == job_id)
    assert job["name"] == "broken" and job["finished"] == job["total"] == 1 and job["counts"]["dead"] == 1
    assert job["outcome"] == "failed"  # as GET /v1/jobs/{id} says it: never a bare `done`
    assert any(e["kind"] == "task_dead" and e["job_id"] == job_id and "flag" in e["detail"] and e["task_key"] == "bad"
               for e in body["errors"])
    assert set(body["cost"]) >= {"spent", "rate_per_hour", "providers"}
    status, html = await api.request("GET", "/status")
    assert status == 200 and "<script>" in html and "broken" not in html  # the shell holds no data


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def tcp_daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi]]:
    d = Daemon(config(tmp_path, api=ApiConfig(listen="127.0.0.1:0", token=Secret(TOKEN))), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def test_over_tcp_only_the_page_shell_goes_without_the_token(tcp_daemon: tuple[Daemon, UnixApi]) -> None:
    import ssl

    import aiohttp

    d, _ = tcp_daemon
    ctx = ssl.create_default_context(cafile=str(d.config.state_path / "tls" / "ca.pem"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        for path in ("/metrics", "/v1/status", "/v1/events"):
            async with http.get(d.api_url + path) as resp:
                assert resp.status == 401, path
            async with http.get(d.api_url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200, path
        async with http.get(d.api_url + "/status") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
            assert TOKEN not in await resp.text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                 "(install.sh installs it); the status page needs a browser")
@pytest.mark.timeout(180)
async def test_the_status_page_renders_updates_and_escapes(tcp_daemon: tuple[Daemon, UnixApi],
                                                           tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    d, api = tcp_daemon
    assert d.api_url.startswith("https://")
    flag = tmp_path / "go"
    job_id = await submit(api, FLAG_WORKER, flag_tasks(flag, 4), name="render me")
    evil = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    evil_id = await submit(api, FLAG_WORKER, [], name=evil)
    status, queue = await api.request("POST", "/v1/jobs", json={"name": "standing", "worker": (await api.request(
        "POST", "/v1/workers", data=bundle(FLAG_WORKER)))[1]["digest"], "open": True})
    assert status == 201, queue

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # The listener's certificate comes from the daemon's own CA, which this browser profile
            # does not know; TLS and the CA are tested in test_security.py.
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            await page.goto(f"{d.api_url}/status#token={TOKEN}")
            row = page.locator(f'tr[data-job-id="{job_id}"]')
            await expect(row).to_contain_text("render me", timeout=20_000)
            await expect(row.locator(".progress-text")).to_have_text("0 of 4 finished (0 succeeded)", timeout=20_000)
            assert "token" not in page.url  # out of the address bar and the history
            assert await page.evaluate("sessionStorage.getItem('cloudtask.status.token')") == TOKEN

            flag.touch()  # the tasks finish: the page follows without a reload
            await expect(row.locator(".progress-text")).to_have_text("4 of 4 finished (4 succeeded)", timeout=30_000)
            await expect(row).to_have_attribute("data-state", "succeeded")
            await expect(row.locator(".badge")).to_have_text("succeeded")
            assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1

            # A standing queue with nothing queued is open, not waiting (nothing is stuck).
            await expect(page.locator(f'tr[data-job-id="{queue["id"]}"] .badge')).to_have_text("open")
            await expect(page.locator(f'tr[data-job-id="{evil_id}"] .badge')).to_have_text("waiting")

            evil_cell = page.locator(f'tr[data-job-id="{evil_id}"] td.name')
            assert await evil_cell.text_content() == evil
            assert await page.evaluate("window.__pwned") is None
            assert await page.locator("#jobs img, #jobs script").count() == 0

            # A wrong token, and none at all: the page says how to get in.
            stranger = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await stranger.goto(f"{d.api_url}/status#token=not-the-token")
            await expect(stranger.locator("#problem")).to_contain_text("Not authorised", timeout=20_000)
            await expect(stranger.locator("#problem")).to_contain_text("/status#token=")
            await expect(stranger.locator("body")).to_have_attribute("data-auth", "refused")
            assert await stranger.locator("tr[data-job-id]").count() == 0
            bare = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await bare.goto(f"{d.api_url}/status")
            await expect(bare.locator("#problem")).to_contain_text("Not authorised", timeout=20_000)
        finally:
            await browser.close()


async def test_events_name_tasks_by_the_users_id(daemon: tuple[Daemon, UnixApi], tmp_path: Path) -> None:
    """Events showed `task=227` (the row) where users know their task ids ("alpha-7")."""
    d, api = daemon
    flag = tmp_path / "go"
    flag.touch()
    job_id = await submit(api, FLAG_WORKER, [{"id": "alpha-7", "data": {"flag": str(flag), "n": 7}}], name="keys")

    async def succeeded() -> list[dict[str, Any]]:
        _, page = await api.request("GET", f"/v1/events?job={job_id}&tail=100")
        return [e for e in page["events"] if e["kind"] == "task_succeeded"]
    (event,) = await wait_for(succeeded, timeout=60, message="the task succeeded")
    assert event["task_key"] == "alpha-7" and event["task_id"] != "alpha-7"
    rc, out, err = await ctl(d, "events", "--job", str(job_id))
    assert rc == 0, err
    line = next(x for x in out.splitlines() if "task_succeeded" in x)
    assert "task=alpha-7" in line and f"task={event['task_id']} " not in line + " ", line


# ---- the plots and `cloudtaskctl status-page` -------------------------------------------------


async def test_the_series_samples_counters_instances_and_cost(tmp_path: Path) -> None:
    """Known rows in, exact columns out: finished per second from the jobs' counters between two
    samples, queued and running, live instances by provider and market, cost per hour by provider."""
    from cloudtaskd.http.series import StatusSeries

    store = Store(tmp_path / "db.sqlite")
    await store.open()
    try:
        def rows(tx: Any) -> None:
            db = tx.db
            db.execute("INSERT INTO pools (id, digest, spec, path, created_at) VALUES (1, 'd', '{}', '/', 0)")
            db.execute("INSERT INTO jobs (id, name, pool_id, state, created_at, max_attempts, n_staged, n_queued,"
                       " n_leased, n_failed, n_succeeded, n_dead, n_cancelled) VALUES (1, 'j', 1, 'active', 0, 3,"
                       " 0, 100, 8, 2, 10, 1, 0)")
            for inst, provider, spot, state, price in (
                    ("aws-a", "aws", True, "running", 0.10), ("aws-b", "aws", True, "starting", 0.10),
                    ("aws-c", "aws", False, "running", 0.30), ("aws-d", "aws", True, "stopped", 5.0),
                    ("gcp-a", "gcp", False, "running", 0.05), ("local-a", "local", False, "running", 0.0),
                    ("ext-a", "external", None, "running", 7.0)):
                offer = json.dumps({"spot": spot} if spot is not None else {})
                db.execute("INSERT INTO instances (id, provider, pool_id, state, slots, token_hash, offer,"
                           " price_per_hour, created_at, state_changed_at) VALUES (?, ?, 1, ?, 2, 'h', ?, ?, 0, 0)",
                           (inst, provider, state, offer, price))

        await store.write(rows)
        series = StatusSeries(store, interval_s=1.0, window_s=3.0)
        await series.take()
        await store.write(lambda tx: tx.db.execute(
            "UPDATE jobs SET n_queued = 60, n_succeeded = 50, n_dead = 2 WHERE id = 1"))
        await series.take()
        body = json.loads(series.body())
        assert series.body() is series.body()  # encoded once per sample, whoever reads it
        assert len(body["t"]) == 2 and body["window_s"] == 3.0 and body["interval_s"] == 1.0
        succeeded, dead = body["finished_per_s"]["succeeded"], body["finished_per_s"]["dead"]
        assert succeeded[0] is None and dead[0] is None  # nothing to difference the first with
        assert succeeded[1] > 0 and dead[1] > 0 and succeeded[1] == pytest.approx(40 * dead[1], rel=1e-2)
        assert body["tasks"] == {"queued": [102, 62], "leased": [8, 8]}
        assert body["instances"] == {"aws on-demand": [1, 1], "aws spot": [2, 2], "external": [1, 1],
                                     "gcp on-demand": [1, 1], "local": [1, 1]}
        cost = {k: v[-1] for k, v in body["cost_per_hour"].items()}
        assert cost == {"aws": pytest.approx(0.50), "gcp": pytest.approx(0.05), "local": 0.0}  # not external's
        for _ in range(3):
            await series.take()
        assert len(json.loads(series.body())["t"]) == 3  # the window's worth, no more
    finally:
        await store.close()


# Tasks sleep a little, or fail at once: one worker (one pool) serves a busy, a failed and a cancelled job.
LOAD_WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    "work.py": (
        "import asyncio\n"
        "async def run(task_id, data):\n"
        "    if data.get('fail'):\n"
        "        raise ValueError('cannot parse record ' + task_id)\n"
        "    await asyncio.sleep(data.get('s', 0))\n"
        "    return {'n': data['n']}\n"
    ),
}


async def submit_load(api: UnixApi, digest: str, name: str, tasks: list[dict[str, Any]], **opts: Any) -> int:
    status, job = await api.request("POST", "/v1/jobs", json={"name": name, "worker": digest, **opts})
    assert status == 201, job
    text = "".join(json.dumps(t) + "\n" for t in tasks)
    status, body = await api.request("POST", f"/v1/jobs/{job['id']}/tasks", data=io.BytesIO(text.encode()))
    assert status == 200, body
    return int(job["id"])


async def job_outcome(api: UnixApi, job_id: int, outcome: str) -> dict[str, Any] | None:
    _, job = await api.request("GET", f"/v1/jobs/{job_id}")
    return job if job["outcome"] == outcome else None


def check_png(path: Path) -> tuple[int, int]:
    """A PNG that decodes as one (signature, IHDR) and is not a blank sliver: its size."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # the header's CRC holds
    assert width >= 800 and height >= 600, (width, height)
    assert len(data) > 20_000, len(data)  # a blank page of this size compresses to a few kB
    return width, height


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                 "(install.sh installs it); the status page needs a browser")
@pytest.mark.timeout(300)
async def test_the_status_page_through_cloudtaskctl_under_load(tmp_path: Path) -> None:
    """`cloudtaskctl status-page` serves the page on 127.0.0.1 over plain HTTP, relayed to the unix
    socket: no CA and no daemon token in the browser. Under load — a job running, one failed (dead
    tasks), one cancelled — the plots carry data, each job reads as what happened to it, and the
    screenshots (light and dark) are real PNGs. CLOUDTASK_SCREENSHOTS=DIR copies them there
    (docs/img holds one set)."""
    import shutil

    import aiohttp
    from playwright.async_api import async_playwright, expect

    d = Daemon(config(tmp_path), shutdown_grace_s=5, series_interval_s=0.5, series_window_s=120)
    await d.start()
    api = UnixApi(d.config.socket_path)
    proc: asyncio.subprocess.Process | None = None
    try:
        status, worker = await api.request("POST", "/v1/workers", data=bundle(LOAD_WORKER))
        assert status == 200, worker
        digest = worker["digest"]
        failed = await submit_load(api, digest, "nightly-import", [
            {"id": f"rec-{i}", "data": {"n": i, "fail": i % 3 == 0}} for i in range(12)], max_attempts=1)
        await wait_for(lambda: job_outcome(api, failed, "failed"), timeout=90, message="a failed job")
        cancelled = await submit_load(api, digest, "resize-thumbnails", [
            {"id": f"img-{i}", "data": {"n": i, "s": 0.05}} for i in range(400)])
        status, _ = await api.request("POST", f"/v1/jobs/{cancelled}/cancel")
        assert status == 200
        await wait_for(lambda: job_outcome(api, cancelled, "cancelled"), timeout=90, message="a cancelled job")
        running = await submit_load(api, digest, "render-frames", [
            {"id": f"frame-{i}", "data": {"n": i, "s": 0.05}} for i in range(20_000)])

        proc = await ctl_proc(d, "status-page", "--port", "0")
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("status page: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].strip()
        base, token = url.split("#token=")
        origin = base.removesuffix("/status")

        # The relay: read-only routes only, its own token for the data, local host names only.
        async with aiohttp.ClientSession() as http:
            async with http.get(origin + "/v1/status") as resp:
                assert resp.status == 401
            async with http.get(origin + "/v1/status", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200 and any(j["id"] == failed for j in (await resp.json())["jobs"])
            async with http.get(origin + "/status") as resp:
                assert resp.status == 200 and "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
            async with http.get(origin + "/v1/jobs", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 404
            async with http.post(origin + f"/v1/jobs/{running}/cancel",
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status in (404, 405)
            async with http.get(origin + "/status", headers={"Host": "evil.example:80"}) as resp:
                assert resp.status == 403

        # Enough of the hour for every plot to have a line: the running job finishing tasks.
        async def busy_series() -> dict[str, Any] | None:
            _, s = await api.request("GET", "/v1/status/series")
            rates = [v for v in s["finished_per_s"]["succeeded"] if v]
            return s if len(s["t"]) >= 40 and len(rates) >= 20 and s["instances"].get("local") else None
        series = await wait_for(busy_series, timeout=120, message="40 samples, 20 with tasks finishing")
        assert max(series["tasks"]["queued"]) > 0 and max(series["tasks"]["leased"]) > 0
        _, job = await api.request("GET", f"/v1/jobs/{running}")
        assert job["outcome"] is None and job["counts"]["succeeded"] > 0  # still running: under load

        shots = tmp_path / "screenshots"
        shots.mkdir()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                for scheme in ("light", "dark"):
                    context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                                        color_scheme=scheme)
                    page = await context.new_page()
                    await page.goto(url)
                    await expect(page.locator("body")).to_have_attribute("data-auth", "ok", timeout=20_000)
                    assert "token" not in page.url

                    row = page.locator(f'tr[data-job-id="{failed}"]')
                    await expect(row).to_have_attribute("data-state", "failed", timeout=20_000)
                    await expect(row.locator(".badge")).to_have_text("failed")
                    await expect(row.locator(".progress-text")).to_have_text(
                        "12 of 12 finished (8 succeeded, 4 dead)")
                    row = page.locator(f'tr[data-job-id="{cancelled}"]')
                    await expect(row).to_have_attribute("data-state", "cancelled")
                    await expect(row.locator(".badge")).to_have_text("cancelled")
                    await expect(row.locator(".progress-text")).to_contain_text("cancelled)")
                    row = page.locator(f'tr[data-job-id="{running}"]')
                    await expect(row).to_have_attribute("data-state", "running")
                    await expect(row.locator(".progress-text")).to_contain_text(" of 20000 finished (")
                    assert await page.locator(".badge.done, .state-done").count() == 0

                    # Every plot drawn, with data in its lines: finished per second (succeeded),
                    # queued and leased, the local instance, and cost (local: $0/h).
                    for chart_id, name in (("finished", "succeeded"), ("tasks", "queued"), ("tasks", "leased"),
                                           ("instances", "local"), ("cost", "local")):
                        path = page.locator(f'svg[data-chart="{chart_id}"] path[data-series="{name}"]')
                        await expect(path).to_have_count(1, timeout=20_000)
                        assert int(await path.get_attribute("data-values") or 0) >= 20, (chart_id, name)
                        assert len((await path.get_attribute("d") or "").split("L")) >= 20
                    for chart_id in ("finished", "tasks", "instances", "cost"):
                        chart = page.locator(f'div.chart[data-chart="{chart_id}"]')
                        assert await chart.locator("svg text").count() >= 10  # axis labels and unit
                        assert await chart.locator(".legend [data-series]").count() >= 1
                    assert await page.locator("#charts-title").text_content() == "Last 2 min"

                    shot = shots / f"status-page-{scheme}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    check_png(shot)
                    await context.close()
            finally:
                await browser.close()
        keep = os.environ.get("CLOUDTASK_SCREENSHOTS")
        if keep:
            for shot in shots.iterdir():
                shutil.copy(shot, Path(keep) / shot.name)

        proc.send_signal(signal.SIGINT)  # Ctrl-C: the normal way to stop it
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert "status page stopped" in out.decode() and b"Traceback" not in err
        proc = None
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await api.close()
        await d.stop()


async def test_status_page_relays_a_tls_listener_with_the_token_from_the_environment(
        tcp_daemon: tuple[Daemon, UnixApi]) -> None:
    """--url: the relay dials the TLS listener with the daemon's CA and CLOUDTASK_API_TOKEN; the
    browser side is plain HTTP with the relay's own token. A daemon refusing cloudtaskctl's token is
    said at once, not shown as a page that never loads."""
    import aiohttp

    d, _ = tcp_daemon
    cfg = d.config.state_path.parent / "ctl.yaml"
    cfg.write_text(f"state_dir: {d.config.state_path}\n")

    async def start(token: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloudtaskd.ctl", "status-page", "--config", str(cfg), "--url", d.api_url,
            "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT), "CLOUDTASK_API_TOKEN": token})

    refused = await start("not-the-token")
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 3 and "refused the API token" in err.decode(), err.decode()

    proc = await start(TOKEN)
    try:
        assert proc.stdout is not None
        shown = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert shown["url"].startswith("http://127.0.0.1:") and shown["daemon"] == d.api_url
        base, token = shown["url"].split("#token=")
        assert token != TOKEN  # the daemon's token never reaches the browser
        async with aiohttp.ClientSession() as http:
            async with http.get(base.removesuffix("/status") + "/v1/status/series",
                                headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200 and "finished_per_s" in await resp.json()
            async with http.get(base) as resp:
                assert resp.status == 200 and "<script>" in await resp.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
