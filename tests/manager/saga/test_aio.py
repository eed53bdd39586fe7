"""The two concurrency helpers: the cancellation shield and the interruptible sleep."""

from __future__ import annotations

import asyncio

import pytest

from manager.saga.aio import run_shielded, sleep_unless
from manager.saga.clock import SystemClock


async def test_shielded_work_completes_before_the_cancellation_propagates() -> None:
    done: list[str] = []

    async def work() -> str:
        await asyncio.sleep(0.05)
        done.append("work")
        return "ok"

    task = asyncio.create_task(run_shielded(work()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["work"]


async def test_shielded_result_and_errors_pass_through() -> None:
    async def fine() -> int:
        return 7

    async def broken() -> int:
        raise ValueError("boom")

    assert await run_shielded(fine()) == 7
    with pytest.raises(ValueError, match="boom"):
        await run_shielded(broken())


async def test_shield_works_under_a_timeout() -> None:
    finished = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await run_shielded(work())
    assert finished.is_set()


async def test_sleep_unless_is_interrupted_by_the_event() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, stop.set)
    started = loop.time()
    assert await sleep_unless(SystemClock(), 10, stop)
    assert loop.time() - started < 1
    assert not await sleep_unless(SystemClock(), 0.01, asyncio.Event())
