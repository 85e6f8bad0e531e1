"""Numbers in URLs have one spelling: ASCII digits, no sign, space, underscore or leading zero.
Over a real daemon's HTTP API (raw paths, as a proxy sees them) and cloudtaskctl's arguments."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.ctl.main import main
from cloudtaskd.daemon import Daemon
from cloudtaskd.http.params import decimal_number, whole_number
from tests.conftest import make_config
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import bundle

FULLWIDTH_7, ARABIC_INDIC_7, FULLWIDTH_1 = "\uff17", "\u0667", "\uff11"
# Every one of these reached job 7 through int(); each as it stands in a raw URL path.
LOOSE_SEVENS = ["%207", "7%20", "+7", "0_7", "007", quote(FULLWIDTH_7), quote(ARABIC_INDIC_7), "%097", "7%0A", "-0",
                "0x7", "7.0"]


class Raw:
    """Requests with the path sent byte for byte as written (no client-side normalising)."""

    def __init__(self, socket_path: Path) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path)))

    async def __call__(self, method: str, path: str) -> tuple[int, Any]:
        async with self.session.request(method, URL("http://cloudtaskd" + path, encoded=True)) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Raw]]:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    raw = Raw(d.config.socket_path)
    async with raw.session.post("http://cloudtaskd/v1/workers", data=bundle(PY_WORKER)) as resp:
        digest = (await resp.json())["digest"]
    for _ in range(7):  # jobs 1..7: job 7 exists, so a loose spelling of it would be found
        async with raw.session.post("http://cloudtaskd/v1/jobs", json={"worker": digest}) as resp:
            assert resp.status == 201
    yield d, raw
    await raw.session.close()
    await d.stop()


def test_one_spelling_per_number() -> None:
    assert [whole_number(s) for s in ("0", "7", "1234", "9223372036854775807")] == [0, 7, 1234, 2**63 - 1]
    for loose in ("", " 7", "7 ", "+7", "-7", "0_7", "007", "00", FULLWIDTH_7, ARABIC_INDIC_7, "7\n", "1" * 20,
                  "7.0", "0x7"):
        assert whole_number(loose) is None, loose
    assert [decimal_number(s) for s in ("0.5", "12", "1e-05", "2.5E3")] == [0.5, 12.0, 1e-05, 2500.0]
    for loose in (" 1", "+1", "1_0", FULLWIDTH_1, "nan", "inf", ".5", "1.", "01.5", "1e"):
        assert decimal_number(loose) is None, loose


async def test_job_paths_take_only_the_canonical_id(env: tuple[Daemon, Raw]) -> None:
    _, raw = env
    status, job = await raw("GET", "/v1/jobs/7")
    assert status == 200 and job["id"] == 7
    for loose in [*LOOSE_SEVENS, "0"]:
        for method, path in (("GET", f"/v1/jobs/{loose}"), ("GET", f"/v1/jobs/{loose}/tasks"),
                             ("GET", f"/v1/jobs/{loose}/results"), ("GET", f"/v1/jobs/{loose}/cost"),
                             ("POST", f"/v1/jobs/{loose}/cancel"), ("POST", f"/v1/jobs/{loose}/retry")):
            status, body = await raw(method, path)
            assert status == 404, (method, path, status, body)
            assert body["error"]["type"] == "NotFound"
    _, job = await raw("GET", "/v1/jobs/7")
    assert job["state"] == "active"  # no loose spelling cancelled it


async def test_numeric_query_parameters_take_only_ascii_digits(env: tuple[Daemon, Raw]) -> None:
    _, raw = env
    assert (await raw("GET", "/v1/jobs/7/tasks?limit=5&after=0"))[0] == 200
    assert (await raw("GET", "/v1/events?after=0&job=7&limit=10&wait=0.0"))[0] == 200
    assert (await raw("GET", "/v1/prices?cpus_per_task=0.5&max_price_per_hour=1e-05"))[0] == 200
    for loose in LOOSE_SEVENS:
        for path, name in ((f"/v1/jobs/7/tasks?limit={loose}", "limit"), (f"/v1/jobs/7/tasks?after={loose}", "after"),
                           (f"/v1/jobs/7/results?top={loose}", "top"), (f"/v1/events?after={loose}", "after"),
                           (f"/v1/events?job={loose}", "job"), (f"/v1/events?tail={loose}", "tail")):
            status, body = await raw("GET", path)
            assert status == 400, (path, status, body)
            assert body["error"]["field"] == name
    for path, name in (("/v1/prices?cpus_per_task=%201", "cpus_per_task"), ("/v1/prices?cpus_per_task=1_0",
                                                                             "cpus_per_task"),
                       (f"/v1/prices?memory_per_task={quote(FULLWIDTH_1)}", "memory_per_task"),
                       ("/v1/events?wait=%2B1", "wait")):
        status, body = await raw("GET", path)
        assert status == 400 and body["error"]["field"] == name, (path, status, body)


@pytest.mark.parametrize("argv", [["status", loose]
                                  for loose in ("+7", "0_7", "007", " 7", FULLWIDTH_7, ARABIC_INDIC_7, "0")]
                         + [["tasks", "7", "--limit", "+5"], ["events", "--after", ARABIC_INDIC_7], ["cancel", "-1"]])
def test_ctl_refuses_loose_numbers(argv: list[str], tmp_path: Path) -> None:
    err = io.StringIO()
    sock = str(tmp_path / "no.sock")  # never reached: the arguments are refused first
    assert main([*argv, "--socket", sock], out=io.StringIO(), err=err) == 2
