"""cloudtaskd: wiring only — store, dispatcher, agent hub, control API, provider, reconciler.

Background loops are supervised: each is named and watched, and if one dies the daemon stops
loudly instead of limping on without, say, its dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import signal
import socket
import sqlite3
import sys
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

import structlog
from aiohttp import web

from cloudtaskd import tls
from cloudtaskd.config import Config, load_config
from cloudtaskd.core.dispatch import Dispatcher
from cloudtaskd.core.housekeeping import Housekeeper
from cloudtaskd.core.hub import AgentHub
from cloudtaskd.core.metrics import Metrics
from cloudtaskd.core.pg import replica, shared_identity
from cloudtaskd.core.pg.leader import Leadership
from cloudtaskd.core.pg.notify import Listener
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import instances, meta
from cloudtaskd.core.tables import tasks as queue
from cloudtaskd.errors import CloudtaskError, ConfigError, StateDirBusy, StoreError
from cloudtaskd.fleet.catalog import Fetcher
from cloudtaskd.fleet.interruptions import Recorded
from cloudtaskd.fleet.orchestrator.market import Market
from cloudtaskd.fleet.orchestrator.reconciler import Reconciler
from cloudtaskd.fleet.providers import login_key, registry
from cloudtaskd.fleet.providers.base import Provider
from cloudtaskd.fleet.providers.descriptors import ProviderEnv
from cloudtaskd.fleet.providers.local import LocalProvider
from cloudtaskd.fleet.retunnel import SshOf, orphans, retunnel, tunnel_all
from cloudtaskd.fleet.runtime import RuntimeBuilder
from cloudtaskd.fleet.tunnels import Tunnels
from cloudtaskd.http.access import RateLimiter, bearer_auth, browser_guard, prepare_socket_dir, secure_socket
from cloudtaskd.http.api import ControlApi, errors_middleware
from cloudtaskd.http.bundles import Bundles
from cloudtaskd.http.runs import Runs
from cloudtaskd.http.series import SERIES_INTERVAL_S, SERIES_WINDOW_S, StatusSeries
from cloudtaskd.http.submissions import resume_uploads
from cloudtaskd.listeners import CONTROL_BACKLOG, RUNNER_SHUTDOWN_S, agent_socket, tls_files, url_host
from cloudtaskd.reload import ReloadPlan, plan
from cloudtaskd.service import Systemd, watchdog

log = structlog.get_logger("cloudtaskd")

SHUTDOWN_GRACE_S = 30.0
PRUNE_INTERVAL_S = 600.0  # how often unused worker bundles are looked for


def make_store(config: Config) -> Store:
    """The store the `database` key names: the embedded SQLite file in state_dir, or PostgreSQL."""
    if config.postgres:
        # PgStore has every door of Store and runs the same table functions (the store, table and API
        # tests run on both); typed as Store so that every part takes either.
        return cast(Store, PgStore(config.database.reveal()))
    return Store(config.state_path / "cloudtask.db")


def shared_identities(config: Config, tls_files: tls.TlsFiles | None,
                      env: ProviderEnv) -> list[shared_identity.Identity]:
    """What a replica must share with the others on its database: its TLS CA if anything pins it, and
    the SSH key of each provider it starts whose VMs carry the daemon's key (made first if it is the
    daemon's own and missing, so the check runs on the key the provider will use)."""
    out: list[shared_identity.Identity] = []
    if tls_files is not None and shared_identity.ca_pinned(config):
        out.append(shared_identity.tls_ca(tls.ca_fingerprint(tls_files.ca_cert), tls_files.ca_cert))
    for name, key in registry.login_keys(config.providers, env):
        out.append(shared_identity.ssh_key(name, login_key.fingerprint(name, key, config.source), key))
    return out


