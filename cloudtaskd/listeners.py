"""The daemon's listening sockets: the agent listener (its port kept across restarts), the TLS
files the agent channel and the TCP control API use, and how a listen address reads in a URL."""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from cloudtaskd import tls
from cloudtaskd.config import AgentsConfig, Config
from cloudtaskd.errors import ConfigError

log = structlog.get_logger("cloudtaskd")  # the daemon's own lines

# How long a listener's in-flight requests may run on at shutdown (aiohttp's default is 60 s each,
# which in sequence would outlast the unit's TimeoutStopSec).
RUNNER_SHUTDOWN_S = 5.0
# Connections the control listeners let wait to be accepted (aiohttp's default is 128). A unix socket
# whose queue is full refuses at once (EAGAIN, seen by clients as "Transport endpoint is not
# connected"): 200 clients at once while the loop was busy read as a daemon that is down (issue 13).
CONTROL_BACKLOG = 1024
# With agents.listen_port 0: the port the agent listener got, asked for again at the next start.
AGENT_PORT_FILE = "agent.port"


def agent_socket(state_dir: Path, agents: AgentsConfig) -> socket.socket:
    """The agent listener's socket. With listen_port 0 the port first chosen is kept in
    <state_dir>/agent.port and asked for again at every start, so agents that outlived a crash
    find the daemon where they left it; if another process holds it now, any free port, said
    loudly (local agents and tunnels follow the new port; agents dialling public_url do not)."""
    port_file = state_dir / AGENT_PORT_FILE
    wanted = agents.listen_port
    if wanted == 0:
        with suppress(OSError, ValueError):
            wanted = int(port_file.read_text().strip())
    try:
        sock = listen(agents.listen_host, wanted)
    except OSError as exc:
        if agents.listen_port != 0:
            raise
        log.warning("agent_port_taken", port=wanted, error=str(exc), fallback="any free port",
                    hint="local agents and SSH tunnels follow the new port; agents dialling a fixed "
                         "address do not: set agents.listen_port to fix it")
        sock = listen(agents.listen_host, 0)
    if agents.listen_port == 0:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{sock.getsockname()[1]}\n")
        os.replace(tmp, port_file)
    return sock


def tls_files(config: Config, daemon_id: str) -> tls.TlsFiles | None:
    """The daemon's CA and server certificate, when the agent channel or the TCP API uses TLS."""
    agents, api = config.agents, config.api
    if agents.tls and agents.public_url and not agents.public_url.startswith("wss://"):
        raise ConfigError(config.source, "agents.public_url",
                          f"agents.tls is on, so agents dial wss://…, got {agents.public_url!r}")
    if not agents.tls and not api.listen:
        return None
    names = [agents.listen_host, "127.0.0.1", *agents.tls_names]  # 127.0.0.1: a tunnel's end on an instance
    if agents.public_url:
        names.append(urlsplit(agents.public_url).hostname or "")
    if api.listen:
        names.append(api.listen.rsplit(":", 1)[0])
    return tls.ensure(config.state_path / "tls", names, label=daemon_id)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (SO_REUSEADDR: a port left in TIME_WAIT by a crash binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(CONTROL_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url_host(host: str) -> str:
    """A listen address as a URL host: a wildcard means "this machine", IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
