"""Shared fixtures: real SQLite in a temp dir, a real daemon, real websockets."""

from __future__ import annotations

import asyncio
import io
import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psycopg
import pytest

from cloudtaskd.config import AgentsConfig, Config, QueueConfig, ScalingConfig
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Store
from cloudtaskd.ctl.main import main as ctl_main
from cloudtaskd.fleet.runtime import RuntimeBuilder
from tests.fakes import postgres as pg_mod
from tests.fakes import sshd as sshd_mod
from tests.fakes.moto_ec2 import MotoEc2

if TYPE_CHECKING:
    from cloudtaskd.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread a test left running (an aiosqlite connection never closed, a worker pool) keeps the
    interpreter from exiting: the run would hang after its summary, for ever in CI. Name the threads
    and exit with the run's status, or failed if it passed (the leak is a bug of its own)."""
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left:
        return
    sys.stderr.write(f"\ntests left {len(left)} thread(s) running, which would hang the exit: "
                     f"{', '.join(sorted(t.name for t in left))}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    status = int(getattr(config, "_cloudtask_exitstatus", 0)) or 1
    os._exit(status)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._cloudtask_exitstatus = exitstatus  # type: ignore[attr-defined]  # read at unconfigure


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the fault-injection tests at soak size (longer, more faults); "
                          "CLOUDTASK_SOAK=1 does the same")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True in soak mode: fault tests scale their counts up (tasks, kills, rounds, examples)."""
    return bool(request.config.getoption("--soak") or os.environ.get("CLOUDTASK_SOAK") == "1")


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.05,
                   message: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with a message at the deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)


def agent_ssl(inst: dict[str, Any]) -> ssl.SSLContext:
    """What an agent registered through POST /v1/instances trusts: the daemon's CA only."""
    return ssl.create_default_context(cadata=inst["ca_cert"])


RUNTIME_CACHE = Path(os.environ.get("CLOUDTASK_TEST_RUNTIME", "/var/cache/cloudtask-tests/runtime"))


def test_runtime() -> RuntimeBuilder:
    """The agent's runtime for instances, built once per (Python, CPU) and kept across test runs."""
    return RuntimeBuilder(RUNTIME_CACHE)


test_runtime.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def interpreters() -> list[str]:
    """Every Python on this machine (pyenv's and Debian's): instances run 3.9 and newer."""
    found = ["/usr/bin/python3", sys.executable]
    pyenv = Path.home() / ".pyenv" / "versions"
    for minor in ("3.9", "3.10", "3.11", "3.12", "3.13"):
        found += sorted(str(p / "bin" / "python") for p in pyenv.glob(f"{minor}.*") if (p / "bin" / "python").exists())
    return [p for p in dict.fromkeys(found) if Path(p).exists()]


def python_version(python: str) -> tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    config = Config(
        state_dir=str(tmp_path / "state"),
        agents=AgentsConfig(lease_ttl_s=overrides.pop("lease_ttl_s", 30.0)),
        queue=QueueConfig(retry_backoff_s=overrides.pop("retry_backoff_s", 0.05), retry_backoff_max_s=1.0),
        scaling=ScalingConfig(tick_s=0.1, idle_timeout_s=overrides.pop("idle_timeout_s", 1.0)),
    )
    return replace(config, **overrides)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[sshd_mod.Sshd]:
    """A real OpenSSH server on 127.0.0.1 for the test (tests that need it skip without sshd)."""
    server = sshd_mod.Sshd(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(sqlite_store: Store) -> Store:
    return sqlite_store


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "test.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PgStore]:
    """The PostgreSQL store on a fresh database of the session's server."""
    s = PgStore(pg_dsn)
    await s.open()
    yield s
    await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def both_stores(request: pytest.FixtureRequest) -> Store:
    """The store on each backend in turn: a module runs its tests on both by defining
    `store(both_stores)`. PgStore has the doors of Store; tests call it through them."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_store")  # type: ignore[no-any-return]
    return request.getfixturevalue("pg_store")  # type: ignore[no-any-return]


class UnixApi:
    """A minimal raw client for the daemon's control socket (tests of the API itself)."""

    def __init__(self, socket_path: Path) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path)))

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, f"http://cloudtaskd{path}", **kw) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def close(self) -> None:
        await self.session.close()


async def ctl(d: Daemon, *argv: str) -> tuple[int, str, str]:
    """The real command line against the daemon's socket, in a thread (main runs its own event loop):
    (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = await asyncio.to_thread(ctl_main, [*argv, "--socket", str(d.config.socket_path)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoEc2]:
    """moto's EC2 as a real HTTP server (tests/fakes/moto_ec2.py), one for the session: tests reset it."""
    server = MotoEc2()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake AWS credentials in the environment, and no other source of any."""
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_CONFIG_FILE", str(tmp_path / "none")),
                       ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none")), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg_mod.PostgresServer]:
    """A real PostgreSQL (tests/fakes/postgres.py), one for the session: each test gets its own database
    (pg_dsn). A test may restart it; it comes back on the same port with its data."""
    reason = pg_mod.unavailable()
    if reason is not None:
        if os.geteuid() == 0:  # CI runs as root and install.sh installs the package: never skip there
            pytest.fail(reason)
        pytest.skip(reason)
    server = pg_mod.PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def pg_dsn(pg_server: pg_mod.PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the session's server, dropped after the test: its DSN."""
    name = f"t{uuid.uuid4().hex[:12]}"
    admin = await psycopg.AsyncConnection.connect(pg_server.dsn(), autocommit=True)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await admin.close()
    yield pg_server.dsn(name)
    if not pg_server.running():
        pg_server.start()  # a test that stopped it
    admin = await psycopg.AsyncConnection.connect(pg_server.dsn(), autocommit=True)
    try:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()
