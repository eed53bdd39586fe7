"""Reading ``SF_EVENTS`` for the projections, tolerant of messages that do not decode.

The recorders raise on a malformed message; a projection must instead record
it and move on, so every message becomes either a :class:`StoredEvent` or an
:class:`UndecodableEvent` here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import subjects
from bus.connection import Bus
from bus.errors import SkyferryError
from bus.pull import PullFlow
from bus.subjects import EVENTS_ALL, EVENTS_STREAM
from manager.projections.projector import Incoming, UndecodableEvent
from manager.store.recorder import stored_from_message

log = structlog.get_logger(__name__)


# Subjects already checked to be ``sf.evt.<aggregate>.<id>`` with subject-safe tokens (bounded).
_GOOD_SUBJECTS: dict[str, None] = {}
_GOOD_SUBJECTS_MAX = 50_000


def _check_subject(subject: str) -> None:
    if subject in _GOOD_SUBJECTS:
        return
    agg_type, agg_id = subjects.parse_event_subject(subject)
    subjects.token(agg_type)
    subjects.token(agg_id)
    if len(_GOOD_SUBJECTS) >= _GOOD_SUBJECTS_MAX:
        _GOOD_SUBJECTS.clear()
    _GOOD_SUBJECTS[subject] = None


def position_and_pending(msg: Msg) -> tuple[int, int]:
    """Stream sequence of a JetStream message and the messages pending after it, from its reply subject.

    The two numbers the projections need, without building the client's whole metadata object.

    Raises:
        nats.errors.NotJSMessageError: not a JetStream reply subject.
    """
    tokens = (msg.reply or "").split(".")
    if tokens[0] == "$JS" and len(tokens) > 1 and tokens[1] == "ACK":
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[7]), int(tokens[10])
    md = msg.metadata
    return int(md.sequence.stream), int(md.num_pending or 0)


def decode_message(msg: Msg) -> Incoming:
    """A JetStream message of ``SF_EVENTS`` as a stored event, or as undecodable (never raises)."""
    seq = position_and_pending(msg)[0]
    try:
        _check_subject(msg.subject)
        return stored_from_message(msg.subject, seq, msg.headers, msg.data)
    except (ValueError, SkyferryError) as exc:  # bad subject, timestamp, content type or payload
        return UndecodableEvent(position=seq, subject=msg.subject, error=str(exc))


class StreamReader:
    """Replays ``SF_EVENTS`` in order for :meth:`Projector.rebuild`, keeping undecodable messages."""

    def __init__(self, bus: Bus, *, stream: str = EVENTS_STREAM, batch: int = 2048, timeout: float = 5.0) -> None:
        self.bus = bus
        self.stream = stream
        self.batch = batch
        self.timeout = timeout

    async def read_all(self, after: int = 0) -> AsyncIterator[Incoming]:
        """Every message after ``after`` up to the stream's end when called."""
        js = self.bus.js
        end = int((await js.stream_info(self.stream)).state.last_seq)
        if end <= after:
            return
        info = await js.add_consumer(
            self.stream,
            ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=after + 1,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
                filter_subject=EVENTS_ALL,
            ),
        )
        try:
            async with PullFlow(self.bus, self.stream, info.name, window=2 * self.batch) as flow:
                while True:
                    msgs = await flow.next_batch(self.batch, self.timeout)
                    if not msgs:
                        return
                    for m in msgs:
                        ev = decode_message(m)
                        if ev.position > end:
                            return
                        yield ev
                        if ev.position >= end:
                            return
        finally:
            try:
                await js.delete_consumer(self.stream, info.name)
            except Exception:  # the ephemeral consumer may be gone after a reconnect
                log.debug("stream_reader_cleanup_failed")
