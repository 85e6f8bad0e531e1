"""Security of every channel: TLS on the agent websocket with the daemon's own CA (pinned by
agents), per-instance tokens revoked when the instance ends, connection and message limits, the
control socket's permissions (tried by other local users), the TCP listener's TLS and bearer
token, and rate limits. A real daemon, real sockets, real users."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from io import StringIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from agent.connection import RETRYABLE_REFUSALS, Agent
from cloudtask_wire.workerspec import WorkerSpec
from cloudtaskd import tls
from cloudtaskd.config import ApiConfig, LocalProviderConfig, ProvidersConfig, Secret
from cloudtaskd.core.states import InstanceEvent
from cloudtaskd.ctl.main import main as ctl_main
from cloudtaskd.daemon import Daemon
from cloudtaskd.errors import CloudtaskError, ProviderError
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.providers.base import CloudInstance
from cloudtaskd.http.access import RateLimiter
from tests.conftest import UnixApi, agent_ssl, make_config, wait_for
from tests.fakes.netproxy import Proxy
from tests.integration.test_daemon_e2e import PY_WORKER
from tests.procs import bundle
from tests.unit.core.test_hub import hello, job_with_tasks

TOKEN = "t0ken-for-the-tcp-listener-0123456789"


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, UnixApi, str]]:
    """A daemon with no instances of its own (the tests play the agents), and a worker."""
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)),
                     api=ApiConfig(listen="127.0.0.1:0", token=Secret(TOKEN)))
    config = replace(config, agents=replace(config.agents, max_messages_per_s=20.0))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    api = UnixApi(config.socket_path)
    _, worker = await api.request("POST", "/v1/workers", data=bundle(PY_WORKER))
    try:
        yield d, api, worker["digest"]
    finally:
        await api.close()
        await d.stop()


async def register(api: UnixApi, digest: str) -> dict[str, Any]:
    status, inst = await api.request("POST", "/v1/instances", json={"worker": digest, "slots": 4})
    assert status == 201
    return inst  # type: ignore[no-any-return]


# ---- the CA ----


def test_the_ca_is_made_once_and_the_server_certificate_follows_the_names(tmp_path: Path) -> None:
    first = tls.ensure(tmp_path / "tls", ["10.0.0.5", "control.example"])
    ca = first.ca_cert.read_bytes()
    cert = first.cert.read_bytes()
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    leaf = x509.load_pem_x509_certificates(cert)[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"localhost", "127.0.0.1", "::1", "10.0.0.5", "control.example"}
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    # Same names: nothing is issued again. New names: a new server certificate from the same CA.
    again = tls.ensure(tmp_path / "tls", ["control.example", "10.0.0.5"])
    assert again.cert.read_bytes() == cert and again.ca_cert.read_bytes() == ca
    moved = tls.ensure(tmp_path / "tls", ["10.0.0.6"])
    assert moved.cert.read_bytes() != cert and moved.ca_cert.read_bytes() == ca


# ---- the agent channel ----


async def test_the_agent_channel_is_tls_and_refuses_plain_or_unpinned_clients(
        daemon: tuple[Daemon, UnixApi, str]) -> None:
    _, api, digest = daemon
    inst = await register(api, digest)
    assert inst["url"].startswith("wss://") and "BEGIN CERTIFICATE" in inst["ca_cert"]
    plain = inst["url"].replace("wss://", "ws://")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):  # no TLS: no websocket at all
            await http.ws_connect(plain)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # the system's CAs do not vouch for it
            await http.ws_connect(inst["url"])
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))  # the daemon's CA does
        assert (await hello(ws, inst))["t"] == "welcome"
        await ws.close()


async def test_an_agent_never_sends_its_token_to_a_daemon_its_ca_did_not_sign(tmp_path: Path) -> None:
    """An impostor with a certificate from another CA (a DNS or route hijack): the agent pins the
    daemon's CA, so the TLS handshake fails before any hello leaves it."""
    impostor = tls.ensure(tmp_path / "impostor", [])
    real = tls.ensure(tmp_path / "real", [])
    hellos: list[str] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            hellos.append(msg.data)
            await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/v1/agent", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=impostor.server_context())
    await site.start()
    port = runner.addresses[0][1]
    proxy = Proxy("127.0.0.1", port)
    await proxy.start()
    spec = WorkerSpec(mode="command", command="true")
    try:
        for ca, should_send in ((real.ca_cert, False), (impostor.ca_cert, True)):
            agent = Agent(f"wss://127.0.0.1:{proxy.port}/v1/agent", "i-1", "secret-agent-token", tmp_path, 1,
                          spec=spec, ca_file=ca)
            before = proxy.connections
            task = asyncio.get_running_loop().create_task(agent._connect_loop())

            async def tried(before: int = before) -> bool:
                return proxy.connections >= before + 2 or bool(hellos)
            await wait_for(tried, message="the agent to dial the impostor")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # The control case shows the recorder works: with the impostor's CA the hello arrives.
            assert any("secret-agent-token" in h for h in hellos) == should_send
    finally:
        await proxy.stop()
        await runner.cleanup()


