"""Which daemon the agent dials: every replica's URL, tried in turn, none of them stalling the others.

Replicas (docs/replicas.md) all serve agents, and a lease is safe on any of them: the hello lists
what the agent holds and the replica it reaches reclaims it. So the agent is given every replica's
URL, and

- `UrlRing` keeps the order they are tried in: the first given first, and after a session ends,
  the others first (the replica it was lost from is the suspect).
- `dial_first` dials them in that order, staggered like Happy Eyeballs (RFC 8305): the next URL is
  dialled as soon as the one before failed, or has not answered within `stagger_s`, so an address
  that swallows packets costs `stagger_s`, not a connect timeout; the first to connect wins and the
  rest are cancelled.

The backoff between rounds (every URL failed) stays the connection loop's (connection.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from typing import TypeVar

T = TypeVar("T")

# How long a dial may go unanswered before the next URL is dialled too: above a TLS handshake's
# round trips between continents, far below the 10 s connect timeout.
DIAL_STAGGER_S = 1.0


def parse_urls(values: Iterable[str]) -> list[str]:
    """URLs from flags and files: each value may hold several, separated by commas, spaces or
    lines; duplicates dropped, order kept."""
    out: list[str] = []
    for value in values:
        for url in value.replace(",", " ").split():
            if url not in out:
                out.append(url)
    return out


class UrlRing:
    """The daemon URLs in the order to try them. Pure: no I/O, no clock."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls: list[str] = []
        self._start = 0
        self.replace(urls)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._urls)

    def order(self) -> list[str]:
        """Every URL once, the one to try first first."""
        return self._urls[self._start:] + self._urls[:self._start]

    def lost(self, url: str) -> None:
        """The session through url ended (or its hello was refused): try the next one first."""
        if url in self._urls:
            self._start = (self._urls.index(url) + 1) % len(self._urls)

    def replace(self, urls: Sequence[str]) -> bool:
        """A new list (the daemon rewrote the URL file); the URL tried first stays first if it is
        still listed. Returns whether anything changed."""
        new = parse_urls(urls)
        if not new:
            raise ValueError("no daemon URL: give at least one")
        if new == self._urls:
            return False
        first = self._urls[self._start] if self._urls else None
        self._urls = new
        self._start = new.index(first) if first in new else 0
        return True


class NoneAnswered(ConnectionError):
    """Every URL failed this round; `errors` holds each one's error, in the order dialled."""

    def __init__(self, errors: list[tuple[str, BaseException]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{url}: {exc or type(exc).__name__}" for url, exc in errors))


async def dial_first(urls: Sequence[str], dial: Callable[[str], Awaitable[T]], *,
                     close: Callable[[T], Awaitable[object]], stagger_s: float = DIAL_STAGGER_S) -> tuple[str, T]:
    """Dial urls in order, staggered; returns the first URL to connect and its connection. A
    connection that lost the race is closed with `close`. Any exception of a dial (a refused
    port, a bad URL, a certificate) is that URL's failure only; raises NoneAnswered when all failed."""
    if not urls:
        raise NoneAnswered([])
    loop = asyncio.get_running_loop()
    pending: dict[asyncio.Future[T], str] = {}
    errors: list[tuple[str, BaseException]] = []
    winner: tuple[str, T] | None = None
    nxt = 0
    try:
        while winner is None:
            if nxt < len(urls):
                pending[loop.create_task(_call(dial, urls[nxt]))] = urls[nxt]
                nxt += 1
            if not pending:
                raise NoneAnswered(errors)
            done, _ = await asyncio.wait(set(pending), timeout=stagger_s if nxt < len(urls) else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: urls.index(pending[f])):  # in dial order
                url = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    errors.append((url, exc))
                elif winner is None:
                    winner = (url, fut.result())
                else:  # two answered in the same instant: keep the one dialled first
                    with suppress(Exception):
                        await close(fut.result())
        return winner
    finally:
        for fut in pending:
            fut.cancel()
        # A dial may have connected before its cancel landed: that connection is closed, not leaked.
        for late in await asyncio.gather(*pending, return_exceptions=True):
            if not isinstance(late, BaseException):
                with suppress(Exception):
                    await close(late)


async def _call(dial: Callable[[str], Awaitable[T]], url: str) -> T:
    return await dial(url)
