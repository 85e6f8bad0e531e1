"""`cloudtaskctl status-page`: the daemon's status page on http://127.0.0.1:PORT, for a browser that
has neither the daemon's CA nor its API token.

A small HTTP server in this process relays three read-only routes — the page and its two JSON
documents — to the daemon through the client cloudtaskctl already has (the unix socket, or the TLS
listener with the token from the environment). Nothing else is relayed: no route that changes
anything is reachable through it.

127.0.0.1 is open to every user of this machine, so the data routes need a token made for this
run: the printed address carries it in its fragment, which the page keeps for its tab and sends
as `Authorization: Bearer`, exactly as it does the daemon's own token. A request naming a host
other than this machine (a DNS-rebound page) or with a foreign Origin is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import secrets
import signal
import socket
import webbrowser
from collections.abc import Awaitable, Callable

from aiohttp import web

from cloudtaskd.ctl.client import ApiClient
from cloudtaskd.ctl.output import Ctx
from cloudtaskd.errors import BadInput, CloudtaskError, DaemonBusy, DaemonUnavailable

PAGE = "/status"
DATA = frozenset({"/v1/status", "/v1/status/series"})
# The daemon's own headers that make the page what it is: its CSP (script and style by hash,
# fetches to its own origin, which is now ours) and its no-store, no-frame, no-sniff rules.
PASSED_HEADERS = ("Content-Type", "Content-Security-Policy", "Cache-Control", "Referrer-Policy",
                  "X-Content-Type-Options", "X-Frame-Options")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})  # also through `ssh -L` to any local port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, kind: str, message: str) -> web.Response:
    # The daemon's error shape: the page shows `error.message`.
    return web.json_response({"error": {"type": kind, "message": message, "line": None, "field": None}},
                             status=status, headers={"Cache-Control": "no-store"})


def _host_name(host: str) -> str:
    return host if host.endswith("]") else host.rsplit(":", 1)[0]


def relay_app(api: ApiClient, token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _host_name(request.host).lower() not in LOCAL_HOSTS:
            return _error(403, "Forbidden", f"host {request.host!r} is not this machine")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return _error(403, "Forbidden", "cross-site requests are refused")
        if request.path in DATA:
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, expected):
                return _error(401, "Unauthorized", "open the address `cloudtaskctl status-page` printed")
        return await handler(request)

    async def relay(request: web.Request) -> web.StreamResponse:
        try:
            status, body, headers = await api.relay(request.path)
        except (DaemonUnavailable, DaemonBusy) as exc:
            return _error(502, "BadGateway", str(exc))
        if status == 401:
            # The daemon refused cloudtaskctl's token, not the page's: say whose.
            return _error(502, "BadGateway", "cloudtaskd refused cloudtaskctl's API token: set CLOUDTASK_API_TOKEN"
                                             " (or --token-file) to its api.token and start status-page again")
        return web.Response(status=status, body=body,
                            headers={k: headers[k] for k in PASSED_HEADERS if k in headers})

    app = web.Application(middlewares=[guard])
    app.router.add_get(PAGE, relay)
    for path in sorted(DATA):
        app.router.add_get(path, relay)
    app.router.add_get("/", to_page)
    return app


async def to_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PAGE)  # the fragment (the token) stays in the address bar: browsers keep it


async def cmd_status_page(ctx: Ctx, api: ApiClient, args: argparse.Namespace) -> int:
    # Fail now, with the usual advice, if the daemon is not there or will not let us in.
    status, body, _ = await api.relay("/v1/status")
    if status == 401:
        raise CloudtaskError("cloudtaskd refused the API token — set CLOUDTASK_API_TOKEN (or --token-file) to the"
                             " daemon's api.token")
    if status >= 300 and status not in (429, 503):  # busy now is not down: the page will retry
        raise CloudtaskError(f"cloudtaskd answered {status} to GET /v1/status: {body[:200].decode(errors='replace')}")

    token = secrets.token_urlsafe(24)
    runner = web.AppRunner(relay_app(api, token), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise BadInput(f"--port {args.port}: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc};"
                           " choose another port (0: any free one)", field="port") from exc
        port = _bound_port(runner)
        url = f"http://127.0.0.1:{port}{PAGE}#token={token}"
        where = api.url or str(api.socket_path)
        if ctx.json:
            ctx.emit_json({"url": url, "port": port, "daemon": where})
        else:
            ctx.say(f"status page: {url}")
            ctx.say(f"  relaying cloudtaskd at {where}; Ctrl-C stops it")
            ctx.say(f"  from another machine: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()},"
                    " then open the same address there")
        ctx.out.flush()
        if args.open and not await asyncio.to_thread(webbrowser.open, url):
            ctx.note("no browser could be started here: open the address above yourself")
        await _until_stopped()
    finally:
        await runner.cleanup()
    if not ctx.json:
        ctx.say("status page stopped")
    return 0


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


async def _until_stopped() -> None:
    """Until SIGINT (Ctrl-C) or SIGTERM: both are the normal way to stop serving, exit status 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


__all__ = ["cmd_status_page", "relay_app"]
