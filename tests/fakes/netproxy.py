"""A TCP proxy for tests, between agent and daemon, that breaks the path on command.

Three faults, as a network gives them:
- cut(): every open connection is reset at once (a blip both ends hear about).
- stall() ... resume(): nothing is forwarded, nothing is lost and no connection closes: the bytes
  wait (in the proxy and in both ends' socket buffers) and flow on at resume, as TCP retransmits
  across a link that was down for a while. New connections are held the same way.
- blackhole() ... resume(): bytes are discarded and no FIN or RST ever passes, in either
  direction: the open connections are dead for good (a NAT entry or a stateful firewall lost),
  and each end only learns it from its own timeouts (websocket heartbeat, TCP). A connection
  opened during the black hole is accepted and swallowed too (a load balancer whose backend is
  gone). resume() lets new connections through again; the black-holed ones stay dead.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # black-holed: bytes discarded, closes not passed on, forever
    ended: set[str] = field(default_factory=set)  # directions whose source closed


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._blackhole = False
        self.connections = 0  # accepted so far
        self.client_closes = 0  # connections the client side closed or reset (heard by the proxy only)
        self.discarded_bytes = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer, dead=self._blackhole)
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if link.dead:
                await self._pipe(link, "up", reader, None)
                return
            await self._flowing.wait()
            up_reader, link.upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(link, "up", reader, link.upstream),
                                 self._pipe(link, "down", up_reader, writer), return_exceptions=True)
        finally:
            self._handlers.discard(handler)
            self._links.discard(link)
            for w in (link.client, link.upstream):
                if w is not None:
                    w.transport.abort()

    async def _pipe(self, link: _Link, direction: str, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter | None) -> None:
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # read just before a stall began: held, not passed
                if link.dead or dst is None:
                    self.discarded_bytes += len(data)
                    continue
                dst.write(data)
                await dst.drain()
        link.ended.add(direction)
        if direction == "up":
            self.client_closes += 1
        await self._flowing.wait()
        if link.dead or dst is None:
            # The other end must never hear of this close: it finds out by its own timeouts. The
            # link is torn down once both ends have closed (nothing is left to observe it then).
            if {"up", "down"} <= link.ended or link.upstream is None:
                for w in (link.client, link.upstream):
                    if w is not None:
                        w.transport.abort()
            return
        dst.close()

    def cut(self) -> None:
        """Drop every open connection at once, as a network blip would (new ones still pass)."""
        for link in list(self._links):
            for w in (link.client, link.upstream):
                if w is not None:
                    w.transport.abort()

    def stall(self) -> None:
        """Hold every byte from now on (open and new connections); resume() delivers them."""
        self._flowing.clear()

    def blackhole(self) -> None:
        """Discard every byte of the open connections, and of new ones until resume()."""
        self._blackhole = True
        for link in self._links:
            link.dead = True
        self._flowing.set()

    def resume(self) -> None:
        """End a stall (held bytes flow on) or a black hole (new connections pass again)."""
        self._blackhole = False
        self._flowing.set()

    async def stop(self) -> None:
        self._flowing.set()
        if self.server is not None:
            self.server.close()
        self.cut()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
