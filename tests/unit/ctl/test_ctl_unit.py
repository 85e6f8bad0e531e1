"""cloudtaskctl without the daemon: progress formatting, bundles, argument parsing, and the API
client against a small aiohttp server on a unix socket started by each test."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import re
import shutil
import socket
import sys
import tarfile
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from cloudtask_wire.workerspec import WorkerSpecError
from cloudtaskd import logs
from cloudtaskd.config import ApiConfig, Config
from cloudtaskd.ctl.bundle import bundle_bytes, clone_worker, load_spec
from cloudtaskd.ctl.client import UPLOAD_CHUNK_BYTES, ApiClient
from cloudtaskd.ctl.main import _parse, main
from cloudtaskd.ctl.output import Ctx, table
from cloudtaskd.ctl.progress import ProgressDisplay, format_duration, format_progress
from cloudtaskd.ctl.run import cmd_run
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonUnavailable, NotFound


def job(**counts: int) -> dict[str, Any]:
    full = {k: counts.pop(k, 0) for k in ("staged", "queued", "leased", "failed", "succeeded", "dead", "cancelled")}
    full["total"] = sum(full.values())
    return {"id": 7, "name": "t", "state": "active", "done": False, "counts": full, "rate_per_s": 0.0,
            "instances": 0, **counts}


# ---- format_progress ----------------------------------------------------------------------------


def test_progress_zero_total() -> None:
    line = format_progress(job(), 120)
    assert "0.0%" in line and "0/0" in line and "ETA --" in line and "instances 0" in line
    assert len(line) == 120 and line.startswith("[....")


def test_progress_all_done_fills_the_bar() -> None:
    j = job(succeeded=10)
    j.update(done=True, rate_per_s=2.5, instances=1)
    line = format_progress(j, 100)
    assert len(line) == 100
    assert "100.0%" in line and "10/10" in line and "done" in line and "ETA" not in line
    bar = line[1:line.index("]")]
    assert set(bar) == {"#"}


def test_progress_counts_rate_and_eta() -> None:
    j = job(succeeded=397, dead=3, leased=8, queued=530, staged=9, failed=53)
    j.update(rate_per_s=10.0, instances=2)
    line = format_progress(j, 160)
    # Leased, not running: on one 4-slot instance 8 leases are 4 running and 4 held ready.
    assert "running" not in line and "lsd" not in line
    for part in ("40.0%", "400/1000", "dead 3", "leased 8", "queued 539", "retrying 53", "10.0/s",
                 "ETA 1:00", "instances 2"):
        assert part in line, (part, line)
    assert len(line) == 160
    filled = line[1:line.index("]")].count("#")
    assert filled == int(0.4 * (line.index("]") - 1))


def test_progress_never_rounds_up_to_complete() -> None:
    j = job(succeeded=999, leased=1)
    assert "99.9%" in format_progress(j, 100)
    assert "ETA --" in format_progress(j, 100)  # no rate yet: no estimate


def test_progress_fits_narrow_terminals() -> None:
    j = job(succeeded=397, dead=3, leased=8, queued=592)
    j.update(rate_per_s=10.0, instances=2)
    eighty = format_progress(j, 79)
    assert len(eighty) == 79 and eighty.startswith("[")  # short labels leave the bar room
    assert "queue 592" in eighty and "ETA 1:00" in eighty
    narrow = format_progress(j, 40)
    assert len(narrow) <= 40 and not narrow.startswith("[")
    assert "400/1000" in narrow and "ETA 1:00" in narrow  # the least useful parts went first


def test_progress_cancelled_job() -> None:
    j = job(succeeded=2, cancelled=5, leased=1)
    j["state"] = "cancelled"
    line = format_progress(j, 120)
    assert "cancelled 5" in line and "cancelling" in line


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (7.2, "0:08"), (754, "12:34"), (3723, "1:02:03"),
                                               (100 * 3600 + 5, "4d04h")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_display_plain_stream_is_rate_limited() -> None:
    now = [0.0]
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False, clock=lambda: now[0])
    for t in (0.0, 1.0, 5.0, 9.9, 10.0, 15.0):
        now[0] = t
        display.update(job(queued=3))
    display.finish(job(succeeded=3, done=True))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # t=0, t=10 and the final state
    assert lines[-1].startswith("job 7: ") and "3/3" in lines[-1] and "\r" not in out.getvalue()


def test_display_tty_redraws_one_line() -> None:
    now = [0.0]
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True, clock=lambda: now[0])
    for i in range(10):
        now[0] = i * 0.1
        display.update(job(queued=3))
    display.finish(job(succeeded=3, done=True))
    text = out.getvalue()
    assert text.count("\r") == 6  # 0.0, 0.2, ... 0.8 and the final one: at most ~5 a second
    assert text.endswith("\n") and text.count("\n") == 1


def test_table_aligns_numbers_right() -> None:
    text = table(("ID", "NAME"), [[1, "a"], [12, "bbb"]])
    assert text.splitlines() == ["ID  NAME", " 1  a", "12  bbb"]


# ---- bundles ----------------------------------------------------------------------------------------


def make_worker(root: Path) -> Path:
    (root / "sub" / "__pycache__").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / "cloudtask.yaml").write_text("mode: command\ncommand: ./run.sh\n")
    (root / "run.sh").write_text("#!/bin/sh\necho '{}'\n")
    (root / "run.sh").chmod(0o700)
    (root / "sub" / "lib.py").write_text("X = 1\n")
    (root / "sub" / "lib.pyc").write_bytes(b"\0")
    (root / "sub" / "__pycache__" / "lib.cpython-311.pyc").write_bytes(b"\0")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".venv" / "lib" / "x.py").write_text("")
    (root / "empty").mkdir()
    return root


def test_bundle_is_deterministic(tmp_path: Path) -> None:
    a = make_worker(tmp_path / "a")
    first, digest = bundle_bytes(a)
    again, digest_again = bundle_bytes(a)
    assert (first, digest) == (again, digest_again)
    # Another copy, other times and permissions beyond the executable bit: the same bytes.
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "run.sh").chmod(0o755)
    (b / "sub" / "lib.py").chmod(0o600)
    (b / "sub" / "lib.py").touch()
    assert bundle_bytes(b) == (first, digest)
    (b / "sub" / "lib.py").write_text("X = 2\n")
    assert bundle_bytes(b)[1] != digest
    assert first[4:8] == b"\0\0\0\0"  # gzip header time


def test_bundle_contents_and_exclusions(tmp_path: Path) -> None:
    data, _ = bundle_bytes(make_worker(tmp_path / "w"))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members)
    assert set(members) == {"cloudtask.yaml", "empty", "run.sh", "sub", "sub/lib.py"}
    assert members["run.sh"].mode == 0o755 and members["sub/lib.py"].mode == 0o644
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())
    with gzip.open(io.BytesIO(data)) as gz:
        assert gz.read(1)  # a real gzip stream


def test_bundle_validation_names_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such directory"):
        load_spec(tmp_path / "missing")
    w = tmp_path / "w"
    w.mkdir()
    with pytest.raises(BadInput, match=re.escape(f"{w / 'cloudtask.yaml'}: missing")):
        load_spec(w)
    (w / "cloudtask.yaml").write_text("mode: command\ncommand: [unclosed\n")
    with pytest.raises(BadInput, match=r"cloudtask\.yaml:\d+: not valid YAML") as bad_yaml:
        load_spec(w)
    assert bad_yaml.value.line is not None
    (w / "cloudtask.yaml").write_text("mode: command\ncomand: x\n")
    with pytest.raises(WorkerSpecError) as unknown:
        load_spec(w)
    assert unknown.value.key == "comand" and str(w / "cloudtask.yaml") in str(unknown.value)
    (w / "cloudtask.yaml").write_text("mode: command\n")
    with pytest.raises(WorkerSpecError, match=r"cloudtask\.yaml: command: required"):
        load_spec(w)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_clone_failure_reports_git_message(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"git clone .*nowhere.* failed: .*(does not exist|not found)"):
        await clone_worker(str(tmp_path / "nowhere"), tmp_path / "dest")


# ---- arguments and exit statuses ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["run", "--tasks", "t.json"],                                   # no worker
    ["run", "--tasks", "t.json", "--worker", "w", "--worker-repo", "u"],
    ["run", "--tasks", "t.json", "--worker", "w", "--worker-ref", "main"],
    ["run", "--tasks", "t.json", "--worker", "w", "--max-attempts", "0"],
    ["status", "seven"],
    ["tasks", "1", "--state", "sleeping"],
    ["results", "1", "--top", "3", "--follow"],
    ["watch"],
])
def test_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: cloudtaskctl" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "usage", "error"), [
    # The flag and what was typed, not the API's field and the float sent (`cpus_per_task: ... got '0.0'`).
    (["prices", "--cpus-per-task", "0"], "cloudtaskctl prices",
     "argument --cpus-per-task: expected a number of at least 0.01, got '0'"),
    (["prices", "--max-price-per-hour", "-1"], "cloudtaskctl prices",
     "argument --max-price-per-hour: expected a number in ASCII digits (like 0.5), got '-1'"),
    (["run", "--tasks", "t", "--worker", "w", "--max-total-cost", "0"], "cloudtaskctl run",
     "argument --max-total-cost: expected a number above 0, got '0'"),
    (["resume", "1", "--max-total-cost", "nan"], "cloudtaskctl resume", "argument --max-total-cost: expected a number"),
    # A refused combination prints the subcommand's usage, not the top level's.
    (["results", "1", "--top", "3", "--follow"], "cloudtaskctl results", "--top and --follow cannot be combined"),
    (["submit", "--tasks", "t", "--worker", "w", "--no-spot", "--no-on-demand-fallback"], "cloudtaskctl submit",
     "--no-spot and --no-on-demand-fallback together allow nothing"),
])
def test_argument_errors_name_the_flag_under_the_subcommands_usage(argv: list[str], usage: str, error: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {usage} ") and f"{usage}: error: {error}" in err, err


def test_global_options_before_or_after_the_command() -> None:
    args = _parse(["--socket", "/s", "status", "--json"])
    assert (args.socket, args.json, args.config, args.job) == ("/s", True, None, None)
    args = _parse(["--json", "instances", "--all"])
    assert args.json and args.all and args.socket is None


def test_bad_worker_is_refused_before_anything_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.json"
    tasks.write_text('[{"id": 1, "data": {}}]')
    w = tmp_path / "w"
    w.mkdir()
    (w / "cloudtask.yaml").write_text("mode: python\nfunction: nocolon\n")
    # No daemon at this socket: had anything been sent, the exit status would be 3.
    argv = ["run", "--tasks", str(tasks), "--worker", str(w), "--socket", str(tmp_path / "none.sock")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{w / 'cloudtask.yaml'}: function: expected module:function" in err


def test_missing_files_and_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--tasks", str(tmp_path / "t.json"), "--worker", str(tmp_path)]) == 2
    assert "t.json: no such file" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "c.yaml"), "status"]) == 2
    assert "c.yaml: (file): cannot read" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("scaling:\n  max_instancez: 3\n")
    assert main(["--config", str(tmp_path / "c.yaml"), "status"]) == 2
    assert "scaling.max_instancez: unknown key" in capsys.readouterr().err


def test_no_daemon_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 3
    assert "not reachable" in capsys.readouterr().err


# ---- ApiClient against a tiny server -------------------------------------------------------------------


def _err(status: int, kind: str, message: str, line: int | None = None, field: str | None = None) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "line": line, "field": field}},
                             status=status)


class FakeDaemon:
    """Just enough of the control API to drive the client: a job whose tasks all end at once."""

    def __init__(self) -> None:
        self.uploads: list[dict[str, Any]] = []
        self.cancelled: list[int] = []
        self.tasks: list[dict[str, Any]] = []
        self.big = "x" * 300_000

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/health", self.health),
            web.post("/v1/workers", self.workers),
            web.post("/v1/jobs", self.create_job),
            web.get("/v1/jobs/{job}", self.get_job),
            web.post("/v1/jobs/{job}/tasks", self.upload),
            web.post("/v1/jobs/{job}/cancel", self.cancel),
            web.post("/v1/jobs/{job}/resume", self.resume),
            web.get("/v1/jobs/{job}/results", self.results),
            web.get("/v1/jobs", self.list_jobs),
            web.put("/v1/runs/{run}", self.attach_run),
            web.get("/v1/runs", self.list_runs),
            web.delete("/v1/runs/{run}", self.detach_run),
        ]

    async def list_jobs(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    async def attach_run(self, request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["run"], "ttl_s": 15, "resumed": False, "runs": []})

    async def list_runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": [], "ttl_s": 15})

    async def detach_run(self, request: web.Request) -> web.Response:
        return web.json_response({"detached": request.match_info["run"]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": "0", "daemon_id": "fake"})

    async def workers(self, request: web.Request) -> web.Response:
        body = await request.read()
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            assert "cloudtask.yaml" in tar.getnames()
        return web.json_response({"digest": "d" * 64, "spec": {"mode": "command"}})

    async def create_job(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not body.get("name"):
            return _err(400, "BadInput", "name: expected a string", field="name")
        return web.json_response(self._job(), status=201)

    def _job(self) -> dict[str, Any]:
        counts = {"staged": 0, "queued": 0, "leased": 0, "failed": 0, "succeeded": 0, "dead": 0, "cancelled": 0}
        for t in self.tasks:
            counts[t["status"]] += 1
        counts["total"] = len(self.tasks)
        return {"id": 1, "name": "t", "state": "active", "done": bool(self.tasks), "counts": counts,
                "rate_per_s": 1.0, "instances": 0, "created_at": 0, "finished_at": None, "worker": "d" * 64}

    async def get_job(self, request: web.Request) -> web.Response:
        if request.match_info["job"] != "1":
            return _err(404, "NotFound", f"job {request.match_info['job']} does not exist")
        return web.json_response(self._job())

    async def upload(self, request: web.Request) -> web.Response:
        chunks = [c async for c in request.content.iter_chunked(UPLOAD_CHUNK_BYTES)]
        body = b"".join(chunks)
        source = request.query.get("source", "tasks")
        self.uploads.append({"size": len(body), "chunked": request.headers.get("Transfer-Encoding") == "chunked",
                             "source": source})
        if b'"bad"' in body:
            return _err(400, "BadInput", f'{source}:12: missing "id"', line=12)
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()] if body.startswith(b"{") else []
        for i, t in enumerate(lines, 1):
            ok = not t.get("data", {}).get("fail")
            self.tasks.append({"id": t["id"], "status": "succeeded" if ok else "dead", "task": i,
                               **({"result": {"n": i}} if ok else {"error": "boom"}), "attempts": 1 if ok else 3,
                               "instance": "local-1", "duration_s": 0.5, "finished_at": 1.0})
        return web.json_response({"accepted": len(lines) or body.count(b"\n")})

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = int(request.match_info["job"])
        if job_id == 2:
            return _err(409, "CloudtaskError", "job 2 is busy")
        self.cancelled.append(job_id)
        return web.json_response(self._job())

    async def resume(self, request: web.Request) -> web.Response:
        return _err(400, "BadInput", "max_total_cost: $0.5000 is not above the $0.7500 already spent",
                    field="max_total_cost")

    async def results(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if request.match_info["job"] == "9":  # awkward framing: one line over many writes, one write many lines
            text = json.dumps({"id": "big", "result": self.big}) + "\n" + '{"id": "a"}\n{"id": "b"}\n{"id": "c"}'
            for i in range(0, len(text), 7000):
                await resp.write(text[i:i + 7000].encode())
        else:
            after = int(request.query.get("after", 0))
            await resp.write("".join(json.dumps(t) + "\n" for t in self.tasks if t["task"] > after).encode())
        await resp.write_eof()
        return resp


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeDaemon, Path]]:
    daemon = FakeDaemon()
    app = web.Application()
    app.add_routes(daemon.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    yield daemon, sock
    await runner.cleanup()


async def test_client_maps_errors(fake: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    _, sock = fake
    tasks = tmp_path / "tasks.json"
    tasks.write_text('[{"id": "bad"}]')
    async with ApiClient(sock) as api:
        assert (await api.health())["ok"] is True
        with pytest.raises(BadInput) as bad:
            await api.upload_tasks(1, tasks, source="tasks.json")
        assert bad.value.line == 12 and str(bad.value) == 'tasks.json:12: missing "id"'
        with pytest.raises(BadInput) as bad_field:
            await api.create_job("", "d")
        assert bad_field.value.field == "name"
        with pytest.raises(NotFound, match="job 99 does not exist"):
            await api.get_job(99)
        with pytest.raises(NotFound, match="Not Found"):  # aiohttp's own 404, a plain text body
            await api.drain_instance("i-1")
        with pytest.raises(CloudtaskError, match="job 2 is busy") as conflict:
            await api.cancel_job(2)
        assert type(conflict.value) is CloudtaskError


async def test_missing_or_refused_socket_is_daemon_unavailable(tmp_path: Path) -> None:
    async with ApiClient(tmp_path / "none.sock") as api:
        with pytest.raises(DaemonUnavailable, match=r"none\.sock"):
            await api.health()
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound but never listening: what a crashed daemon leaves behind
        async with ApiClient(path) as api:
            with pytest.raises(DaemonUnavailable):
                await api.list_jobs()


async def test_task_upload_streams_the_file(fake: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    daemon, sock = fake
    tasks = tmp_path / "many.jsonl"
    line = b'{"id": 1, "data": {"pad": "' + b"p" * 1000 + b'"}}\n'
    tasks.write_bytes(line * 3000)  # ~3 MiB: more than one upload chunk
    async with ApiClient(sock) as api:
        await api.upload_tasks(1, tasks)
    assert daemon.uploads == [{"size": tasks.stat().st_size, "chunked": True, "source": "many.jsonl"}]


async def test_results_stream_splits_lines(fake: tuple[FakeDaemon, Path]) -> None:
    daemon, sock = fake
    async with ApiClient(sock) as api:
        got = [r async for r in api.results(9)]
    assert [r["id"] for r in got] == ["big", "a", "b", "c"]
    assert got[0]["result"] == daemon.big


# ---- run, against the fake daemon --------------------------------------------------------------------


def run_ctx(sock: Path, tmp_path: Path) -> tuple[Ctx, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    config = Config(state_dir=str(tmp_path / "state"), api=ApiConfig(socket=str(sock)))
    return Ctx(config=config, json=False, out=out, err=err), out, err


def run_args(tmp_path: Path, tasks: str, **extra: str) -> Any:
    worker = make_worker(tmp_path / "worker")
    (tmp_path / "tasks.jsonl").write_text(tasks)
    argv = ["run", "--tasks", str(tmp_path / "tasks.jsonl"), "--worker", str(worker),
            "--results", str(tmp_path / "out.jsonl")]
    for key, value in extra.items():
        argv += [f"--{key}", value]
    return _parse(argv)


async def test_run_writes_results_and_exit_status(fake: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    _, sock = fake
    ctx, out, _ = run_ctx(sock, tmp_path)
    args = run_args(tmp_path, '{"id": "a", "data": {}}\n{"id": "b", "data": {"fail": 1}}\n')
    assert await cmd_run(ctx, args) == 1  # one task is dead
    lines = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == [
        {"id": "a", "status": "succeeded", "result": {"n": 1}, "attempts": 1, "instance": "local-1",
         "duration_s": 0.5},
        {"id": "b", "status": "dead", "error": "boom", "attempts": 3, "instance": "local-1", "duration_s": 0.5},
    ]
    assert list(lines[0]) == ["id", "status", "result", "attempts", "instance", "duration_s"]
    assert "1 succeeded, 1 dead, 0 cancelled" in out.getvalue() and "out.jsonl" in out.getvalue()


async def test_run_refused_tasks_cancel_the_empty_job(fake: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    daemon, sock = fake
    ctx, _, _ = run_ctx(sock, tmp_path)
    args = run_args(tmp_path, '{"id": "bad"}\n')
    with pytest.raises(BadInput, match=r'tasks\.jsonl:12: missing "id"'):
        await cmd_run(ctx, args)
    assert daemon.cancelled == [1]
    assert daemon.uploads[0]["source"] == str(tmp_path / "tasks.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture
def restore_logging() -> Any:
    yield
    if logs._stdlib_handler is not None:
        logging.getLogger().removeHandler(logs._stdlib_handler)
        logs._stdlib_handler = None
    structlog.reset_defaults()


async def test_run_embeds_a_daemon_when_none_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     restore_logging: None) -> None:
    events: list[str] = []

    class Daemon:
        """Stands in for cloudtaskd.daemon.Daemon: serves the fake API on the configured socket."""

        def __init__(self, config: Config, *, embedded: bool = False) -> None:
            self.config = config
            self.runner: web.AppRunner | None = None
            self.runs = types.SimpleNamespace(close_if_alone=lambda run_id: [])

        async def start(self) -> None:
            app = web.Application()
            app.add_routes(FakeDaemon().routes())
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.UnixSite(self.runner, str(self.config.socket_path)).start()
            structlog.get_logger().info("daemon_ready")
            events.append("start")

        async def stop(self) -> None:
            assert self.runner is not None
            await self.runner.cleanup()
            events.append("stop")

    monkeypatch.setitem(sys.modules, "cloudtaskd.daemon", types.SimpleNamespace(Daemon=Daemon))
    ctx, _, err = run_ctx(tmp_path / "embedded.sock", tmp_path)
    args = run_args(tmp_path, '{"id": "a", "data": {}}\n')
    assert await cmd_run(ctx, args) == 0
    assert events == ["start", "stop"]
    assert "running one in this process" in err.getvalue()
    log_lines = (tmp_path / "state" / "cloudtaskd.log").read_text().splitlines()
    assert json.loads(log_lines[0])["event"] == "daemon_ready"


def test_logs_are_json_lines(restore_logging: None) -> None:
    buf = io.StringIO()
    logs.configure("info", buf)
    with structlog.contextvars.bound_contextvars(job=3):
        structlog.get_logger().info("job_created", name="t")
        structlog.get_logger().debug("hidden")
    logging.getLogger("aiohttp.server").error("stdlib %s", "too")
    first, second = (json.loads(ln) for ln in buf.getvalue().splitlines())
    assert first["job"] == 3 and first["event"] == "job_created" and first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "stdlib too" and second["logger"] == "aiohttp.server"



async def test_a_refusal_the_daemon_names_by_field_names_the_flag(fake: tuple[FakeDaemon, Path]) -> None:
    _, sock = fake
    out, err = io.StringIO(), io.StringIO()
    status = await asyncio.to_thread(main, ["resume", "1", "--max-total-cost", "0.5", "--socket", str(sock)],
                                     out=out, err=err)
    assert status == 2
    assert err.getvalue() == "cloudtaskctl: --max-total-cost: $0.5000 is not above the $0.7500 already spent\n"
