"""The saga coordinator's errors, mixed into the bus error tree so they travel as typed replies.

::

    SagaError                       marker base of every saga error
    ├── InvalidPlan                 (ValidationFailed)     cycle, unknown dependency, bad subject...
    ├── SagaNotFound                (NotFound)             no events for that saga id
    ├── SagaExists                  (AlreadyExists)        a saga with that id was already created
    ├── SagaStateError              (InvalidState)         command not allowed in the saga's status
    ├── LeaseHeld                   (ConcurrencyConflict)  another coordinator runs the saga (retryable)
    ├── LeaseLost                   (ConcurrencyConflict)  this coordinator lost the saga while running it
    └── SagaHistoryError            (InternalError)        the recorded events cannot be folded

Each class takes its ``code``/``retryable`` from the bus error it derives from, so
:func:`bus.errors.error_from_reply` rebuilds the bus-level class on the caller's side.
"""

from __future__ import annotations

from bus.errors import (
    AlreadyExists,
    ConcurrencyConflict,
    InternalError,
    InvalidState,
    NotFound,
    SkyferryError,
    ValidationFailed,
)


class SagaError(SkyferryError):
    """Marker base of every saga error (defines no code of its own)."""


class InvalidPlan(SagaError, ValidationFailed):
    """A saga plan failed validation."""


class SagaNotFound(SagaError, NotFound):
    """No saga with that id has been recorded."""


class SagaExists(SagaError, AlreadyExists):
    """A saga with that id already exists."""


class SagaStateError(SagaError, InvalidState):
    """The command is not allowed in the saga's current status."""


class LeaseHeld(SagaError, ConcurrencyConflict):
    """Another coordinator (or another run in this one) holds the saga's lease."""


class LeaseLost(SagaError, ConcurrencyConflict):
    """This coordinator lost the saga's lease, or another coordinator wrote to the saga."""


class SagaHistoryError(SagaError, InternalError):
    """The saga's recorded events are inconsistent and cannot be folded."""
