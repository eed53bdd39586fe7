"""Keeps a :class:`Projector` current: a durable JetStream pull consumer on ``SF_EVENTS``.

Messages come through a :class:`bus.pull.PullFlow` (pull requests kept ahead
of the runner, so the server sends the next batch while one is applied). Each
batch is whatever has arrived (up to ``batch_size``, handed out as soon as
there is one event, so lag stays low), applied in one transaction, and only
then acknowledged, by one ack of the batch's last message (``AckPolicy.ALL``).
A crash between commit and ack causes a redelivery that the projector's
position check skips.

The consumer is durable on a file-backed stream, so it survives a NATS server
restart; the client reconnects and the runner carries on. When the consumer
and the stored position disagree (a rebuild, a new database, unacked messages
after a crash) it is recreated to start at ``position + 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from bus.connection import Bus
from bus.errors import BusError, BusUnavailable
from bus.pull import PullFlow
from bus.subjects import EVENTS_ALL, EVENTS_STREAM
from manager.projections.errors import ProjectionError, ProjectionGap
from manager.projections.projector import Incoming, Projector, gc_paused
from manager.projections.stream import decode_message, position_and_pending
from manager.store.recorder import StoredEvent

log = structlog.get_logger(__name__)

# Failures the runner outlives: the bus or the database going away, a refused batch.
_RETRYABLE = (nats.errors.Error, BusError, ProjectionError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Committed:
    """One batch the runner committed (passed to ``on_commit`` hooks)."""

    first: int
    last: int
    count: int
    """Events newly projected (redeliveries excluded)."""
    errors: int
    committed_at: dt.datetime
    lags: tuple[float, ...]
    """Per new event: seconds from its timestamp header to the commit."""


CommitHook = Callable[[Committed], None]


def _stream_seq(msg: Msg) -> int:
    try:
        return position_and_pending(msg)[0]
    except (nats.errors.NotJSMessageError, ValueError, IndexError):
        return 0


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


class ProjectionRunner:
    """Follows ``SF_EVENTS`` into a projector. Run :meth:`run` in a TaskGroup; :meth:`stop` ends it.

    Args:
        bus: a connected bus (its client reconnects on its own).
        projector: the read model to keep current.
        durable_name: the JetStream consumer's name; one runner per name.
        batch_size: most events per fetch and per transaction.
        fetch_timeout: longest wait for a new event (also how quickly :meth:`stop` is noticed).
        linger: once an event is there, how long to wait for more before applying a short batch
            (each batch costs a transaction and an ack: at a few thousand events/s, batches of a
            handful cost several times as much per event as batches of fifty).
        on_commit: called after each committed batch (e.g. to measure projection lag).
    """

    def __init__(
        self,
        bus: Bus,
        projector: Projector,
        durable_name: str = "sf-projector",
        *,
        stream: str = EVENTS_STREAM,
        batch_size: int = 1000,
        fetch_timeout: float = 0.5,
        linger: float = 0.005,
        max_ack_pending: int = 20_000,
        ack_wait: float = 30.0,
        max_backoff: float = 5.0,
        on_commit: CommitHook | None = None,
    ) -> None:
        self.bus = bus
        self.projector = projector
        self.durable_name = durable_name
        self.stream = stream
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.linger = linger
        self.max_ack_pending = max_ack_pending
        self.ack_wait = ack_wait
        self.max_backoff = max_backoff
        self.hooks: list[CommitHook] = [on_commit] if on_commit else []
        self.position = 0
        """Last position committed (as far as this runner knows)."""
        self.started = asyncio.Event()
        """Set once the consumer is in place and fetching."""
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self._recreate = False
        self._allow_gap = False
        self._log = log.bind(durable=durable_name, stream=stream, projection=projector.name)

    # --- life cycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Project until :meth:`stop`; outlives bus and database outages.

        Raises:
            BusUnavailable: the bus connection was closed for good.
        """
        backoff = 0.1
        while not self._stop.is_set():
            if self.bus.nc.is_closed:
                raise BusUnavailable("bus connection closed; projection runner stops")
            try:
                await self._session()
                backoff = 0.1
            except _RETRYABLE as exc:
                self._recreate = self._recreate or isinstance(exc, ProjectionGap)
                self._log.warning("projection_runner_retry", error=str(exc) or repr(exc), backoff_s=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, self.max_backoff)
        self._log.info("projection_runner_stopped", position=self.position)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand (at most ``fetch_timeout`` idle)."""
        self._stop.set()

    async def lag(self) -> int:
        """Events in the stream not yet projected: stream last sequence - projected position."""
        info = await self.bus.js.stream_info(self.stream)
        return max(0, int(info.state.last_seq) - self.position)

    async def wait_for(self, position: int, timeout: float = 10.0) -> None:
        """Wait until ``position`` is projected.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self.position >= position)

    # --- one connected session ----------------------------------------------------------------------

    async def _session(self) -> None:
        await self.projector.create_schema()
        self.position = await self.projector.position()
        await self._ensure_consumer(self.position)
        flow = PullFlow(self.bus, self.stream, self.durable_name, window=max(2 * self.batch_size, 64))
        async with flow:
            self.started.set()
            while not self._stop.is_set():
                # The collector stays paused from the fetch to the ack (at most fetch_timeout when idle):
                # a batch's messages and objects die together, freed by reference counting, instead of
                # being scanned and promoted by collections while the batch is received and applied.
                # It runs, if due, between two batches, when little is alive.
                with gc_paused(self.projector.pause_gc):
                    msgs = await flow.next_batch(self.batch_size, self.fetch_timeout, linger=self.linger)
                    if msgs:
                        await self._handle(msgs)

    async def _handle(self, msgs: list[Msg]) -> None:
        with gc_paused(self.projector.pause_gc):
            events = [decode_message(m) for m in msgs]
            before = self.position
            try:
                res = await self.projector.apply(events, allow_gap=self._allow_gap)
            except ProjectionError:
                for m in msgs:  # hand them back at once rather than after ack_wait
                    with contextlib.suppress(Exception):
                        await m.nak()
                raise
            self._allow_gap = False
            # After the commit, one ack for the batch (AckPolicy.ALL: it acknowledges every message up
            # to the last); a lost ack only causes a redelivery, which the position check skips.
            await max(msgs, key=_stream_seq).ack()
            fresh = [e for e in events if e.position > before]
        await self._committed(fresh, res.errors, res.committed_at, res.position)

    async def _committed(self, fresh: list[Incoming], errors: int, at: dt.datetime, position: int) -> None:
        async with self._progress:
            self.position = max(self.position, position)
            self._progress.notify_all()
        if not fresh or not self.hooks:
            return
        lags = tuple((at - _aware(e.timestamp)).total_seconds() for e in fresh if isinstance(e, StoredEvent))
        info = Committed(fresh[0].position, fresh[-1].position, len(fresh), errors, at, lags)
        for hook in self.hooks:
            try:
                hook(info)
            except Exception as exc:  # a broken metrics hook must never stop the projection
                self._log.warning("projection_hook_failed", error=repr(exc))

    # --- the durable consumer -----------------------------------------------------------------------

    async def _ensure_consumer(self, position: int) -> None:
        """Make sure the durable consumer exists and starts at ``position + 1`` (recreate it unless it agrees)."""
        js = self.bus.js
        try:
            info: ConsumerInfo | None = await js.consumer_info(self.stream, self.durable_name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None or self._recreate or not self._agrees(info, position):
            await self._recreate_consumer(info is not None, position)

    def _agrees(self, info: ConsumerInfo, position: int) -> bool:
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        pending = info.num_ack_pending or 0
        same = (
            info.config.filter_subject == EVENTS_ALL
            and info.config.ack_policy == AckPolicy.ALL
            and floor == position
            and pending == 0
        )
        if not same:
            self._log.info("projection_consumer_disagrees", ack_floor=floor, ack_pending=pending, position=position)
        return same

    async def _recreate_consumer(self, exists: bool, position: int) -> None:
        js = self.bus.js
        if exists:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self.stream, self.durable_name)
        state = (await js.stream_info(self.stream)).state
        if int(state.last_seq) < position:
            self._log.error("projection_ahead_of_stream", position=position, last_seq=state.last_seq)
        elif int(state.first_seq) > position + 1 and int(state.messages) > 0:
            self._log.warning("projection_events_gone", position=position, first_seq=state.first_seq)
        await js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable_name,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=position + 1,
                ack_policy=AckPolicy.ALL,
                ack_wait=self.ack_wait,
                max_ack_pending=self.max_ack_pending,
                max_deliver=-1,
                filter_subject=EVENTS_ALL,
            ),
        )
        # The consumer starts exactly at position + 1: anything it skips is missing from the stream.
        self._allow_gap = True
        self._recreate = False
        self._log.info("projection_consumer_created", start_seq=position + 1)
