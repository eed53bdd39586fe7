"""Waiting for a condition in async e2e tests (never for a fixed time)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60.0, poll_s: float = 0.05) -> T:
    """Poll ``probe`` until it returns something other than None (errors other than assertions count as not yet)."""
    last: BaseException | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    got = await probe()
                    if got is not None:
                        return got
                except AssertionError:
                    raise
                except Exception as exc:  # the bus is reconnecting, a daemon is starting
                    last = exc
                await asyncio.sleep(poll_s)
    except TimeoutError:
        raise AssertionError(f"never: {what} (last error {last!r})") from None
