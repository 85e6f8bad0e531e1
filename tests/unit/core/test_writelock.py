"""The store's write lock: urgent waiters (the dispatcher's rounds) first, the others in order."""

from __future__ import annotations

import asyncio

import pytest

from cloudtaskd.core.writelock import WriteLock


async def test_an_urgent_waiter_goes_before_ordinary_ones_which_keep_their_order() -> None:
    lock = WriteLock()
    order: list[str] = []

    async def writer(name: str, urgent: bool) -> None:
        async with lock.hold(urgent=urgent):
            order.append(name)
            await asyncio.sleep(0)

    await lock.acquire()
    tasks = [asyncio.create_task(writer(f"upload{i}", False)) for i in range(5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(writer("round", True)))
    await asyncio.sleep(0)
    lock.release()
    await asyncio.gather(*tasks)
    assert order == ["round", "upload0", "upload1", "upload2", "upload3", "upload4"]
    assert not lock.locked()


async def test_one_writer_at_a_time() -> None:
    lock = WriteLock()
    inside = 0
    most = 0

    async def writer(urgent: bool) -> None:
        nonlocal inside, most
        async with lock.hold(urgent=urgent):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(writer(i % 3 == 0) for i in range(30)))
    assert most == 1
    assert not lock.locked()


@pytest.mark.parametrize("handed_over", [False, True])
async def test_a_cancelled_waiter_neither_keeps_nor_loses_the_lock(handed_over: bool) -> None:
    lock = WriteLock()
    await lock.acquire()
    waiter = asyncio.create_task(lock.acquire(urgent=True))
    await asyncio.sleep(0)
    if handed_over:
        lock.release()  # the lock is handed to the waiter, which is cancelled before it runs
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    if not handed_over:
        lock.release()
    assert not lock.locked()
    await asyncio.wait_for(lock.acquire(), timeout=1)  # still usable
    lock.release()
