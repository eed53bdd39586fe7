"""Recorders: append and read stored events, with optimistic concurrency per aggregate.

Every recorder has the same contract (see ``tests/manager/store/test_recorder_contract.py``):

* positions are global, gap-free for one recorder and start at 1;
* ``append(..., expected=N)`` succeeds only if the aggregate's last event is at
  position ``N`` (0: the aggregate has no events), else :class:`ConcurrencyConflict`;
* an append carrying a ``msg_id`` already stored within the dedupe window is a
  no-op returning the original position (safe retries after a lost ack);
* an event may carry the idempotency key of the command that caused it (and a digest
  of that command), stored with the event itself: the record that a keyed command
  took effect is the effect, one atomic write (see ``docs/sagas.md``, "Exactly once").
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import codec, subjects
from bus.connection import Bus
from bus.envelope import new_id, utcnow
from bus.errors import BusTimeout, BusUnavailable, ConcurrencyConflict
from bus.subjects import EVENTS_STREAM, Header

log = structlog.get_logger(__name__)

# JetStream's "wrong last sequence" error.
_JS_WRONG_LAST_SEQUENCE = 10071


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its type name and payload (plain, JSON-able data)."""

    event_type: str
    data: dict[str, Any]
    actor: str | None = None
    msg_id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    idempotency_key: str | None = None
    """Key of the command this event is the effect of (saga steps); stored in the event's headers."""
    idempotency_digest: str | None = None
    """Digest of that command, so a key reused for a different command is told apart."""


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: position, aggregate, type, payload and envelope metadata."""

    position: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    data: dict[str, Any]
    timestamp: dt.datetime
    actor: str | None
    msg_id: str
    correlation_id: str | None = None
    causation_id: str | None = None
    idempotency_key: str | None = None
    idempotency_digest: str | None = None

    @property
    def subject(self) -> str:
        return subjects.event(self.aggregate_type, self.aggregate_id)


class EventRecorder(Protocol):
    """Append-only storage of events."""

    async def append(self, aggregate_type: str, aggregate_id: str, event: NewEvent, expected: int | None) -> int:
        """Append one event; return its position. ``expected=None`` skips the check."""
        ...

    async def read(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        until_position: int | None = None,
        until_time: dt.datetime | None = None,
    ) -> list[StoredEvent]:
        """The aggregate's events in order, optionally up to a position or time."""
        ...

    def read_all(self, after: int = 0, *, aggregate_type: str | None = None) -> AsyncIterator[StoredEvent]:
        """Every event after ``after`` up to the current end, in order."""
        ...

    async def last_position(self) -> int:
        """Position of the newest event (0 if none)."""
        ...


def _headers(event: NewEvent) -> dict[str, str]:
    h = {
        Header.NATS_MSG_ID.value: event.msg_id,
        Header.MSG_ID.value: event.msg_id,
        Header.SCHEMA.value: event.event_type,
        Header.TIMESTAMP.value: utcnow().isoformat(),
        Header.CONTENT_TYPE.value: "application/msgpack",
    }
    if event.actor:
        h[Header.ACTOR.value] = event.actor
    if event.correlation_id:
        h[Header.CORRELATION_ID.value] = event.correlation_id
    if event.causation_id:
        h[Header.CAUSATION_ID.value] = event.causation_id
    if event.idempotency_key:
        h[Header.IDEMPOTENCY_KEY.value] = event.idempotency_key
    if event.idempotency_digest:
        h[Header.IDEMPOTENCY_DIGEST.value] = event.idempotency_digest
    return h


def stored_from_message(subject: str, seq: int, headers: dict[str, str] | None, data: bytes) -> StoredEvent:
    """Rebuild a :class:`StoredEvent` from a JetStream message."""
    agg_type, agg_id = subjects.parse_event_subject(subject)
    h = headers or {}
    ts_raw = h.get(Header.TIMESTAMP)
    ts = dt.datetime.fromisoformat(ts_raw) if ts_raw else utcnow()
    return StoredEvent(
        position=seq,
        aggregate_type=agg_type,
        aggregate_id=agg_id,
        event_type=h.get(Header.SCHEMA, "unknown"),
        data=codec.decode_mapping(data, codec.content_type_of(h)),
        timestamp=ts,
        actor=h.get(Header.ACTOR),
        msg_id=h.get(Header.MSG_ID, ""),
        correlation_id=h.get(Header.CORRELATION_ID),
        causation_id=h.get(Header.CAUSATION_ID),
        idempotency_key=h.get(Header.IDEMPOTENCY_KEY),
        idempotency_digest=h.get(Header.IDEMPOTENCY_DIGEST),
    )


