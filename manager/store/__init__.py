"""The event-sourced store: recorders (memory, JetStream), aggregates, folding."""

from manager.store.recorder import (
    EventRecorder,
    JetStreamRecorder,
    MemoryRecorder,
    NewEvent,
    StoredEvent,
)

__all__ = ["EventRecorder", "JetStreamRecorder", "MemoryRecorder", "NewEvent", "StoredEvent"]
