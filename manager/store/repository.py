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

from bus.errors import BusError, ConcurrencyConflict, IdempotencyKeyReused, SkyferryError
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
    replayed: bool = False
    """True when the command's idempotency key had already taken effect: this is the first result."""


@dataclass(frozen=True)
class Keyed:
    """The idempotency key of the command a write is the effect of, scoped by actor."""

    key: str
    digest: str
    actor: str | None = None

    @property
    def scope(self) -> tuple[str, str]:
        return (self.actor or "", self.key)


@dataclass(frozen=True)
class _KeyedEvent:
    aggregate: Aggregate
    aggregate_id: str
    position: int
    event_type: str
    digest: str | None


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
        # Keys of every event folded into the cache (the cache and this index move together, so
        # a key missing here is missing from every event the cached version includes).
        self._keys: dict[tuple[str, str], _KeyedEvent] = {}

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
        self._index_key(agg, ev)
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
        for ev in events:
            self._index_key(aggregate, ev)
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

    def _index_key(self, aggregate: Aggregate, ev: StoredEvent) -> None:
        if ev.idempotency_key:
            self._keys.setdefault(
                (ev.actor or "", ev.idempotency_key),
                _KeyedEvent(aggregate, ev.aggregate_id, ev.position, ev.event_type, ev.idempotency_digest),
            )

    def replayed(self, keyed: Keyed, cur: Loaded) -> Written | None:
        """The first result of a command whose key already took effect (None: it has not).

        Raises:
            IdempotencyKeyReused: the key took effect for a different command.
        """
        hit = self._keys.get(keyed.scope)
        if hit is None:
            return None
        if hit.digest is not None and hit.digest != keyed.digest:
            raise IdempotencyKeyReused(
                f"idempotency key {keyed.key!r} was already used for a different command",
                details={"key": keyed.key, "aggregate": hit.aggregate.value, "id": hit.aggregate_id},
            )
        log.info("write_replayed", aggregate=hit.aggregate.value, id=hit.aggregate_id, position=hit.position)
        return Written(cur, hit.event_type, hit.position, replayed=True)

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
        keyed: Keyed | None = None,
    ) -> Written:
        """Decide an event from the current state and append it atomically.

        With ``expected_version`` the caller's view must be current, else
        :class:`ConcurrencyConflict`. Without it, a conflict means another
        writer got in first: reload, decide again (re-running every check)
        and retry, so no decision is ever made on stale state. A refusal
        (a failed check, a version mismatch) decided on cached state is
        decided again on the stream's current state before it is final.

        With ``keyed``, the key travels inside the event: if an event with the
        same key is already folded in, nothing is written and the first result
        is returned, whatever else was lost in a crash (the reply, the caller's
        own record of the attempt). The append's optimistic concurrency makes
        the check and the effect one atomic step.
        """
        lock = self._locks.setdefault((aggregate, agg_id), asyncio.Lock())
        async with lock:
            fresh = False
            for attempt in range(self.max_retries):
                cur = await self.load(aggregate, agg_id, fresh=fresh)
                if keyed is not None:
                    earlier = self.replayed(keyed, cur)
                    if earlier is not None:
                        return earlier
                try:
                    if expected_version is not None and cur.version != expected_version:
                        raise ConcurrencyConflict(
                            f"{aggregate.value} {agg_id} is at version {cur.version}, not {expected_version}",
                            details={"expected": expected_version, "actual": cur.version},
                        )
                    ev_type, data = decide(cur)
                except SkyferryError:
                    if fresh:
                        raise
                    fresh = True
                    continue
                new_state = apply_event(aggregate, cur.state, ev_type, data)
                event = NewEvent(
                    ev_type,
                    data,
                    actor=actor,
                    msg_id=msg_id,
                    correlation_id=correlation_id,
                    causation_id=msg_id,
                    idempotency_key=keyed.key if keyed else None,
                    idempotency_digest=keyed.digest if keyed else None,
                )
                try:
                    pos = await self._append_with_retry(aggregate, agg_id, event, cur.version)
                except ConcurrencyConflict:
                    if expected_version is not None and keyed is None:
                        raise
                    log.info("write_conflict_retry", aggregate=aggregate.value, id=agg_id, attempt=attempt)
                    fresh = True
                    continue
                loaded = Loaded(aggregate, agg_id, new_state, pos, cur.events + 1)
                prev = self._cache.get((aggregate, agg_id))
                if prev is None or prev.version < pos:
                    self._cache[(aggregate, agg_id)] = loaded
                if keyed is not None:
                    self._keys.setdefault(keyed.scope, _KeyedEvent(aggregate, agg_id, pos, ev_type, keyed.digest))
                return Written(loaded, ev_type, pos)
            raise ConcurrencyConflict(f"{aggregate.value} {agg_id}: too many concurrent writers")
