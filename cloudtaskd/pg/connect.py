"""Connections to PostgreSQL from a `database: postgresql://…` URL, and what a failed one means.

Everything here opens, watches or explains connections; no SQL of the product lives here. A
connection error becomes a `DatabaseUnavailable` that says what to check, with the URL shown with
its password as <SECRET> (`shown`), and the password is registered with `redact` before the first
connection is tried, so it is kept out of every log line and error from then on (a driver's own
text included).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from cloudtaskd import redact
from cloudtaskd.errors import DatabaseUnavailable

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10.0
APPLICATION_NAME = "cloudtaskd"  # shown in pg_stat_activity: which sessions are ours
_SECRET_PARAMS = ("password", "sslpassword")  # query parameters that hold a secret
DSN_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"

if TYPE_CHECKING:  # the stubs make them generic in the record type; at run time they are not
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    # What a query may run on: a connection of our own or one lent by the pool.
    AnyConnection: TypeAlias = Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection
    Pool = asyncpg.Pool
    AnyConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def shown(dsn: str) -> str:
    """The URL as logs and errors may show it: every password replaced by <SECRET>."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<a malformed URL>"  # it may hold the password anywhere: show none of it
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + redact.REDACTED
    query = [(k, redact.REDACTED if k in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)]
    netloc = f"{userinfo}{at}{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="<>"), parts.fragment))


def _passwords(dsn: str) -> list[str]:
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += [v for k, v in parse_qsl(parts.query) if k in _SECRET_PARAMS]
    return [form for pw in found for form in {pw, unquote(pw)} if form]


def check_dsn(dsn: str) -> None:
    """Refuse what is no PostgreSQL URL before any connection is tried, and register its password."""
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018  # raises on a port that is no number
    except ValueError as exc:
        raise DatabaseUnavailable(shown(dsn), f"the database URL is malformed ({exc}): write it as {DSN_FORM}",
                                  retryable=False) from None  # the cause may quote the password
    if parts.scheme not in SCHEMES:
        raise DatabaseUnavailable(shown(dsn), f"the database URL must start with postgresql:// ({DSN_FORM})",
                                  retryable=False)
    for password in _passwords(dsn):
        redact.register(password)


def _where(dsn: str) -> str:
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2] or "the local socket"
    return f"{hosts}{parts.path or ''}"


def translate(exc: BaseException, dsn: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> DatabaseUnavailable:
    """A connection failure as an error a person can act on (raise it `from exc`)."""
    where, user = _where(dsn), urlsplit(dsn).username or "(default user)"
    show = shown(dsn)
    pg = asyncpg.exceptions
    if isinstance(exc, pg.InvalidPasswordError | pg.InvalidAuthorizationSpecificationError):
        return DatabaseUnavailable(show, f"PostgreSQL at {where} refused user {user!r}: wrong password, or no "
                                   "pg_hba.conf line lets it in; fix the user or password in `database`",
                                   retryable=False)
    if isinstance(exc, pg.InvalidCatalogNameError):
        return DatabaseUnavailable(show, f"no such database at {where}: create it (CREATE DATABASE) or fix the "
                                   "name in `database`", retryable=False)
    if isinstance(exc, pg.InsufficientPrivilegeError):
        return DatabaseUnavailable(show, f"user {user!r} may not do this at {where}: {exc}; grant it the "
                                   "rights on that database (CONNECT, CREATE)", retryable=False)
    if isinstance(exc, pg.TooManyConnectionsError):
        return DatabaseUnavailable(show, f"PostgreSQL at {where} has no connection slot left: raise its "
                                   "max_connections or run fewer replicas; retrying", retryable=True)
    if isinstance(exc, pg.CannotConnectNowError | pg.AdminShutdownError | pg.CrashShutdownError):
        return DatabaseUnavailable(show, f"PostgreSQL at {where} is starting up or shutting down; retrying",
                                   retryable=True)
    if isinstance(exc, socket.gaierror):
        return DatabaseUnavailable(show, f"cannot resolve the host in {where}: {exc.strerror}; check `database`",
                                   retryable=True)
    if isinstance(exc, ssl.SSLError):
        return DatabaseUnavailable(show, f"TLS to PostgreSQL at {where} failed: {exc}; check sslmode and the "
                                   "server's certificate", retryable=False)
    if isinstance(exc, TimeoutError):
        return DatabaseUnavailable(show, f"no answer from PostgreSQL at {where} within {timeout_s:g} s: is the "
                                   "host up and its port open to this one?", retryable=True)
    if isinstance(exc, ConnectionRefusedError):
        return DatabaseUnavailable(show, f"connection refused by {where}: is PostgreSQL running and listening "
                                   "on that address (listen_addresses, port)?", retryable=True)
    if isinstance(exc, OSError | pg.InterfaceError | pg.PostgresConnectionError):
        return DatabaseUnavailable(show, f"lost or could not open the connection to PostgreSQL at {where}: "
                                   f"{exc}", retryable=True)
    return DatabaseUnavailable(show, f"PostgreSQL at {where} failed: {type(exc).__name__}: {exc}",
                               retryable=False)


# What a connection attempt or a query on a broken connection can raise; anything else is a bug.
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _settings(extra: dict[str, str] | None) -> dict[str, str]:
    return {"application_name": APPLICATION_NAME, **(extra or {})}


async def connect(dsn: str, *, timeout_s: float = CONNECT_TIMEOUT_S,
                  server_settings: dict[str, str] | None = None) -> Connection:
    """One dedicated connection (leader lock, LISTEN): not from a pool, so no one else's query runs on it."""
    check_dsn(dsn)
    try:
        return await asyncpg.connect(dsn, timeout=timeout_s, server_settings=_settings(server_settings))
    except CONNECT_ERRORS as exc:
        raise translate(exc, dsn, timeout_s=timeout_s) from exc


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = CONNECT_TIMEOUT_S,
                      server_settings: dict[str, str] | None = None) -> Pool:
    """A pool whose first connection is opened now, so a wrong URL fails at start, not at the first query."""
    check_dsn(dsn)
    try:
        pool: Pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, timeout=timeout_s,
                                               server_settings=_settings(server_settings))
    except CONNECT_ERRORS as exc:
        raise translate(exc, dsn, timeout_s=timeout_s) from exc
    return pool


async def until_lost(conn: Connection, *, ping_interval_s: float, ping_timeout_s: float) -> str:
    """Return once the connection is gone, with why. A closed socket is heard at once (the server
    ended the session, restarted); a silent network cut only by a ping that gets no answer in time."""
    lost = asyncio.Event()

    def on_close(_conn: Any) -> None:
        lost.set()

    conn.add_termination_listener(on_close)
    try:
        while not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), ping_interval_s)
                return "connection closed"
            except TimeoutError:
                pass
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), ping_timeout_s)
            except TimeoutError:
                return f"no answer to a ping within {ping_timeout_s:g} s"
            except CONNECT_ERRORS as exc:
                return f"ping failed: {type(exc).__name__}"
        return "connection closed"
    finally:
        conn.remove_termination_listener(on_close)