class MemoryRecorder:
    """In-process twin of :class:`JetStreamRecorder` for fast unit tests."""

    def __init__(self) -> None:
        self._events: list[StoredEvent] = []
        self._last: dict[str, int] = {}
        self._by_msg_id: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def append(self, aggregate_type: str, aggregate_id: str, event: NewEvent, expected: int | None) -> int:
        subject = subjects.event(aggregate_type, aggregate_id)
        async with self._lock:
            if event.msg_id in self._by_msg_id:
                return self._by_msg_id[event.msg_id]
            last = self._last.get(subject, 0)
            if expected is not None and expected != last:
                raise ConcurrencyConflict(
                    f"{aggregate_type} {aggregate_id} changed since it was read",
                    details={"expected": expected, "actual": last},
                )
            pos = len(self._events) + 1
            self._events.append(
                StoredEvent(
                    position=pos,
                    aggregate_type=aggregate_type,
                    aggregate_id=aggregate_id,
                    event_type=event.event_type,
                    data=codec.decode_mapping(codec.encode(event.data)),
                    timestamp=utcnow(),
                    actor=event.actor,
                    msg_id=event.msg_id,
                    correlation_id=event.correlation_id,
                    causation_id=event.causation_id,
                    idempotency_key=event.idempotency_key,
                    idempotency_digest=event.idempotency_digest,
                )
            )
            self._last[subject] = pos
            self._by_msg_id[event.msg_id] = pos
            return pos

    async def read(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        until_position: int | None = None,
        until_time: dt.datetime | None = None,
    ) -> list[StoredEvent]:
        return [
            e
            for e in self._events
            if e.aggregate_type == aggregate_type
            and e.aggregate_id == aggregate_id
            and (until_position is None or e.position <= until_position)
            and (until_time is None or e.timestamp <= until_time)
        ]

    async def read_all(self, after: int = 0, *, aggregate_type: str | None = None) -> AsyncIterator[StoredEvent]:
        for e in list(self._events[after:]):
            if aggregate_type is None or e.aggregate_type == aggregate_type:
                yield e

    async def last_position(self) -> int:
        return len(self._events)


class JetStreamRecorder:
    """Events in the ``SF_EVENTS`` stream, one subject per aggregate.

    Concurrency uses ``Nats-Expected-Last-Subject-Sequence``; JetStream's
    10071 "wrong last sequence" becomes :class:`ConcurrencyConflict` here and
    nowhere else.
    """

    def __init__(self, bus: Bus, *, stream: str = EVENTS_STREAM, timeout: float = 5.0) -> None:
        self.bus = bus
        self.stream = stream
        self.timeout = timeout

    async def append(self, aggregate_type: str, aggregate_id: str, event: NewEvent, expected: int | None) -> int:
        subject = subjects.event(aggregate_type, aggregate_id)
        headers = _headers(event)
        if expected is not None:
            headers[Header.NATS_EXPECTED_LAST_SUBJECT_SEQ.value] = str(expected)
        try:
            ack = await self.bus.js.publish(subject, codec.encode(event.data), timeout=self.timeout, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _JS_WRONG_LAST_SEQUENCE:
                # JetStream checks the expected sequence before de-duplication: a retry of an
                # append whose ack was lost lands here, so look for our own message first.
                earlier = await self._find_msg_id(aggregate_type, aggregate_id, event.msg_id, after=expected or 0)
                if earlier is not None:
                    return earlier
                raise ConcurrencyConflict(
                    f"{aggregate_type} {aggregate_id} changed since it was read",
                    details={"expected": expected, "description": exc.description},
                ) from exc
            raise BusUnavailable(f"event append failed: {exc.description}", details={"code": exc.err_code}) from exc
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            # Unknown outcome: the retry carries the same Nats-Msg-Id, so it cannot double-append.
            raise BusTimeout("event append not acknowledged", details={"subject": subject}) from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise BusUnavailable("bus connection lost during append") from exc
        return int(ack.seq)

    async def _find_msg_id(self, aggregate_type: str, aggregate_id: str, msg_id: str, after: int) -> int | None:
        for ev in await self.read(aggregate_type, aggregate_id):
            if ev.position > after and ev.msg_id == msg_id:
                return ev.position
        return None

    async def _last_seq_of(self, subject: str) -> int:
        try:
            msg = await self.bus.js.get_last_msg(self.stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def read(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        until_position: int | None = None,
        until_time: dt.datetime | None = None,
    ) -> list[StoredEvent]:
        subject = subjects.event(aggregate_type, aggregate_id)
        last = await self._last_seq_of(subject)
        if until_position is not None:
            last = min(last, until_position)
        if last == 0:
            return []
        out: list[StoredEvent] = []
        async for ev in self._consume(subject, 1, last):
            if until_time is not None and ev.timestamp > until_time:
                break
            out.append(ev)
        return out

    async def read_all(self, after: int = 0, *, aggregate_type: str | None = None) -> AsyncIterator[StoredEvent]:
        end = await self.last_position()
        if end <= after:
            return
        filt = subjects.events_of(aggregate_type)
        async for ev in self._consume(filt, after + 1, end):
            yield ev

    async def _consume(self, filter_subject: str, start: int, end: int) -> AsyncIterator[StoredEvent]:
        """Ordered pull over ``[start, end]`` of ``filter_subject`` (stops at ``end``)."""
        sub = await self.bus.js.pull_subscribe(
            filter_subject,
            stream=self.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                ack_policy=AckPolicy.NONE,
                opt_start_seq=start,
                inactive_threshold=30.0,
                mem_storage=True,
                filter_subject=filter_subject,
            ),
        )
        try:
            # Nothing to read for this filter: return now instead of waiting out a fetch timeout.
            if (await sub.consumer_info()).num_pending == 0:
                return
            while True:
                try:
                    msgs = await sub.fetch(512, timeout=self.timeout)
                except nats.errors.TimeoutError:
                    return
                for m in msgs:
                    seq = int(m.metadata.sequence.stream)
                    if seq > end:
                        return
                    yield stored_from_message(m.subject, seq, m.headers, m.data)
                    if seq >= end or m.metadata.num_pending == 0:
                        return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the consumer may already be gone after a reconnect
                log.debug("consumer_cleanup_failed", subject=filter_subject)

    async def last_position(self) -> int:
        info = await self.bus.js.stream_info(self.stream)
        return int(info.state.last_seq)