async def assert_revoked(d: Daemon, http: aiohttp.ClientSession, ws: Any, inst: dict[str, Any]) -> Any:
    """The open connection was closed, the token's hash is gone, and a new hello is refused.
    Returns the instance's row."""
    closed = await ws.receive(timeout=5)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    row = await d.store.fetchone("SELECT * FROM instances WHERE id = ?", (inst["id"],))
    assert row is not None and row["token_hash"] == ""
    again = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
    refused = await hello(again, inst)
    assert (refused["t"], refused["code"]) == ("error", "unauthorized")
    await again.close()
    return row


async def test_a_token_is_revoked_when_its_instance_ends(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    inst = await register(api, digest)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        assert (await hello(ws, inst))["t"] == "welcome"
        await d.store.write(lambda tx: tx.transition_instance(inst["id"], InstanceEvent.LOST))
        await d.hub.disconnect(inst["id"])
        await assert_revoked(d, http, ws, inst)


async def test_connections_per_instance_are_limited(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    inst = await register(api, digest)
    async with aiohttp.ClientSession() as http:
        socks = [await http.ws_connect(inst["url"], ssl=agent_ssl(inst)) for _ in range(3)]
        answers = [await hello(ws, inst) for ws in socks]
        assert [a["t"] for a in answers[:2]] == ["welcome", "welcome"]
        assert (answers[2]["t"], answers[2]["code"]) == ("error", "busy")
        assert "busy" in RETRYABLE_REFUSALS  # an agent waits and tries again, it does not give up
        for ws in socks:
            await ws.close()
        # Once the others are gone there is room again.
        await wait_for(lambda: _no_connections(d, inst["id"]), message="connections closed")
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        assert (await hello(ws, inst))["t"] == "welcome"
        await ws.close()


async def _no_connections(d: Daemon, instance_id: str) -> bool:
    return instance_id not in d.hub.by_instance


async def test_a_flooding_agent_is_slowed_and_the_others_are_served(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    await job_with_tasks(api, digest, 4)
    noisy_inst, quiet_inst = await register(api, digest), await register(api, digest)
    async with aiohttp.ClientSession() as http:
        noisy = await http.ws_connect(noisy_inst["url"], ssl=agent_ssl(noisy_inst))
        quiet = await http.ws_connect(quiet_inst["url"], ssl=agent_ssl(quiet_inst))
        await hello(noisy, noisy_inst)
        await hello(quiet, quiet_inst)
        for _ in range(200):  # 20 messages/s allowed (bursts of 40)
            await noisy.send_str('{"t": "hb", "leases": []}')
        await quiet.send_str('{"t": "lease", "n": 2}')
        grant = json.loads((await quiet.receive(timeout=10)).data)
        assert grant["t"] == "grant" and len(grant["tasks"]) == 2

        async def throttled() -> bool:
            return d.hub.throttled > 0
        await wait_for(throttled, message="the flooding connection to be read more slowly")
        await noisy.close()
        await quiet.close()


# ---- the control API ----


def test_the_rate_limiter_allows_bursts_then_the_rate_per_client() -> None:
    now = [0.0]
    limiter = RateLimiter(per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # empty: one token comes in half a second
    assert limiter.take("b") == 0.0  # another client has its own bucket
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] = 100.0
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled, never above the burst
    assert limiter.take("a") > 0


async def test_the_tcp_listener_needs_tls_and_the_bearer_token(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, _, _ = daemon
    assert d.api_url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(d.config.state_path / "tls" / "ca.pem"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(d.api_url + "/v1/health") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(d.api_url + "/v1/jobs", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}) as resp:
            assert resp.status == 401
        async with http.get(d.api_url + "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200 and (await resp.json())["ok"] is True
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            async with http.get(d.api_url.replace("https://", "http://") + "/v1/health",
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status != 200


async def test_cloudtaskctl_over_tcp_with_the_token_from_the_environment(
        daemon: tuple[Daemon, UnixApi, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    d, api, digest = daemon
    await job_with_tasks(api, digest, 2)
    ca = str(d.config.state_path / "tls" / "ca.pem")
    args = ["--url", d.api_url, "--ca-file", ca, "--socket", str(tmp_path / "nothing.sock"), "status"]
    monkeypatch.setenv("CLOUDTASK_API_TOKEN", TOKEN)
    out, err = StringIO(), StringIO()
    code = await asyncio.to_thread(ctl_main, args, out=out, err=err)
    assert code == 0, err.getvalue()
    assert "queued" in out.getvalue() or "2" in out.getvalue()
    assert TOKEN not in out.getvalue() + err.getvalue()
    monkeypatch.setenv("CLOUDTASK_API_TOKEN", "wrong-token-wrong-token")
    out, err = StringIO(), StringIO()
    assert await asyncio.to_thread(ctl_main, args, out=out, err=err) != 0
    assert "CLOUDTASK_API_TOKEN" in err.getvalue() and "wrong-token" not in err.getvalue()


async def test_a_client_over_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)),
                     api=ApiConfig(listen="127.0.0.1:0", token=Secret(TOKEN), rate_limit_per_s=0.1, rate_burst=2))
    d = Daemon(config, shutdown_grace_s=1)
    await d.start()
    try:
        ctx = ssl.create_default_context(cafile=str(config.state_path / "tls" / "ca.pem"))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), headers=headers) as http:
            statuses = []
            for _ in range(3):
                async with http.get(d.api_url + "/v1/health") as resp:
                    statuses.append(resp.status)
                    retry_after = resp.headers.get("Retry-After")
            assert statuses == [200, 200, 429] and retry_after is not None and int(retry_after) >= 1
        # The unix socket is another client: not starved by the TCP one.
        api = UnixApi(config.socket_path)
        status, _ = await api.request("GET", "/v1/health")
        await api.close()
        assert status == 200
    finally:
        await d.stop()


# ---- the control socket, tried by other local users ----

OTHER, ADMIN, ADMINS = "ctask-other", "ctask-admin", "ctask-admins"
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied"); sys.exit(0)
s.sendall(b"GET /v1/health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""


@pytest.fixture(scope="module")
def local_users() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create local users (CI runs as root)")
    for tool in ("useradd", "groupadd", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (install.sh installs the passwd package)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("/usr/bin/python3 is missing: the other users need a python they can run")

    def exists(db: str, name: str) -> bool:
        return subprocess.run(["getent", db, name], capture_output=True).returncode == 0

    if not exists("group", ADMINS):
        subprocess.run(["groupadd", "--system", ADMINS], check=True)
    for user, extra in ((OTHER, []), (ADMIN, ["-G", ADMINS])):
        if not exists("passwd", user):
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, user],
                           check=True)
    yield


def probe_as(user: str, sock: Path) -> str:
    out = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", PROBE, str(sock)],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_the_control_socket_is_the_daemons_and_its_admin_groups_only(tmp_path: Path, local_users: None) -> None:
    import grp

    run_dir = Path(tempfile.mkdtemp(prefix="cloudtask-run-"))
    os.chmod(run_dir, 0o755)  # as /run is: anyone may look for the socket
    sock = run_dir / "cloudtask" / "cloudtaskd.sock"
    try:
        config = replace(make_config(tmp_path), providers=ProvidersConfig(local=LocalProviderConfig(max_instances=0)),
                         api=ApiConfig(socket=str(sock), socket_group=ADMINS))
        d = Daemon(config, shutdown_grace_s=1)
        await d.start()
        try:
            st = sock.stat()
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(ADMINS).gr_gid
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
            assert await asyncio.to_thread(probe_as, OTHER, sock) == "denied"
            assert await asyncio.to_thread(probe_as, ADMIN, sock) == "HTTP/1.0 200 OK"
        finally:
            await d.stop()
        # Without a group the socket is the daemon's user's alone.
        config = replace(config, api=ApiConfig(socket=str(sock)))
        d = Daemon(config, shutdown_grace_s=1)
        await d.start()
        try:
            assert await asyncio.to_thread(probe_as, ADMIN, sock) == "denied"
        finally:
            await d.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- review fixes: revocation through the reconciler, browsers, event details, half a CA ----


class _Flaky:
    """A provider whose cloud says the VM stopped and whose terminate fails (an API outage)."""

    name = "external"  # the provider a registered instance's id names (external-…)

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    def offers(self) -> list[Any]:
        return []

    async def list_instances(self) -> list[CloudInstance]:
        return [CloudInstance(self.instance_id, "vm-1", running=False)]

    async def terminate(self, instance_id: str) -> None:
        raise ProviderError("flaky", "terminate", "the API is down")


async def test_a_stopped_instance_loses_its_connection_even_when_terminate_fails(
        daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    inst = await register(api, digest)
    flaky = _Flaky(inst["id"])
    reconciler = Reconciler(store=d.store, dispatcher=d.dispatcher, providers=[(flaky, 1)],  # type: ignore[list-item]
                            config=d.config, agent_url=d.agent_url, metrics=d.metrics,
                            sessions=d.dispatcher.sessions, on_instance_end=d.hub.disconnect)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        assert (await hello(ws, inst))["t"] == "welcome"
        # The provider's sync alone: a registered instance stands in for a cloud one here, and the
        # sync of real external rows would stop it at once (it has no provider to terminate it).
        await reconciler._sync(flaky, now=1e9)  # type: ignore[arg-type]
        row = await assert_revoked(d, http, ws, inst)
        assert row["state"] == "stopping" and "the API is down" in row["last_error"]


async def test_a_drained_external_instance_ends_once_its_agent_is_gone(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, digest = daemon
    inst = await register(api, digest)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        assert (await hello(ws, inst))["t"] == "welcome"
        status, _ = await api.request("POST", f"/v1/instances/{inst['id']}/drain")
        assert status == 200
        assert d.reconciler is not None
        await d.reconciler.sync(now=1e9)  # still connected: it stays
        row = await d.store.fetchone("SELECT state FROM instances WHERE id = ?", (inst["id"],))
        assert row is not None and row["state"] == "draining"
        await ws.close()
        await wait_for(lambda: _no_connections(d, inst["id"]), message="the agent gone")

        async def ended() -> bool:
            assert d.reconciler is not None
            await d.reconciler.sync(now=1e9)
            got = await d.store.fetchone("SELECT state, token_hash FROM instances WHERE id = ?", (inst["id"],))
            return got is not None and (got["state"], got["token_hash"]) == ("stopped", "")
        await wait_for(ended, message="the drained external instance ended")


async def test_requests_a_web_page_could_make_are_refused(daemon: tuple[Daemon, UnixApi, str]) -> None:
    d, api, _ = daemon
    assert (await api.request("GET", "/v1/health"))[0] == 200
    status, body = await api.request("POST", "/v1/jobs", data=b'{"worker": "x"}',
                                     headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and "cross-site" in body["error"]["message"]
    status, _ = await api.request("GET", "/v1/jobs", headers={"Host": "evil.example:8080"})
    assert status == 403  # a name rebound to the forwarded port
    assert (await api.request("GET", "/v1/jobs", headers={"Host": "localhost:8080"}))[0] == 200
    ctx = ssl.create_default_context(cafile=str(d.config.state_path / "tls" / "ca.pem"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(d.api_url + "/v1/jobs", headers={**auth, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        async with http.get(d.api_url + "/v1/jobs", headers={**auth, "Origin": d.api_url}) as resp:
            assert resp.status == 200  # the status page's own origin


async def test_secrets_in_an_event_detail_are_redacted(tmp_path: Path) -> None:
    from cloudtaskd import redact
    from cloudtaskd.core.store import Store

    store = Store(tmp_path / "db.sqlite")
    await store.open()
    redact.register("supersecret-value-123456")
    try:
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, state, slots, token_hash, created_at, state_changed_at)"
            " VALUES ('aws-1', 'aws', 'pending', 1, 'h', 0, 0)"))
        await store.write(lambda tx: tx.transition_instance(
            "aws-1", InstanceEvent.LAUNCH_FAILED, error="AuthFailure: key supersecret-value-123456 is bad"))
        rows = await store.fetchall("SELECT detail FROM events WHERE instance_id = 'aws-1'")
        assert rows and all("supersecret" not in str(r["detail"]) for r in rows)
        assert any("<SECRET>" in str(r["detail"]) for r in rows)
    finally:
        redact.forget_all()
        await store.close()


async def test_too_many_connections_waiting_to_authenticate_get_503(
        daemon: tuple[Daemon, UnixApi, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudtaskd.core import hub

    _, api, digest = daemon
    inst = await register(api, digest)
    monkeypatch.setattr(hub, "MAX_UNAUTHENTICATED", 1)
    async with aiohttp.ClientSession() as http:
        silent = await http.ws_connect(inst["url"], ssl=agent_ssl(inst))  # says nothing
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(inst["url"], ssl=agent_ssl(inst))
        assert refused.value.status == 503
        await silent.close()


def test_half_a_ca_is_refused_rather_than_replaced(tmp_path: Path) -> None:
    files = tls.ensure(tmp_path / "tls", [])
    files.ca_cert.unlink()
    with pytest.raises(CloudtaskError, match=r"ca\.pem is missing"):
        tls.ensure(tmp_path / "tls", [])


def test_the_agent_listener_does_not_give_each_tls_connection_a_256_kib_read_buffer(tmp_path: Path) -> None:
    """asyncio zero-fills a 256 KiB read buffer per TLS connection: 500 MiB resident for 2,000 agents
    (benchmarks/scale.py). Making the daemon's server context trims it."""
    import asyncio.sslproto

    files = tls.ensure(tmp_path / "tls", ["127.0.0.1"])
    files.server_context()
    assert asyncio.sslproto.SSLProtocol.max_size <= tls.SSL_READ_BUFFER_BYTES  # what get_buffer() hands to recv_into
