"""Agents reach the daemon through the SSH connection the daemon already holds to their machine.

By default (no `agents.public_url`), each ssh or cloud instance's agent dials 127.0.0.1 on its own
machine, where an SSH remote port forward (opened by the daemon, `forward_remote_port`) carries the
connection back to the daemon's agent listener. Nothing on the control host needs to be reachable
from the cloud, NAT is no obstacle, and the channel stays behind the pinned host key. The agent's
TLS (the daemon's own CA) runs inside the tunnel as before.

The forward's port on the machine is written to `~/.cloudtask/<instance>/agent.url`, which the
agent reads again before each reconnection: a tunnel re-established after a dropped SSH connection
or a daemon restart may listen on another port. One supervisor task per instance keeps its tunnel
up (reconnecting with backoff, host key still pinned) until the instance ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncssh
import structlog

log = structlog.get_logger("cloudtaskd.fleet.tunnels")

RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
URL_FILE = "agent.url"

Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]


@dataclass
class _Tunnel:
    instance_id: str
    connect: Connect
    conn: asyncssh.SSHClientConnection | None = None
    port: int = 0
    task: asyncio.Task[None] | None = None
    opened: int = 0  # how many times it was set up (1 + re-establishments)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Tunnels:
    def __init__(self, dest_host: str, dest_port: int, scheme: str) -> None:
        # Where the forwarded connections go on the control host: the agent listener.
        self.dest_host = dest_host
        self.dest_port = dest_port
        self.scheme = scheme
        self._tunnels: dict[str, _Tunnel] = {}
        self._closed = False

    def url(self, port: int) -> str:
        return f"{self.scheme}://127.0.0.1:{port}/v1/agent"

    async def open(self, instance_id: str, conn: asyncssh.SSHClientConnection) -> str:
        """A forward on this (bootstrap) connection; returns the URL the agent is to dial."""
        listener = await conn.forward_remote_port("127.0.0.1", 0, self.dest_host, self.dest_port)
        return self.url(listener.get_port())

    def keep(self, instance_id: str, connect: Connect, conn: asyncssh.SSHClientConnection | None = None,
             url: str = "") -> None:
        """Keep the instance's tunnel up from now on: `conn` (with its forward, made by open()) is
        adopted when given; otherwise, and whenever it drops, `connect` makes a new connection."""
        if self._closed or instance_id in self._tunnels:
            if conn is not None and instance_id in self._tunnels:
                conn.close()
            return
        tunnel = _Tunnel(instance_id, connect, conn)
        if conn is not None:
            tunnel.port, tunnel.opened = _port_of(url), 1
            tunnel.ready.set()
        self._tunnels[instance_id] = tunnel
        tunnel.task = asyncio.get_running_loop().create_task(self._supervise(tunnel), name=f"tunnel-{instance_id}")

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._tunnels

    def ports(self) -> dict[str, int]:
        return {i: t.port for i, t in self._tunnels.items() if t.ready.is_set()}

    def opened(self, instance_id: str) -> int:
        t = self._tunnels.get(instance_id)
        return t.opened if t is not None else 0

    async def _supervise(self, tunnel: _Tunnel) -> None:
        delay = RETRY_MIN_S
        while True:
            if tunnel.conn is None:
                try:
                    tunnel.conn = await tunnel.connect()
                    url = await self.open(tunnel.instance_id, tunnel.conn)
                    await _write_url(tunnel.conn, tunnel.instance_id, url)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if tunnel.conn is not None:
                        tunnel.conn.close()
                        tunnel.conn = None
                    log.warning("tunnel_failed", instance=tunnel.instance_id, error=str(exc) or type(exc).__name__,
                                retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
                    continue
                tunnel.port = _port_of(url)
                tunnel.opened += 1
                tunnel.ready.set()
                log.info("tunnel_opened", instance=tunnel.instance_id, port=tunnel.port, times=tunnel.opened)
            started = time.monotonic()
            await tunnel.conn.wait_closed()
            tunnel.conn = None
            tunnel.ready.clear()
            log.info("tunnel_dropped", instance=tunnel.instance_id)
            if time.monotonic() - started > RETRY_MAX_S:
                delay = RETRY_MIN_S  # it held a while: a fresh drop starts the backoff over

    async def close(self, instance_id: str) -> None:
        tunnel = self._tunnels.pop(instance_id, None)
        if tunnel is None:
            return
        if tunnel.task is not None:
            tunnel.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tunnel.task
        if tunnel.conn is not None:
            tunnel.conn.close()

    async def close_all(self) -> None:
        self._closed = True
        await asyncio.gather(*(self.close(i) for i in list(self._tunnels)))


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])  # wss://127.0.0.1:PORT/v1/agent


async def _write_url(conn: asyncssh.SSHClientConnection, instance_id: str, url: str) -> None:
    """Tell the agent where its tunnel is now (renamed into place: it never reads half a URL)."""
    base = shlex.quote(f".cloudtask/{instance_id}")
    result = await conn.run(f"cd {base} && printf '%s\\n' {shlex.quote(url)} > {URL_FILE}.tmp && "
                            f"mv {URL_FILE}.tmp {URL_FILE}", check=False)
    if result.exit_status != 0:
        raise OSError(f"could not write {URL_FILE}: {str(result.stderr or '').strip() or result.exit_status}")
