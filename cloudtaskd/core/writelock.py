"""The store's write lock: one writer at a time, the dispatcher's rounds first.

A plain asyncio.Lock is first come, first served. When 1,000 jobs are submitted at once, each
upload queues several transactions, and a dispatch round waiting behind all of them leaves every
agent idle for a second (benchmarks/scale.py, phase 3). Here an urgent waiter (the dispatcher)
is handed the lock before any ordinary one; ordinary waiters keep their order. The dispatcher
holds at most one round in the queue, so the others still get a turn between its rounds. An
agent's hello (authentication, reclaim) is urgent too: behind a stream of rounds each of its
writes would wait a round, and 2,000 agents reconnecting after a restart took two minutes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class WriteLock:
    def __init__(self) -> None:
        self._locked = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self, *, urgent: bool = False) -> None:
        if not self._locked and not self._urgent and not self._normal:
            self._locked = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._urgent if urgent else self._normal
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the lock just as it was cancelled: pass it on
            elif waiter in queue:  # release() may have dropped it already, as a cancelled waiter
                queue.remove(waiter)
            raise

    def release(self) -> None:
        """Hand the lock to the next waiter (urgent ones first), or unlock."""
        for queue in (self._urgent, self._normal):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # stays locked: ownership moves to the waiter
                    return
        self._locked = False

    @asynccontextmanager
    async def hold(self, *, urgent: bool = False) -> AsyncIterator[None]:
        await self.acquire(urgent=urgent)
        try:
            yield
        finally:
            self.release()
