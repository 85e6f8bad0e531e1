"""Connections to PostgreSQL from a `database: postgresql://…` URL, and what a failed one means.

Everything here opens, watches or explains connections; no SQL of the product lives here. A
connection error becomes a `DatabaseUnavailable` that says what to check, with the URL shown with
its password as <SECRET> (`shown`), and the password is registered with `redact` before the first
connection is tried, so it is kept out of every log line and error from then on (a driver's own
text included).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerrors

from cloudtaskd import redact
from cloudtaskd.errors import DatabaseUnavailable

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10.0
APPLICATION_NAME = "cloudtaskd"  # shown in pg_stat_activity: which sessions are ours
_SECRET_PARAMS = ("password", "sslpassword")  # query parameters that hold a secret
DSN_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"

# An async connection of ours: autocommit (no session left idle in a transaction), rows as tuples.
Connection = psycopg.AsyncConnection[tuple[object, ...]]


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


def where(dsn: str) -> str:
    """host:port/dbname of a URL: where it leads, with no user or password."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2] or "the local socket"
    return f"{hosts}{parts.path or ''}"


# libpq reports a failed connection as an OperationalError with no SQLSTATE: its text is all there is.
# These are libpq's and the server's own messages (English unless lc_messages says otherwise).
_REFUSED_USER = re.compile(r"password authentication failed|no pg_hba\.conf entry|role \".*\" does not exist"
                           r"|password supplied|SCRAM|authentication failed")
_NO_DATABASE = re.compile(r"database \".*\" does not exist")
_NO_SLOT = re.compile(r"too many clients|remaining connection slots")
_STARTING = re.compile(r"the database system is (starting up|shutting down|in recovery mode)|"
                       r"terminating connection due to administrator command")
_NO_HOST = re.compile(r"could not translate host name")
_TIMEOUT = re.compile(r"timeout expired")
_REFUSED = re.compile(r"Connection refused")
_TLS = re.compile(r"SSL|certificate")


