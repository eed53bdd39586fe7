"""Time as a dependency: the coordinator reads ``now()`` and sleeps its backoffs through a clock.

Unit tests pass :class:`manager.saga.testing.FakeClock` so retries do not wait.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time and sleeping."""

    def now(self) -> dt.datetime:
        """Current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
