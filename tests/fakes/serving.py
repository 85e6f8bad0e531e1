"""What the HTTP stand-ins share: `serve(app)` puts an aiohttp app on a free port of 127.0.0.1, and
`serving(server)` runs a stand-in (anything with async start() and stop()) for the length of an
`async with`, the body of the fixtures that start one for a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

from aiohttp import web


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """app served on 127.0.0.1 at a free port: its runner (cleanup() stops it) and its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def serving(server: S) -> AsyncIterator[S]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