def translate(exc: BaseException, dsn: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> DatabaseUnavailable:
    """A connection failure as an error a person can act on (raise it `from exc`)."""
    at, user = where(dsn), urlsplit(dsn).username or "(default user)"
    show = shown(dsn)
    text = str(exc)
    if isinstance(exc, pgerrors.InvalidPassword | pgerrors.InvalidAuthorizationSpecification) or (
            isinstance(exc, psycopg.OperationalError) and _REFUSED_USER.search(text)):
        return DatabaseUnavailable(show, f"PostgreSQL at {at} refused user {user!r}: wrong password, or no "
                                   "pg_hba.conf line lets it in; fix the user or password in `database`",
                                   retryable=False)
    if isinstance(exc, pgerrors.InvalidCatalogName) or (
            isinstance(exc, psycopg.OperationalError) and _NO_DATABASE.search(text)):
        return DatabaseUnavailable(show, f"no such database at {at}: create it (CREATE DATABASE) or fix the "
                                   "name in `database`", retryable=False)
    if isinstance(exc, pgerrors.InsufficientPrivilege):
        return DatabaseUnavailable(show, f"user {user!r} may not do this at {at}: {exc}; grant it the "
                                   "rights on that database (CONNECT, CREATE)", retryable=False)
    if isinstance(exc, pgerrors.TooManyConnections) or (
            isinstance(exc, psycopg.OperationalError) and _NO_SLOT.search(text)):
        return DatabaseUnavailable(show, f"PostgreSQL at {at} has no connection slot left: raise its "
                                   "max_connections or run fewer replicas; retrying", retryable=True)
    if isinstance(exc, pgerrors.CannotConnectNow | pgerrors.AdminShutdown | pgerrors.CrashShutdown) or (
            isinstance(exc, psycopg.OperationalError) and _STARTING.search(text)):
        return DatabaseUnavailable(show, f"PostgreSQL at {at} is starting up or shutting down; retrying",
                                   retryable=True)
    if isinstance(exc, socket.gaierror) or (isinstance(exc, psycopg.OperationalError) and _NO_HOST.search(text)):
        return DatabaseUnavailable(show, f"cannot resolve the host in {at}: {exc}; check `database`",
                                   retryable=True)
    if isinstance(exc, TimeoutError) or (isinstance(exc, psycopg.OperationalError) and _TIMEOUT.search(text)):
        return DatabaseUnavailable(show, f"no answer from PostgreSQL at {at} within {timeout_s:g} s: is the "
                                   "host up and its port open to this one?", retryable=True)
    if isinstance(exc, ConnectionRefusedError) or (
            isinstance(exc, psycopg.OperationalError) and _REFUSED.search(text)):
        return DatabaseUnavailable(show, f"connection refused by {at}: is PostgreSQL running and listening "
                                   "on that address (listen_addresses, port)?", retryable=True)
    if isinstance(exc, ssl.SSLError) or (isinstance(exc, psycopg.OperationalError) and _TLS.search(text)):
        return DatabaseUnavailable(show, f"TLS to PostgreSQL at {at} failed: {exc}; check sslmode and the "
                                   "server's certificate", retryable=False)
    if isinstance(exc, OSError | psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(show, f"lost or could not open the connection to PostgreSQL at {at}: "
                                   f"{exc}", retryable=True)
    return DatabaseUnavailable(show, f"PostgreSQL at {at} failed: {type(exc).__name__}: {exc}",
                               retryable=False)


# What a connection attempt or a query on a broken connection can raise; anything else is a bug.
CONNECT_ERRORS = (OSError, TimeoutError, psycopg.Error)


def options(settings: dict[str, str]) -> str:
    """Server settings for a new session, as libpq's `options` (-c name=value each)."""
    return " ".join(f"-c {k}={v}" for k, v in settings.items())


async def connect(dsn: str, *, timeout_s: float = CONNECT_TIMEOUT_S, application_name: str = APPLICATION_NAME,
                  server_settings: dict[str, str] | None = None) -> Connection:
    """One dedicated connection in autocommit (leader lock, LISTEN, migrations with their own transaction)."""
    check_dsn(dsn)
    try:
        # libpq's connect_timeout counts whole seconds (at least 2) per address; wait_for bounds the total.
        conn: Connection = await asyncio.wait_for(psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=max(2, round(timeout_s)), application_name=application_name,
            options=options(server_settings or {})), timeout_s + 1)
    except CONNECT_ERRORS as exc:
        raise translate(exc, dsn, timeout_s=timeout_s) from exc
    return conn


async def until_lost(conn: Connection, *, ping_interval_s: float, ping_timeout_s: float,
                     on_notify: Callable[[psycopg.Notify], None] | None = None) -> str:
    """Return once the connection is gone, with why. Between pings it waits on the socket (for
    notifications, if the session LISTENs): a closed socket is heard at once (the server ended the
    session, restarted); a silent network cut only by a ping that gets no answer in time."""
    while not conn.closed:
        try:
            async for note in conn.notifies(timeout=ping_interval_s):
                if on_notify is not None:
                    on_notify(note)
        except CONNECT_ERRORS:
            return "connection closed"
        # Not wait_for: cancelling a psycopg query first asks the server to cancel it, over the very
        # network that does not answer, and wait_for would wait for that too. The caller closes the
        # connection, which ends the abandoned ping.
        ping = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({ping}, timeout=ping_timeout_s)
        if not done:
            ping.add_done_callback(_consume)
            ping.cancel()
            return f"no answer to a ping within {ping_timeout_s:g} s"
        exc = ping.exception()
        if isinstance(exc, CONNECT_ERRORS):
            return f"ping failed: {type(exc).__name__}"
        if exc is not None:
            raise exc
    return "connection closed"


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned ping's failure is expected, not "never retrieved"
