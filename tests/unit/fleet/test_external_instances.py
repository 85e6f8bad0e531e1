"""Machines registered by hand (POST /v1/instances) end after a bound when their agent never
connects, and at once when drained before it did: a real daemon, a real websocket, a short bound."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloudtaskd.config import LocalProviderConfig, ProvidersConfig
from cloudtaskd.ctl.main import main
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, agent_ssl, make_config, wait_for
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import bundle

SHORT_S = 1.0


@asynccontextmanager
async def daemon(tmp_path: Path, connect_timeout_s: float) -> AsyncIterator[tuple[Daemon, UnixApi, str]]:
    config = make_config(tmp_path)
    config = replace(config, agents=replace(config.agents, external_connect_timeout_s=connect_timeout_s),
                     providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(d.config.socket_path)
    try:
        _, worker = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
        yield d, api, worker["digest"]
    finally:
        await api.close()
        await d.stop()


async def register(api: UnixApi, digest: str) -> dict[str, Any]:
    status, inst = await api.request("POST", "/v1/instances", json={"worker": digest, "slots": 2})
    assert status == 201, inst
    return dict(inst)


async def instance(api: UnixApi, inst_id: str) -> dict[str, Any]:
    _, body = await api.request("GET", "/v1/instances?all=1")
    return next(i for i in body["instances"] if i["id"] == inst_id)


def in_state(api: UnixApi, inst_id: str, state: str) -> Callable[[], Any]:
    async def check() -> dict[str, Any] | None:
        inst = await instance(api, inst_id)
        return inst if inst["state"] == state else None
    return check


async def hello(http: aiohttp.ClientSession, inst: dict[str, Any]) -> dict[str, Any]:
    ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
    try:
        await ws.send_str(json.dumps({"t": "hello", "version": 1, "instance": inst["id"], "token": inst["token"],
                                      "slots": 2, "held": []}))
        return dict(json.loads((await ws.receive(timeout=5)).data))
    finally:
        await ws.close()


async def ctl(d: Daemon, *args: str) -> str:
    out = io.StringIO()
    status = await asyncio.to_thread(main, [*args, "--socket", str(d.config.socket_path)], out=out, err=out)
    assert status == 0, out.getvalue()
    return out.getvalue()


@pytest.mark.timeout(60)
async def test_a_token_never_used_expires_with_its_instance(tmp_path: Path) -> None:
    async with daemon(tmp_path, SHORT_S) as (d, api, digest), aiohttp.ClientSession() as http:
        idle = await register(api, digest)
        used = await register(api, digest)
        assert (await hello(http, used))["t"] == "welcome"  # connects in time: not touched by the bound

        ended = await wait_for(in_state(api, idle["id"], "stopped"), message="the unused instance stopped")
        assert "external_connect_timeout_s" in ended["last_error"] and ended["ended_at"] is not None
        refused = await hello(http, idle)
        assert refused["t"] == "error" and refused["code"] == "unauthorized"  # the token is revoked
        assert (await instance(api, used["id"]))["state"] == "running"

        _, page = await api.request("GET", f"/v1/events?instance={idle['id']}")
        kinds = [e["kind"] for e in page["events"]]
        assert kinds == ["instance_registered", "instance_start_failed", "instance_terminated"], kinds
        assert "did not connect within 1 s" in page["events"][1]["detail"]
        listed = await ctl(d, "instances", "--all")
        row = next(line for line in listed.splitlines() if line.startswith(idle["id"]))
        assert " stopped " in row and "did not connect" in row


@pytest.mark.timeout(60)
async def test_drained_before_it_connected_ends_at_once(tmp_path: Path) -> None:
    # The bound is an hour here: what ends this instance is the drain, not the timeout.
    async with daemon(tmp_path, 3600.0) as (_, api, digest), aiohttp.ClientSession() as http:
        inst = await register(api, digest)
        status, drained = await api.request("POST", f"/v1/instances/{inst['id']}/drain")
        assert status == 200 and drained["state"] == "stopping"
        await wait_for(in_state(api, inst["id"], "stopped"), message="the drained instance stopped")
        refused = await hello(http, inst)
        assert refused["t"] == "error" and refused["code"] == "unauthorized"
        _, page = await api.request("GET", f"/v1/events?instance={inst['id']}")
        assert [e["kind"] for e in page["events"]] == ["instance_registered", "instance_drain", "instance_terminated"]


@pytest.mark.timeout(60)
async def test_a_connected_external_instance_drains_and_ends(tmp_path: Path) -> None:
    """The path that already worked (drained after connecting, its agent gone) still does."""
    async with daemon(tmp_path, SHORT_S) as (_, api, digest), aiohttp.ClientSession() as http:
        inst = await register(api, digest)
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        await ws.send_str(json.dumps({"t": "hello", "version": 1, "instance": inst["id"], "token": inst["token"],
                                      "slots": 2, "held": []}))
        assert json.loads((await ws.receive(timeout=5)).data)["t"] == "welcome"
        status, drained = await api.request("POST", f"/v1/instances/{inst['id']}/drain")
        assert status == 200 and drained["state"] == "draining"
        await ws.close()
        await wait_for(in_state(api, inst["id"], "stopped"), message="the drained instance stopped")


@pytest.mark.parametrize("value", ["0", "-1", "2592001", "never"])
def test_the_bound_is_validated(tmp_path: Path, value: str) -> None:
    from cloudtaskd.config import load_config
    from cloudtaskd.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text(f"agents:\n  external_connect_timeout_s: {value}\n")
    with pytest.raises(ConfigError, match=r"agents\.external_connect_timeout_s"):
        load_config(str(path))
    path.write_text("agents:\n  external_connect_timeout_s: 90\n")
    assert load_config(str(path)).agents.external_connect_timeout_s == 90.0