class Daemon:
    def __init__(self, config: Config, *, shutdown_grace_s: float = SHUTDOWN_GRACE_S, embedded: bool = False,
                 series_interval_s: float = SERIES_INTERVAL_S, series_window_s: float = SERIES_WINDOW_S) -> None:
        """embedded: started by `cloudtaskctl run` for its duration. Jobs of runs not attached are held
        at once (no daemon ran on the directory, so a run still alive attaches within a second), where a
        standalone daemon gives its runs api.run_attach_ttl_s after its start to come back; and its
        health says so, so that an attached run that loses it starts its own rather than wait for a
        service to come back."""
        self.config = config
        self.embedded = embedded
        self.shutdown_grace_s = shutdown_grace_s
        self.state_dir = config.state_path
        self.store = make_store(config)
        # The daemon's one Metrics, passed to each part that records into it.
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.store, config, metrics=self.metrics)
        # The status page's plots (the tests sample faster and keep a shorter window).
        self.series = StatusSeries(self.store, interval_s=series_interval_s, window_s=series_window_s)
        # Cancels and deletes in chunks, the event log's retention, the database given back (issue 15).
        self.housekeeper = Housekeeper(store=self.store, dispatcher=self.dispatcher, config=config)
        # The agent's packages for instances, per (Python, CPU), built on first need (runtime.py).
        self.runtime = RuntimeBuilder(self.state_dir / "runtime", tuple(config.providers.ssh.pip_args))
        # Without agents.public_url, ssh and cloud instances' agents come through SSH tunnels
        # (tunnels.py); the destination is set once the agent listener is bound.
        self.tunnels: Tunnels | None = None if config.agents.public_url else Tunnels("127.0.0.1", 0, "wss")
        ttl_s = config.api.run_attach_ttl_s
        self.runs = Runs(store=self.store, dispatcher=self.dispatcher, ttl_s=ttl_s, grace_s=0.0 if embedded else ttl_s)
        # The hub and the reconciler call each other: the reconciler closes an ended instance's
        # connections (hub.disconnect, passed to it), the hub tells the reconciler of a spot notice
        # (through _spot_notice: the reconciler is built once the agent listener is bound).
        self.hub = AgentHub(store=self.store, dispatcher=self.dispatcher, config=config, on_notice=self._spot_notice)
        self.bundles = Bundles(self.store, self.state_dir / "workers", config.workers,
                               shared=isinstance(self.store, PgStore))
        self.agent_url = ""
        self.agent_ca = b""  # the CA agents pin (PEM); empty when the agent channel is plain
        self.api_url = ""  # the TCP control listener, when configured
        self.tls: tls.TlsFiles | None = None
        self.daemon_id = ""
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_file: IO[str] | None = None
        self.providers: list[tuple[Provider, int]] = []
        self.reconciler: Reconciler | None = None
        # Replicas on PostgreSQL only (None on SQLite: one daemon, always the orchestrator).
        self.leadership: Leadership | None = None
        self.broadcaster: replica.Broadcaster | None = None
        self.api: ControlApi | None = None
        self.failed = asyncio.Event()
        # Told the new level when a reload changes log_level (serve(): logging set up again).
        self.on_log_level: Callable[[str], None] | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # Nothing half-started stays behind: listeners, background tasks, the database, the lock.
            for runner in reversed(self._runners):
                with suppress(Exception):
                    await runner.cleanup()
            self._runners.clear()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            with suppress(Exception):
                await self._close_resources()
            raise

    async def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        await self.store.open()
        # The daemon id is claimed in one transaction with the shared-identity check, before this replica
        # writes anything else to a shared database, opens a listener or starts a provider: one with a CA
        # or a VMs' SSH key of its own must not start at all, and writes nothing but the (shared,
        # idempotent) migrations store.open() ran (core/pg/shared_identity.py). The CA is made before
        # that, so it carries the id this start proposes; a replica losing the first start's race to
        # another labelled its new CA with an id not kept (only the certificate's name shows it).
        proposed = await self.store.read(_known_daemon_id) or uuid.uuid4().hex[:16]
        self.daemon_id = proposed
        self.tls = tls_files(self.config, proposed)
        identities = shared_identities(self.config, self.tls, self._provider_env()) if self.config.postgres else []
        self.daemon_id, firsts = await self.store.write(claim_start, proposed, identities)
        for identity, first in zip(identities, firsts, strict=True):
            log.info(f"{identity.event}_recorded" if first else f"{identity.event}_matches", **identity.log_fields)
        self.providers = self._providers()  # cloud resources are tagged with the daemon id
        self.market = Market(self.store, [p for p, _ in self.providers], self._catalog_fetchers())
        await self.market.load()
        # Stored times are on the clock of the daemon that wrote them: re-based here, in case the wall
        # clock stepped while the daemon was down (cloudtaskd.core.clock).
        # Replicas: only leases of agents no live replica holds (extend_all_leases).
        renewed = await self.store.write(queue.extend_all_leases, self.config.agents.lease_ttl_s,
                                         replica.PRESENCE_TTL_S if self.config.postgres else None)
        capped = await self.store.write(queue.cap_retry_due, self.config.queue.retry_backoff_max_s)
        await resume_uploads(self.store)
        log.info("store_opened", database=self.store.describe(), leases_renewed=renewed, retries_brought_forward=capped,
                 daemon_id=self.daemon_id)

        agents = self.config.agents
        agent_app = web.Application(client_max_size=agents.max_message_bytes)
        agent_app.router.add_get("/v1/agent", self.hub.handle)
        agent_runner = await self._runner(agent_app)
        ssl_ctx = self.tls.server_context() if agents.tls and self.tls is not None else None
        sock = agent_socket(self.state_dir, self.config.agents)
        await web.SockSite(agent_runner, sock, ssl_context=ssl_ctx).start()
        port = int(sock.getsockname()[1])
        scheme = "wss" if ssl_ctx is not None else "ws"
        self.agent_url = agents.public_url or f"{scheme}://{url_host(agents.listen_host)}:{port}/v1/agent"
        for provider, _ in self.providers:
            if isinstance(provider, LocalProvider):
                told = provider.publish_urls(agents.dial_urls(self.agent_url))
                if told:
                    log.info("agent_url_published", url=self.agent_url, urls=list(agents.dial_urls(self.agent_url)),
                             instances=told)
        self.agent_ca = self.tls.ca_cert.read_bytes() if ssl_ctx is not None and self.tls is not None else b""
        if self.tunnels is not None:
            self.tunnels.dest_host = url_host(agents.listen_host).strip("[]")
            self.tunnels.dest_port, self.tunnels.scheme = port, scheme
            await self._tunnel_existing()

        reconciler = self.reconciler = Reconciler(
            store=self.store, dispatcher=self.dispatcher, providers=self.providers, config=self.config,
            agent_url=self.agent_url, metrics=self.metrics, sessions=self.dispatcher.sessions, market=self.market,
            agent_ca=self.agent_ca, on_instance_end=self.hub.disconnect,
            presence_ttl_s=replica.PRESENCE_TTL_S if self.config.postgres else None,
            worker_dir=self.bundles.ensure)
        api = self.api = ControlApi(
            store=self.store, dispatcher=self.dispatcher, config=self.config, metrics=self.metrics,
            sessions=self.dispatcher.sessions, market=self.market, series=self.series, housekeeper=self.housekeeper,
            runs=self.runs, bundles=self.bundles, waits=lambda pool_id: reconciler.waits.get(pool_id),
            daemon_id=self.daemon_id, agent_url=lambda: self.agent_url, agent_ca=self.agent_ca.decode(),
            embedded=self.embedded)
        await self._control_listeners(api)

        self._spawn("dispatcher", self.dispatcher.run())
        if self.config.postgres:
            self._replicate(reconciler)
        else:
            self._spawn("reconciler", reconciler.run())
        self._spawn("bundle_pruner", self._prune_bundles())
        self._spawn("status_series", self.series.run())
        # Goes on at once with a cancel or delete a crash cut short (their rows say where).
        self._spawn("housekeeper", self.housekeeper.run())
        self._spawn("runs", self.runs.run())
        log.info("daemon_ready", agent_url=self.agent_url, socket=str(self.config.socket_path),
                 api_url=self.api_url or None)

    def _replicate(self, reconciler: Reconciler) -> None:
        """On PostgreSQL, each replica contends for the orchestrator and runs it only while it leads
        (leader.py); tells the others of work it made ready and listens for theirs (notify.py); writes
        its agents' presence for the leader; and looks for work every few seconds regardless. The
        dispatcher, the housekeeping and the control API run on every replica (docs/replicas.md)."""
        dsn = self.config.database.reveal()
        self.leadership = Leadership(dsn, name=f"{socket.gethostname()}:{os.getpid()}")
        gate = replica.LeaderGate(self.leadership, partial(self._lead, reconciler), name="reconciler")
        self.leadership.on_change = gate.on_change
        broadcaster = self.broadcaster = replica.Broadcaster(dsn)
        self.dispatcher.on_work = broadcaster.announce
        wake = partial(self.dispatcher.notify_work, announce=False)
        listener = Listener(dsn, on_notify=lambda payload: replica.woken(payload, wake))
        self._spawn("leadership", self.leadership.run())
        store = self.store
        assert isinstance(store, PgStore)
        self._spawn("pg_cutoff", replica.cutoff(
            self.leadership, abort_store=store.abort_sessions,
            close_agents=partial(self.hub.close_all, b"this replica cannot reach the database: use another")))
        self._spawn("reconciler", gate.run())
        self._spawn("pg_notify", broadcaster.run())
        self._spawn("pg_listener", listener.run())
        self._spawn("presence", replica.presence(self.store, lambda: list(self.dispatcher.sessions)))
        self._spawn("repoll", replica.repoll(lambda: self.dispatcher.notify_work(announce=False)))

    async def _lead(self, reconciler: Reconciler) -> None:
        """What the leader runs: the orchestrator and, with tunnels, the re-tunnelling of the agents
        of replicas that are gone (fleet/retunnel.py). Both are cancelled when it steps down."""
        async with asyncio.TaskGroup() as group:
            group.create_task(reconciler.run())
            if self.tunnels is not None:
                group.create_task(retunnel(self.store, self.tunnels, self._ssh_connectors(),
                                           lambda: self.dispatcher.sessions, replica.PRESENCE_TTL_S))

    async def _runner(self, app: web.Application) -> web.AppRunner:
        """A set-up runner for one listener, stopped with the daemon (the agent listener first)."""
        # auto_decompress off: no client of ours sends a Content-Encoding (a worker bundle is a gzip
        # file as the body), and aiohttp, left to decode one, drains an unread broken body after the
        # answer and logs its failure as an unhandled exception (api.errors_middleware answers 415).
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=RUNNER_SHUTDOWN_S,
                               auto_decompress=False)
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _control_listeners(self, api: ControlApi) -> None:
        """The unix socket (the daemon's user and api.socket_group only) and, if configured, a TCP
        listener that takes TLS and the bearer token only. Each has its own rate limits."""
        cfg = self.config.api
        limiter = RateLimiter(cfg.rate_limit_per_s, cfg.rate_burst)
        unix_app = web.Application(middlewares=[errors_middleware, browser_guard(local_only=True), limiter.middleware],
                                   client_max_size=1 << 20)
        unix_app.add_routes(api.routes())
        unix_runner = await self._runner(unix_app)
        sock = self.config.socket_path
        prepare_socket_dir(sock, self.state_dir, cfg.socket_group, self.config.source)
        await web.UnixSite(unix_runner, str(sock), backlog=CONTROL_BACKLOG).start()
        secure_socket(sock, cfg.socket_group, self.config.source)
        if not cfg.listen:
            return
        host, _, port = cfg.listen.rpartition(":")
        tcp_app = web.Application(
            # The token first: only authenticated clients get a rate-limit bucket.
            middlewares=[errors_middleware, browser_guard(local_only=False), bearer_auth(cfg.token.reveal()),
                         limiter.middleware],
            client_max_size=1 << 20)
        tcp_app.add_routes(api.routes())
        tcp_runner = await self._runner(tcp_app)
        if cfg.tls_cert:
            ctx = tls.server_context(Path(cfg.tls_cert), Path(cfg.tls_key))
        else:
            assert self.tls is not None
            ctx = self.tls.server_context()
        await web.TCPSite(tcp_runner, host.strip("[]"), int(port), ssl_context=ctx, backlog=CONTROL_BACKLOG).start()
        bound = tcp_runner.addresses[0]
        self.api_url = f"https://{url_host(host)}:{bound[1]}"

    def _provider_env(self) -> ProviderEnv:
        return ProviderEnv(daemon_id=self.daemon_id, state_dir=self.state_dir, store=self.store, runtime=self.runtime,
                           tunnels=self.tunnels, source=self.config.source)

    def _providers(self) -> list[tuple[Provider, int]]:
        """The configured providers with their instance limits, in order of preference (the
        registry's launch_order): machines elsewhere before the control host itself."""
        env = self._provider_env()
        out: list[tuple[Provider, int]] = []
        for d in registry.launch_order():
            section = d.section(self.config.providers)
            if d.launches(section):
                out.append((d.start(section, env), d.max_instances(section)))
        return out

    def _catalog_fetchers(self) -> dict[str, Fetcher]:
        """How each started provider with a catalog fetches its offers (only the types its config allows)."""
        fetchers: dict[str, Fetcher] = {}
        for provider, _ in self.providers:
            d = registry.find(provider.name)
            if d is not None and d.catalog is not None:  # a provider outside the registry: a test's own
                fetchers[d.name] = d.catalog(d.section(self.config.providers), provider)
        return fetchers

    @staticmethod
    def _local_names() -> set[str]:
        """The providers whose machines are this host (they stop with the service): not remote."""
        return {d.name for d in registry.PROVIDERS if not d.remote}

    def _lock(self) -> None:
        self._lock_file = open(self.state_dir / "cloudtaskd.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Not ours: stop() must then leave the running daemon's socket alone.
            self._lock_file.close()
            self._lock_file = None
            raise StateDirBusy(f"another cloudtaskd is running on the state directory {self.state_dir}") from None

    async def _spot_notice(self, recorded: Recorded) -> None:
        """The hub recorded a spot notice: the reconciler replaces the instance now (none before start)."""
        if self.reconciler is not None:
            await self.reconciler.notice(recorded)

    async def _prune_bundles(self) -> None:
        """Worker bundles no job uses are removed once old enough (the state disk is not a dump)."""
        while True:
            try:
                await self.bundles.prune()
            except StoreError as exc:  # a full or failing disk: the store says so; try again later
                log.warning("bundle_prune_failed", error=str(exc))
            await asyncio.sleep(min(PRUNE_INTERVAL_S, self.config.workers.unused_ttl_s / 2))

    async def _tunnel_existing(self) -> None:
        """After a restart: the tunnels of instances whose agents are out there, set up again (their
        agents read the new port from agent.url and reconnect). On PostgreSQL only those of agents
        no live replica holds: the others stay on their replica's tunnel (fleet/retunnel.py)."""
        assert self.tunnels is not None
        rows = await self.store.read(instances.with_agents)
        if self.config.postgres:
            rows = orphans(rows, here=(), tunnelled=(), now=self.store.clock.now(),
                           presence_ttl_s=replica.PRESENCE_TTL_S)
        tunnel_all(self.tunnels, rows, self._ssh_connectors())

    def _ssh_connectors(self) -> dict[str, SshOf]:
        """provider name -> its `ssh(instance_id)`, for the providers whose agents can be tunnelled."""
        return {p.name: p.ssh for p, _ in self.providers if hasattr(p, "ssh")}

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            log.error("background_task_died", task=name, error=repr(exc))
            self.failed.set()

        task.add_done_callback(done)
        self._tasks.append(task)

    def status_line(self) -> str:
        """Where the daemon serves, for `systemctl status` (sd_notify STATUS=)."""
        tcp = f"; control API {self.api_url}" if self.api_url else ""
        return f"agents at {self.agent_url}; control socket {self.config.socket_path}{tcp}"

    async def health(self) -> str | None:
        """None while the daemon can do its work, else why not (the watchdog asks before each ping)."""
        if self.failed.is_set():
            return "a supervised background task has died"
        ended = [t.get_name() for t in self._tasks if t.done()]
        if ended:
            return f"background task {', '.join(ended)} is not running"
        await self.store.fetchone("SELECT 1")  # the reader connection (the control API's)
        await self.store.write(_no_change)  # the writer, which a stuck dispatch round would hold
        return None

    def reload(self, new: Config) -> ReloadPlan:
        """Take what may change while running from a freshly loaded config (cloudtaskd/reload.py
        says which keys); every other changed key keeps its old value until a restart, with a
        warning naming it. Returns what was applied and what was not."""
        limits = self.reconciler.limits if self.reconciler is not None else {p.name: n for p, n in self.providers}
        result = plan(self.config, new, limits)
        config = self.config = result.config
        if "log_level" in result.applied and self.on_log_level is not None:
            self.on_log_level(config.log_level)  # first, so the lines below show at the new level
        # Each part takes what it reads from the new config (the API its bundle store's caps too).
        self.dispatcher.apply_config(config)
        self.hub.apply_config(config)
        self.housekeeper.apply_config(config)
        self.bundles.apply_config(config.workers)
        if self.api is not None:
            self.api.apply_config(config)
        if self.reconciler is not None:
            self.reconciler.apply_config(config)
        for key in result.needs_restart:
            log.warning("config_change_needs_restart", key=key,
                        reason=result.reasons.get(key, "bound when the daemon starts"))
        log.info("config_reloaded", source=new.source, applied=list(result.applied),
                 needs_restart=list(result.needs_restart))
        return result

    async def stop(self, *, keep_remote: bool = False) -> None:
        """Stop the daemon. By default every instance is drained and terminated: `cloudtaskctl run`'s
        embedded daemon leaves nothing behind. keep_remote (a service stop or restart): only the
        local provider's agents, processes on this host that would die with the service anyway,
        are drained and stopped; instances elsewhere keep running and keep their leases, and their
        agents reconnect to the next daemon on this state directory, which extends every lease."""
        log.info("daemon_stopping", keep_remote=keep_remote)
        # Stop accepting first: no new job, upload or drain request while the fleet is put away.
        # The agent listener (runners[0]) stays: local agents hand back over it while they drain.
        self.store.end_waits()  # long polls of GET /v1/events answer now, not at their deadline
        for runner in reversed(self._runners[1:]):
            with suppress(Exception):
                await runner.cleanup()
        del self._runners[1:]
        if self.leadership is not None:
            # Another replica takes the orchestrator at its next try, not when this session ends; the
            # gate cancels this one's reconciler loop at once (stop_all below is this host's only).
            with suppress(Exception):
                await self.leadership.resign()
        if self.reconciler is not None:
            with suppress(Exception):
                await self.reconciler.stop_all(self.shutdown_grace_s, self._local_names() if keep_remote else None)
        # Stop listening before the dispatcher, so no report arrives that nobody will commit.
        await self.hub.close_all()
        for runner in reversed(self._runners):
            with suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self.api is not None:
            await self.api.feeds.close()  # result followers' pollers: their streams are closed already
        with suppress(Exception):
            await asyncio.wait_for(self.dispatcher.round(), timeout=5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.reconciler is not None:
            with suppress(Exception):
                await self.reconciler.abandon_launches()
        await self._close_resources()
        log.info("daemon_stopped")

    async def _close_resources(self) -> None:
        """Tunnels, providers' clients, the database and the state lock (with the socket it guards)."""
        if self.tunnels is not None:
            await self.tunnels.close_all()
        if self.broadcaster is not None:
            await self.broadcaster.close()
        for provider, _ in self.providers:
            with suppress(Exception):
                await provider.close()
        await self.store.close()
        if self._lock_file is not None:  # the socket is ours only while we hold the state lock
            with suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            self._lock_file.close()
            self._lock_file = None


def _no_change(tx: Tx) -> None:
    """An empty write transaction: the writer connection answers."""


def _known_daemon_id(db: sqlite3.Connection) -> str | None:
    return meta.get(db, meta.DAEMON_ID)


def claim_start(tx: Tx, proposed_id: str,
                 identities: Sequence[shared_identity.Identity]) -> tuple[str, list[bool]]:
    """The daemon id (the one recorded, else `proposed_id`; on PostgreSQL shared by every replica) and
    shared_identity.check's answer, in one transaction: a replica refused by the check records neither.
    Two first starts at once get one id (meta.claim), where a read then an insert failed one of them
    on the key's unique index."""
    daemon_id, _ = meta.claim(tx, meta.DAEMON_ID, proposed_id)
    return daemon_id, shared_identity.check(tx, identities)


async def serve(config: Config, *, load: Callable[[], Config] | None = None,
                on_log_level: Callable[[str], None] | None = None, systemd: Systemd | None = None) -> int:
    """Run the daemon as a service until SIGTERM/SIGINT (exit 0) or the death of a supervised task
    (exit 1, for Restart=on-failure).

    systemd (read from the environment by default) hears READY=1 once the database is open and
    every listener is up, STOPPING=1 when the stop begins, and WATCHDOG=1 while the daemon is
    healthy. SIGHUP loads the config again (`load`, by default config.source) and applies what may
    change while running. A stop keeps remote instances running (Daemon.stop's keep_remote).
    """
    sd = systemd if systemd is not None else Systemd.from_environ()
    reload_config = load if load is not None else partial(_load_again, config)
    daemon = Daemon(config)
    daemon.on_log_level = on_log_level
    stop, hup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    dog: asyncio.Task[None] | None = None
    try:
        try:
            # A SIGTERM now only sets `stop`: start() runs to its end (each of its steps commits
            # whole), then the daemon stops at once, never having said READY=1.
            await daemon.start()
        except (CloudtaskError, OSError) as exc:
            log.error("daemon_start_failed", error=str(exc))
            sd.notifier.status(f"start failed: {exc}")
            await daemon.stop(keep_remote=True)
            return 1
        if not stop.is_set():
            sd.notifier.ready(daemon.status_line())
            if sd.watchdog_interval_s is not None:
                dog = loop.create_task(watchdog(sd.notifier, sd.watchdog_interval_s, daemon.health), name="watchdog")
        while not stop.is_set() and not daemon.failed.is_set():
            await _first_of(stop, daemon.failed, hup)
            if hup.is_set() and not stop.is_set() and not daemon.failed.is_set():
                hup.clear()
                _reload(daemon, sd, reload_config)
        # The watchdog ends here: systemd stops watching as the stop begins (TimeoutStopSec bounds it).
        sd.notifier.stopping("stopping: draining local agents; remote instances keep running")
        if dog is not None:
            dog.cancel()
            with suppress(asyncio.CancelledError):
                await dog
        await daemon.stop(keep_remote=True)
        return 1 if daemon.failed.is_set() else 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        sd.notifier.close()


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _load_again(config: Config) -> Config:
    """The file the config came from, read again (a config built in code has none: unchanged)."""
    return load_config(config.source) if config.source != Config().source else config


def _reload(daemon: Daemon, sd: Systemd, load: Callable[[], Config]) -> None:
    """SIGHUP: RELOADING=1, the file loaded and applied, READY=1 again. A file that fails to load
    changes nothing: the daemon goes on with the config it has."""
    sd.notifier.reloading()
    try:
        new = load()
    except ConfigError as exc:  # names the file and the key
        log.error("config_reload_failed", error=str(exc), key=exc.key, keeping="the config in force")
        sd.notifier.ready(f"reload failed, running with the previous config: {exc}")
        return
    except Exception as exc:  # an unreadable file of any kind must not stop a running daemon
        log.error("config_reload_failed", error=repr(exc), keeping="the config in force")
        sd.notifier.ready(f"reload failed, running with the previous config: {exc!r}")
        return
    from cloudtaskd.logs import log_config_warnings

    log_config_warnings(new)  # what the file may have gained since the start (a secret now readable)
    result = daemon.reload(new)
    waiting = f"; {len(result.needs_restart)} changed key(s) need a restart" if result.needs_restart else ""
    sd.notifier.ready(daemon.status_line() + waiting)


def main(argv: list[str] | None = None) -> None:
    from cloudtaskd.logs import configure, log_config_warnings

    parser = argparse.ArgumentParser(prog="cloudtaskd", description="the cloudtask control daemon")
    parser.add_argument("--config", help="YAML config file (see config.example.yaml)")
    parser.add_argument("--state-dir", help="override state_dir from the config")
    args = parser.parse_args(argv)

    def load() -> Config:  # at start and again on SIGHUP, with the same overrides
        config = load_config(args.config)
        return config.with_state_dir(Path(args.state_dir)) if args.state_dir else config

    try:
        config = load()
    except ConfigError as exc:
        print(f"cloudtaskd: {exc}", file=sys.stderr)
        sys.exit(2)
    configure(config.log_level, sys.stdout)
    log_config_warnings(config)
    try:
        sys.exit(asyncio.run(serve(config, load=load, on_log_level=lambda level: configure(level, sys.stdout))))
    except StoreError as exc:
        print(f"cloudtaskd: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
