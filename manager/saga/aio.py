"""Two structured-concurrency helpers: an interruptible sleep and a cancellation shield."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from manager.saga.clock import Clock

T = TypeVar("T")


async def sleep_unless(clock: Clock, seconds: float, stop: asyncio.Event) -> bool:
    """Sleep on ``clock`` unless ``stop`` is (or gets) set; True if interrupted."""
    if stop.is_set():
        return True
    if seconds <= 0:
        return False
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waiter):
            task.cancel()
        await asyncio.gather(sleeper, waiter, return_exceptions=True)
    return stop.is_set()


async def run_shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile, then re-raise the cancellation.

    Unlike a bare :func:`asyncio.shield`, the inner task is never left running on its own: the
    caller keeps waiting for it, so it still has an owner (used for compensations).
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Either we were cancelled (keep waiting, re-raise later) or the inner task was.
            if not (task.done() and task.cancelled()):
                cancelled = True
        except Exception:
            pass  # task.result() below re-raises it
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it as lost
        raise asyncio.CancelledError
    return task.result()
