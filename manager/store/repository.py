"""Aggregates over a recorder: fold on load, write with optimistic concurrency, keep a live cache.

The cache is a convenience, never the truth: every write carries the version
it was decided on, so a stale cache only ever costs a conflict and a reload.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel

from bus.errors import BusError, ConcurrencyConflict
from bus.kinds import Aggregate
from manager.domain import apply_event
from manager.store.recorder import EventRecorder, NewEvent, StoredEvent

log = structlog.get_logger(__name__)

#: (event type, event data) decided from the current state.
Decision = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Loaded:
    """An aggregate root as folded from its events."""

    aggregate: Aggregate
    id: str
    state: BaseModel | None
    version: int
    """Position of its last event; 0 if it has none."""
    events: int = 0


@dataclass(frozen=True)
class Written:
    loaded: Loaded
    event_type: str
    position: int


def fold(aggregate: Aggregate, agg_id: str, events: list[StoredEvent]) -> Loaded:
    """Rebuild a root from its events."""
    state: BaseModel | None = None
    version = 0
    for ev in events:
        state = apply_event(aggregate, state, ev.event_type, ev.data)
        version = ev.position
    return Loaded(aggregate, agg_id, state, version, len(events))


class Repository:
    """Loads, caches and writes aggregate roots."""

    def __init__(self, recorder: EventRecorder, *, max_retries: int = 5, append_retry_s: float = 15.0) -> None:
        self.recorder = recorder
        self.max_retries = max_retries
        self.append_retry_s = append_retry_s
        self._cache: dict[tuple[Aggregate, str], Loaded] = {}
        self._position = 0
        self._locks: dict[tuple[Aggregate, str], asyncio.Lock] = {}

    @property
    def position(self) -> int:
        """Highest stream position folded into the cache."""
        return self._position

    async def warm(self) -> int:
        """Fold every stored event into the cache; returns the number folded."""
        n = 0
        async for ev in self.recorder.read_all(self._position):
            self.observe(ev)
            n += 1
        return n

    def observe(self, ev: StoredEvent) -> None:
        """Fold an event seen on the stream (ours or another writer's) into the cache."""
        self._position = max(self._position, ev.position)
        try:
            agg = Aggregate(ev.aggregate_type)
        except ValueError:
            return
        if agg is Aggregate.SAGA:
            return
        key = (agg, ev.aggregate_id)
        cur = self._cache.get(key)
        if cur is not None and cur.version >= ev.position:
            return
        state = apply_event(agg, cur.state if cur else None, ev.event_type, ev.data)
        self._cache[key] = Loaded(agg, ev.aggregate_id, state, ev.position, (cur.events if cur else 0) + 1)

    def current(self, aggregate: Aggregate, agg_id: str) -> BaseModel | None:
        """The cached live state of one root (None if unknown or deleted); no I/O."""
        hit = self._cache.get((aggregate, agg_id))
        return hit.state if hit else None

    def cached(self, aggregate: Aggregate) -> list[Loaded]:
        """Every live (not deleted) root of a type, by id."""
        return sorted(
            (v for (a, _), v in self._cache.items() if a is aggregate and v.state is not None), key=lambda v: v.id
        )

    async def load(
        self,
        aggregate: Aggregate,
        agg_id: str,
        *,
        until_position: int | None = None,
        until_time: dt.datetime | None = None,
        fresh: bool = False,
    ) -> Loaded:
        """The root, from the cache or by folding its events (always folded for as-of reads)."""
        if until_position is None and until_time is None and not fresh:
            hit = self._cache.get((aggregate, agg_id))
            if hit is not None:
                return hit
        events = await self.recorder.read(aggregate.value, agg_id, until_position=until_position, until_time=until_time)
        loaded = fold(aggregate, agg_id, events)
        if until_position is None and until_time is None:
            cur = self._cache.get((aggregate, agg_id))
            if cur is None or cur.version <= loaded.version:
                self._cache[(aggregate, agg_id)] = loaded
        return loaded

    async def _append_with_retry(self, aggregate: Aggregate, agg_id: str, event: NewEvent, expected: int) -> int:
        # A lost ack (server restart, failover) leaves the outcome unknown; the same
        # Nats-Msg-Id makes the retry safe, so keep trying for a bounded time.
        delay = 0.1
        deadline = asyncio.get_running_loop().time() + self.append_retry_s
        while True:
            try:
                return await self.recorder.append(aggregate.value, agg_id, event, expected=expected)
            except BusError as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("append_retry", aggregate=aggregate.value, id=agg_id, error=str(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def write(
        self,
        aggregate: Aggregate,
        agg_id: str,
        decide: Callable[[Loaded], Decision],
        *,
        expected_version: int | None,
        actor: str | None,
        msg_id: str,
        correlation_id: str | None = None,
    ) -> Written:
        """Decide an event from the current state and append it atomically.

        With ``expected_version`` the caller's view must be current, else
        :class:`ConcurrencyConflict`. Without it, a conflict means another
        writer got in first: reload, decide again (re-running every check)
        and retry, so no decision is ever made on stale state.
        """
        lock = self._locks.setdefault((aggregate, agg_id), asyncio.Lock())
        async with lock:
            fresh = False
            for attempt in range(self.max_retries):
                cur = await self.load(aggregate, agg_id, fresh=fresh)
                if expected_version is not None and cur.version != expected_version:
                    raise ConcurrencyConflict(
                        f"{aggregate.value} {agg_id} is at version {cur.version}, not {expected_version}",
                        details={"expected": expected_version, "actual": cur.version},
                    )
                ev_type, data = decide(cur)
                new_state = apply_event(aggregate, cur.state, ev_type, data)
                event = NewEvent(
                    ev_type, data, actor=actor, msg_id=msg_id, correlation_id=correlation_id, causation_id=msg_id
                )
                try:
                    pos = await self._append_with_retry(aggregate, agg_id, event, cur.version)
                except ConcurrencyConflict:
                    if expected_version is not None:
                        raise
                    log.info("write_conflict_retry", aggregate=aggregate.value, id=agg_id, attempt=attempt)
                    fresh = True
                    continue
                loaded = Loaded(aggregate, agg_id, new_state, pos, cur.events + 1)
                prev = self._cache.get((aggregate, agg_id))
                if prev is None or prev.version < pos:
                    self._cache[(aggregate, agg_id)] = loaded
                return Written(loaded, ev_type, pos)
            raise ConcurrencyConflict(f"{aggregate.value} {agg_id}: too many concurrent writers")
