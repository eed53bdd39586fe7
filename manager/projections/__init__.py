"""SQL read models (projections) of the event stream: SQLite embedded, PostgreSQL at scale.

:class:`Projector` folds stored events into tables exactly once (position and
rows in one transaction) and rebuilds them from the stream at any time;
:class:`ProjectionRunner` keeps it current from a durable JetStream consumer.
"""

from manager.projections.errors import (
    InvalidEvent,
    ProjectionConflict,
    ProjectionError,
    ProjectionGap,
    ProjectionStoreError,
    UnsupportedDatabase,
)
from manager.projections.projector import (
    AggregateView,
    ApplyResult,
    EventSource,
    Incoming,
    Projector,
    RebuildResult,
    UndecodableEvent,
)
from manager.projections.runner import CommitHook, Committed, ProjectionRunner
from manager.projections.stream import StreamReader, decode_message

__all__ = [
    "AggregateView",
    "ApplyResult",
    "CommitHook",
    "Committed",
    "EventSource",
    "Incoming",
    "InvalidEvent",
    "ProjectionConflict",
    "ProjectionError",
    "ProjectionGap",
    "ProjectionRunner",
    "ProjectionStoreError",
    "Projector",
    "RebuildResult",
    "StreamReader",
    "UndecodableEvent",
    "UnsupportedDatabase",
    "decode_message",
]
