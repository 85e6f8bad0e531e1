"""Who may use the control API, and how much.

- The unix socket: mode 0660, owned by the daemon's user and `api.socket_group`; the kernel
  refuses everyone else at connect(). Its directory must let that group through, and must not let
  others replace the socket.
- The TCP listener: TLS always (cloudtaskd/tls.py), and every request but the status page's static
  shell carries `Authorization: Bearer <api.token>`; the token is compared in constant time.
- Rate limits: a token bucket per client (a TCP peer address, a unix peer's uid), so one busy
  script cannot starve `cloudtaskctl` or the status page; a client over its rate gets 429 with
  Retry-After.
"""

from __future__ import annotations

import grp
import hmac
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from cloudtaskd.core.ratelimit import TokenBucket
from cloudtaskd.errors import ConfigError

log = structlog.get_logger("cloudtaskd.http.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Served without a token on TCP: the status page's shell holds no data (its fetches carry the token).
PUBLIC_PATHS = frozenset({"/status"})
# Buckets idle this long are forgotten (a client's full bucket is the same as no bucket).
BUCKET_IDLE_S = 300.0
# More clients than this at once: the idle ones go now, and if all are busy a new one waits (429).
MAX_BUCKETS = 10_000


def _json_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "line": None, "field": None}},
                             status=status, headers=headers)


# Hosts a unix-socket request may name: cloudtaskctl's placeholder, and a local forward of the socket
# (ssh -L). Any other is a page whose name was rebound to a local address (DNS rebinding).
LOCAL_HOSTS = frozenset({"cloudtaskd", "localhost", "127.0.0.1", "::1", "[::1]"})


def browser_guard(*, local_only: bool) -> Middleware:
    """Refuse what a web page in the operator's browser could send: any request with an Origin
    other than the daemon's own (browsers add it to every cross-site request that can change
    something; cloudtaskctl never sends one), and on the unix socket a Host that is not local.
    Without this, `ssh -L 8080:/run/cloudtask/cloudtaskd.sock` would let any site the operator
    visits submit work through localhost:8080."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _json_error(403, "Forbidden", "cross-site requests are refused")
        if local_only:
            host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
            if host.lower() not in LOCAL_HOSTS:
                return _json_error(403, "Forbidden", f"host {request.host!r} is not this daemon")
        return await handler(request)

    return middleware


def bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS and request.method == "GET":
            return await handler(request)
        got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(got, expected):
            log.warning("api_unauthorized", peer=request.remote, path=request.path)
            return _json_error(401, "Unauthorized", "a valid bearer token is required (Authorization: Bearer …)",
                               {"WWW-Authenticate": 'Bearer realm="cloudtaskd"'})
        return await handler(request)

    return middleware


def client_key(request: web.Request) -> str:
    """A TCP client by its address; a unix-socket client by its uid (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            return f"uid:{uid}"
        except OSError:
            return "unix"
    return f"ip:{request.remote}"


class RateLimiter:
    """A bucket per client; a client over its rate is answered 429 with Retry-After."""

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._swept = clock()

    def take(self, key: str) -> float:
        """0 if the request may go now, else the seconds until it could."""
        now = self.clock()
        if now - self._swept > BUCKET_IDLE_S:
            self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < BUCKET_IDLE_S}
            self._swept = now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < 1.0}
                if len(self._buckets) >= MAX_BUCKETS:
                    return 1.0
            bucket = self._buckets[key] = TokenBucket(self.per_s, self.burst, now)
        return bucket.take(now)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        wait = self.take(client_key(request))
        if wait > 0:
            return _json_error(429, "RateLimited", f"too many requests; try again in {wait:.2f} s",
                               {"Retry-After": str(max(1, round(wait + 0.5)))})
        return await handler(request)


def prepare_socket_dir(sock: Path, state_dir: Path, group: str, source: str) -> None:
    """Create the socket's directory. Outside the state dir (e.g. /run/cloudtask) it is the daemon's
    and the group's only (0750): the group can reach the socket, others cannot even look."""
    parent = sock.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sock.exists() or sock.is_symlink():
        sock.unlink()  # a dead daemon's socket: we hold the state lock, so it is ours
    if parent.resolve() == state_dir.resolve():
        if group:
            log.warning("socket_group_unreachable", socket=str(sock), group=group,
                        hint="the state dir is 0700; put api.socket outside it, e.g. /run/cloudtask/cloudtaskd.sock")
        return
    st = parent.stat()
    if st.st_uid == os.geteuid() and not any(parent.iterdir()):
        # Ours and empty (just made, or a RuntimeDirectory): a directory for the socket alone.
        # A shared one (/tmp, a home) is never re-permissioned.
        os.chown(parent, -1, _gid(group, source) if group else os.getegid())
        os.chmod(parent, 0o750)
    elif st.st_uid not in (0, os.geteuid()):
        raise ConfigError(source, "api.socket", f"{parent} belongs to another user, who could replace the socket")
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(source, "api.socket",
                          f"{parent} is writable by others: anyone could put their own socket there")


def secure_socket(sock: Path, group: str, source: str) -> None:
    os.chmod(sock, 0o660)
    if group:
        os.chown(sock, -1, _gid(group, source))


def _gid(group: str, source: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(source, "api.socket_group", f"no such group: {group!r}") from None
