"""Control characters from task ids, job names, worker stderr and daemon errors reach the user's
terminal escaped (`\\x1b`), never raw: the real cloudtaskctl, as a process, against a real daemon
with real local agents."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloudtaskd.ctl.output import json_line, printable
from cloudtaskd.daemon import Daemon
from tests import paths
from tests.conftest import UnixApi, make_config, wait_for
from tests.integration.test_daemon_e2e import submit
from tests.procs import bundle

ROOT = paths.ROOT

# Each an attack on a terminal: clear the screen, retitle the window, ring, overwrite the line,
# cut a C string short, a one-byte CSI, and text that reads backwards.
ESC_ID = "esc\x1b[2J\x1b]0;owned\x07"
IDS = [ESC_ID, "nul\x00after", "bel\x07", "cr\rFAKE LINE", "csi\x9b31m", "rlo\u202etxt.exe"]
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# A command worker whose failure carries control characters in its stderr tail (and so in the
# task's error, its task_dead event and the agent's log).
LOUD_WORKER = {
    "cloudtask.yaml": f"mode: command\ncommand: {sys.executable} w.py\n",
    "w.py": "import sys\nsys.stderr.write('boom\\x1b[2J\\x1b[31mred\\x00\\x07\\r\\n')\nsys.exit(3)\n",
}


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi]]:
    d = Daemon(make_config(tmp_path), shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    yield d, api
    await api.close()
    await d.stop()


async def ctl(d: Daemon, *args: str) -> tuple[int, str, str]:
    """cloudtaskctl as its own process (the daemon serves it from this test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloudtaskd.ctl", *args, "--socket", str(d.config.socket_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(d.config.state_path))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_no_raw_controls(text: str, what: str) -> None:
    found = RAW.search(text)
    assert found is None, f"{what}: raw {found.group()!r} at {found.start()}: {text[:found.start() + 40]!r}"


def test_printable_escapes_every_control_and_keeps_lines_when_asked() -> None:
    assert printable("a\x1b[2Jb\x00c\x07\r\n\t\x7f\x9b\u202ed") == (
        "a\\x1b[2Jb\\x00c\\x07\\x0d\\x0a\\x09\\x7f\\x9b\\u202ed")
    assert printable("line 1\r\n\tline 2\x1b", lines=True) == "line 1\\x0d\n\tline 2\\x1b"
    assert printable("plain ünïcode ✓ 漢字") == "plain ünïcode ✓ 漢字"
    value = {"id": "".join(map(chr, range(0, 0xa0))) + "\u202e\u2066\u2028", "n": [1, None]}
    line = json_line(value)
    assert_no_raw_controls(line, "json_line")
    assert json.loads(line) == value  # still exactly the same JSON value


@pytest.mark.timeout(180)
async def test_ctl_escapes_controls_in_every_human_readable_output(daemon: tuple[Daemon, UnixApi]) -> None:
    d, api = daemon
    tasks = "".join(json.dumps({"id": i, "data": {}, "max_attempts": 1}) + "\n" for i in IDS)
    job_id = await submit(api, LOUD_WORKER, tasks, name="name\x1b[2J\u202e")

    async def finished() -> bool:
        _, job = await api.request("GET", f"/v1/jobs/{job_id}")
        return bool(job["done"])
    await wait_for(finished, timeout=60, message="every task dead")

    async def agent_gone() -> str | None:  # idle, stopped, and its agent no longer writes its log
        _, body = await api.request("GET", "/v1/instances?all=1")
        stopped = [i["id"] for i in body["instances"] if i["state"] == "stopped"]
        return stopped[0] if stopped and "agent_exited" in (
            d.config.state_path / "local" / stopped[0] / "agent.log").read_text() else None
    inst = await wait_for(agent_gone, message="the idle instance stopped")
    # What a bootstrap log holds (apt's and pip's progress bars), in the log the daemon keeps.
    with (d.config.state_path / "local" / inst / "agent.log").open("a") as log:
        log.write("unpacking\x1b[2K\r 50%\r\n\tdone\x1b]0;title\x07\r\n")

    outputs: dict[str, str] = {}
    for args in (["tasks", str(job_id)], ["tasks", str(job_id), "--state", "dead"], ["status"],
                 ["status", str(job_id)], ["events", "--job", str(job_id), "--limit", "100"],
                 ["events", "--limit", "200"], ["instances", "--all"], ["instances", "--logs", inst],
                 ["cancel", str(job_id)], ["drain", "gone\x1b[2J"], ["tasks", str(job_id), "--json"],
                 ["results", str(job_id)], ["events", "--json", "--job", str(job_id)]):
        status, out, err = await ctl(d, *args)
        name = " ".join(args)
        assert_no_raw_controls(out, f"{name}: stdout")
        assert_no_raw_controls(err, f"{name}: stderr")
        outputs[name] = out + err
        assert status == (2 if args[0] == "drain" else 0), (name, err)  # no such instance: exit 2

    table = outputs[f"tasks {job_id}"]
    assert "esc\\x1b[2J\\x1b]0;owne..." in table and "nul\\x00after" in table and "cr\\x0dFAKE LINE" in table
    assert "rlo\\u202etxt.exe" in table and "csi\\x9b31m" in table
    assert len(table.splitlines()) == 1 + len(IDS)  # a CR or newline in an id made no extra line
    assert "name\\x1b[2J\\u202e" in outputs["status"] and "name\\x1b[2J\\u202e" in outputs[f"status {job_id}"]
    # The stderr tail, in the task_dead events' details.
    assert "boom\\x1b[2J\\x1b[31mred" in outputs[f"events --job {job_id} --limit 100"]
    assert "gone\\x1b[2J" in outputs["drain gone\x1b[2J"]  # the daemon's error quotes the id
    # The log keeps its lines and tabs, with every other control escaped (the daemon reads it with
    # universal newlines: a lone CR, a progress bar's, ends a line too).
    assert "unpacking\\x1b[2K\n 50%\n\tdone\\x1b]0;title\\x07\n" in outputs[f"instances --logs {inst}"]

    # Scripts get the exact values back.
    listed = json.loads(outputs[f"tasks {job_id} --json"])["tasks"]
    assert sorted(t["id"] for t in listed) == sorted(IDS)
    results = [json.loads(line) for line in outputs[f"results {job_id}"].splitlines()]
    assert sorted(r["id"] for r in results) == sorted(IDS)
    errors = {r["id"]: r["error"] for r in results}
    assert "NUL" in errors.pop("nul\x00after")  # cannot be put in a command worker's environment
    assert all("boom\x1b[2J\x1b[31mred" in e for e in errors.values())


CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "escapes-test-token"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                 "(install.sh installs it); the status page needs a browser")
@pytest.mark.timeout(180)
async def test_the_status_page_shows_controls_escaped(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    from cloudtaskd.config import ApiConfig, LocalProviderConfig, ProvidersConfig, Secret
    from tests.unit.http.test_observability import CHROMIUM_ARGS

    config = make_config(tmp_path, api=ApiConfig(listen="127.0.0.1:0", token=Secret(TOKEN)),
                         providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=5)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        name = "<b>x</b>\x1b[2J\x00\u202etxt.exe"
        _, worker = await api.request("POST", "/v1/workers", data=bundle(LOUD_WORKER))
        status, job = await api.request("POST", "/v1/jobs", json={"name": name, "worker": worker["digest"]})
        assert status == 201, job
        job_id = job["id"]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await (await browser.new_context(ignore_https_errors=True)).new_page()
                await page.goto(f"{d.api_url}/status#token={TOKEN}")
                cell = page.locator(f'tr[data-job-id="{job_id}"] td.name')
                await expect(cell).to_have_text("<b>x</b>\\x1b[2J\\x00\\u202etxt.exe", timeout=20_000)
                assert await page.locator("#jobs b").count() == 0  # text, never markup
            finally:
                await browser.close()
    finally:
        await api.close()
        await d.stop()
