"""cloudtaskctl's answers against a real daemon: what each command says, and its exit status, when
the answer is not the happy one (issue 15, "Answers that mislead")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloudtaskd.config import ScalingConfig
from cloudtaskd.core.tables import jobs
from cloudtaskd.ctl import commands
from cloudtaskd.daemon import Daemon
from cloudtaskd.http.api import RATE_CACHE_S
from tests import paths
from tests.conftest import UnixApi, ctl, make_config

ROOT = paths.ROOT


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi]]:
    # No instance ever starts: a job's tasks wait queued until a test says what happens to them.
    d = Daemon(make_config(tmp_path, scaling=ScalingConfig(max_instances=0, tick_s=0.1)), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


@pytest.mark.parametrize("argv", [["status", "99"], ["tasks", "99"], ["cost", "99"], ["results", "99"],
                                  ["watch", "99"], ["cancel", "99"], ["retry", "99"], ["resume", "99"],
                                  ["delete", "99"],
                                  ["tasks", "99", "--state", "dead"]])
async def test_an_unknown_job_is_one_answer_and_exit_2(daemon: tuple[Daemon, Any], argv: list[str]) -> None:
    status, out, err = await ctl(daemon[0], *argv)
    assert (status, out, err) == (2, "", "cloudtaskctl: no job 99\n")


async def test_max_instances_0_is_refused_not_taken_as_no_limit(daemon: tuple[Daemon, UnixApi],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d, api = daemon
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": "a", "data": {"n": 1}}\n')
    status, _, _ = await ctl(d, "submit", "--tasks", str(tasks), "--worker", str(ROOT / "examples" / "worker"),
                                 "--max-instances", "0")
    usage = capsys.readouterr().err  # argparse's own error, with the subcommand's usage
    assert status == 2 and "--max-instances" in usage and "between 1 and 100000, got 0" in usage
    # The API too: 0 once meant "no limit" there and the job ran on an instance.
    status_code, body = await api.request("POST", "/v1/jobs", json={"worker": "0" * 64, "max_instances": 0})
    assert status_code == 400 and body["error"]["field"] == "max_instances"
    _, jobs = await api.request("GET", "/v1/jobs")
    assert jobs["jobs"] == []


async def submit(d: Daemon, tmp_path: Path, n: int) -> int:
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(f'{{"id": "t{i}", "data": {{"n": {i}}}}}\n' for i in range(n)))
    status, out, err = await ctl(d, "submit", "--tasks", str(tasks), "--worker", str(ROOT / "examples" / "worker"))
    assert status == 0, err
    return int(out.split()[-1]) if out.split()[-1].isdigit() else int(out.split()[1])


async def test_status_of_a_cancelled_job_says_cancelled_with_counts_and_no_rate(daemon: tuple[Daemon, UnixApi],
                                                                               tmp_path: Path) -> None:
    d, _ = daemon
    job_id = await submit(d, tmp_path, 5)
    assert (await ctl(d, "cancel", str(job_id)))[0] == 0
    await asyncio.sleep(RATE_CACHE_S + 0.1)  # a rate counted before the cancel is not the one checked
    status, out, _ = await ctl(d, "status", str(job_id))
    assert status == 0
    first, bar = out.splitlines()
    assert ": cancelled (0 succeeded, 0 dead, 5 cancelled of 5)" in first
    assert "done" not in out and " 0.00/s " in bar  # cancellations are not work done
    _, table_out, _ = await ctl(d, "status")
    header, row = table_out.splitlines()
    assert "CANCELLED" in header
    assert row.split()[2:8] == ["cancelled", "5/5", "0", "0", "5", "0"]
    _, raw, _ = await ctl(d, "status", str(job_id), "--json")
    assert '"outcome": "cancelled"' in raw.replace('":"', '": "')


async def test_tasks_pages_and_says_when_there_is_more(daemon: tuple[Daemon, UnixApi], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = daemon
    job_id = await submit(d, tmp_path, 250)
    status, out, err = await ctl(d, "tasks", str(job_id))
    rows = out.splitlines()[1:]
    assert status == 0 and len(rows) == 100 and rows[-1].split()[1] == "t99"
    last = rows[-1].split()[0]
    assert err == f"cloudtaskctl: more tasks: the next page with --after {last}, or all of them with --all\n"
    status, out, err = await ctl(d, "tasks", str(job_id), "--after", last, "--limit", "200")
    rows = out.splitlines()[1:]
    assert (status, err, len(rows)) == (0, "", 150) and rows[0].split()[1] == "t100"
    # --all reads page after page (pages of 60 here, of 10,000 for real): past any one page's limit.
    monkeypatch.setattr(commands, "TASKS_PAGE", 60)
    status, out, err = await ctl(d, "tasks", str(job_id), "--all", "--json")
    listing = json.loads(out)
    assert (status, err, listing["next"]) == (0, "", None)
    assert [t["id"] for t in listing["tasks"]] == [f"t{i}" for i in range(250)]


async def test_a_refused_upload_leaves_no_job_behind(daemon: tuple[Daemon, UnixApi], tmp_path: Path) -> None:
    d, api = daemon
    tasks = tmp_path / "bad.jsonl"
    tasks.write_text('{"id": "a", "data": 1}\n{"data": 2}\n')
    status, out, err = await ctl(d, "submit", "--tasks", str(tasks), "--worker", str(ROOT / "examples" / "worker"))
    assert (status, out) == (2, "") and 'bad.jsonl:2: missing "id"' in err
    _, out, err = await ctl(d, "status")
    assert out == "no jobs\n"  # not a `cancelled 0/0` job
    assert f"database: sqlite {d.config.state_path / 'cloudtask.db'}" in err  # which one, on stderr
    _, events = await api.request("GET", "/v1/events?tail=1000")
    assert [e for e in events["events"] if e.get("job_id") is not None] == []
    # A job with unfinished tasks is refused, and kept.
    job_id = await submit(d, tmp_path, 1)
    code, body = await api.request("DELETE", f"/v1/jobs/{job_id}")
    assert code == 409 and "cancel it first" in body["error"]["message"]
    assert (await ctl(d, "status", str(job_id)))[0] == 0


async def test_prices_with_no_offer_says_the_real_reason(daemon: tuple[Daemon, UnixApi]) -> None:
    """`prices --spot` with no cloud said "no offer fits a task of this size": the reason is that
    nothing enabled sells spot capacity."""
    d, _ = daemon
    status, out, _ = await ctl(d, "prices", "--spot")
    assert status == 0 and "no enabled provider sells spot capacity" in out and "--spot" in out, out
    status, out, _ = await ctl(d, "prices", "--cpus-per-task", "4096")
    assert status == 0 and "no offer has room for one task of 4096 CPUs" in out, out
    status, out, _ = await ctl(d, "prices", "--json")
    assert status == 0 and json.loads(out)["candidates"], "the local host is offered"


async def test_the_job_commands_answer_one_line_or_the_job_as_json(daemon: tuple[Daemon, UnixApi],
                                                                  tmp_path: Path) -> None:
    """resume, retry, close and cancel share one shape: the job as JSON, or `job N VERB: progress`."""
    d, _ = daemon
    status, out, err = await ctl(d, "submit", "--open", "--worker", str(ROOT / "examples" / "worker"))
    assert status == 0, err
    job_id = int(out)
    assert (await ctl(d, "enqueue", str(job_id), "--data", '{"id": "k", "data": {"n": 1}}'))[0] == 0
    for command, verb, counts in (("resume", "resumed", "0/1  dead 0  leased 0  queued 1 "),
                                  ("retry", "retried", "0/1  dead 0  leased 0  queued 1 "),
                                  ("close", "closed", "0/1  dead 0  leased 0  queued 1 "),
                                  ("cancel", "cancelled", "1/1 dead 0 canc 1 lsd 0 queue 0 ")):
        for json_flag in ([], ["--json"]):
            if command == "resume":  # only a paused job resumes
                assert await d.store.write(lambda tx: jobs.pause(tx, job_id, "held by the test", jobs.BUDGET))
            status, out, err = await ctl(d, command, str(job_id), *json_flag)
            assert (status, err) == (0, ""), (command, err)
            if json_flag:
                assert json.loads(out)["id"] == job_id, (command, out)
            else:
                head, progress = out.split(": ", 1)
                assert head == f"job {job_id} {verb}" and counts in progress and out.count("\n") == 1, (command, out)
