"""Saga events: one pydantic model per transition, each with a versioned type name.

Events are appended to aggregate type ``saga`` (subject ``sf.evt.saga.<saga_id>``).
Every event carries ``at``, the coordinator's clock when it was decided, so a
replay rebuilds timestamps exactly (the recorder's own timestamp is ignored).

Event types::

    skyferry.v1.saga.created                 {plan}
    skyferry.v1.saga.step_started            {step_id, attempt, idempotency_key}
    skyferry.v1.saga.step_succeeded          {step_id, attempt, result}
    skyferry.v1.saga.step_retrying           {step_id, attempt, error, delay_s}
    skyferry.v1.saga.step_failed             {step_id, attempt, error}
    skyferry.v1.saga.compensation_started    {step_id, attempt, idempotency_key}
    skyferry.v1.saga.compensation_succeeded  {step_id, attempt, result}
    skyferry.v1.saga.compensation_retrying   {step_id, attempt, error, delay_s}
    skyferry.v1.saga.compensation_failed     {step_id, attempt, error}
    skyferry.v1.saga.paused                  {reason}
    skyferry.v1.saga.resumed                 {reason}
    skyferry.v1.saga.cancel_requested        {reason}
    skyferry.v1.saga.completed               {}
    skyferry.v1.saga.compensated             {cause, compensated, failed_compensations, uncompensated}
    skyferry.v1.saga.failed                  {reason}

Unknown fields are ignored when reading so that an older coordinator can fold
events written by a newer one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.errors import SkyferryError
from manager.saga.errors import SagaHistoryError
from manager.saga.plan import SagaPlan

AGGREGATE = "saga"
EVENT_PREFIX = "skyferry.v1.saga."


class StepError(BaseModel):
    """Why an attempt failed, as recorded."""

    model_config = ConfigDict(extra="ignore")
    code: str = Field(description="Error code (bus.errors.ErrorCode value, or a participant's own).")
    message: str
    retryable: bool = Field(description="Whether the failure allowed another attempt.")
    outcome_unknown: bool = Field(
        default=False, description="The request may have reached the participant (timeout, lost connection)."
    )
    details: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: SkyferryError, *, retryable: bool, outcome_unknown: bool) -> StepError:
        return cls(
            code=str(exc.code),
            message=exc.message,
            retryable=retryable,
            outcome_unknown=outcome_unknown,
            details=exc.details,
        )


class SagaEvent(BaseModel):
    """Base of every saga event."""

    model_config = ConfigDict(extra="ignore")
    TYPE: ClassVar[str] = ""
    at: dt.datetime = Field(description="When the coordinator decided the transition (UTC).")

    @classmethod
    def short_name(cls) -> str:
        """``skyferry.v1.saga.step_started`` -> ``step_started``."""
        return cls.TYPE.removeprefix(EVENT_PREFIX)


class SagaCreated(SagaEvent):
    """A saga was created from its plan."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "created"
    plan: SagaPlan


class _StepEvent(SagaEvent):
    """An event about one attempt of one step."""

    step_id: str
    attempt: int = Field(ge=1)


class StepStarted(_StepEvent):
    """An attempt of a step's action is about to be sent."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "step_started"
    idempotency_key: str


class StepSucceeded(_StepEvent):
    """The step's action succeeded; ``result`` is the participant's reply."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "step_succeeded"
    result: dict[str, Any] = Field(default_factory=dict)


class StepRetrying(_StepEvent):
    """An attempt failed retryably; the next one follows after ``delay_s``."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "step_retrying"
    error: StepError
    delay_s: float


class StepFailed(_StepEvent):
    """The step failed for good (non-retryable error or attempts exhausted)."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "step_failed"
    error: StepError


class CompensationStarted(_StepEvent):
    """An attempt of a step's compensation is about to be sent."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "compensation_started"
    idempotency_key: str


class CompensationSucceeded(_StepEvent):
    """The step's compensation succeeded."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "compensation_succeeded"
    result: dict[str, Any] = Field(default_factory=dict)


class CompensationRetrying(_StepEvent):
    """A compensation attempt failed retryably."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "compensation_retrying"
    error: StepError
    delay_s: float


class CompensationFailed(_StepEvent):
    """The compensation failed for good; the other compensations still run."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "compensation_failed"
    error: StepError


class SagaPaused(SagaEvent):
    """No new attempts start until resumed."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "paused"
    reason: str = ""


class SagaResumed(SagaEvent):
    """A pause was lifted."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "resumed"
    reason: str = ""


class SagaCancelRequested(SagaEvent):
    """Stop starting steps and compensate what took effect."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "cancel_requested"
    reason: str = ""


class SagaCompleted(SagaEvent):
    """Every step succeeded."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "completed"


class SagaCompensated(SagaEvent):
    """Every compensation that was due has run; the ones that failed are listed."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "compensated"
    cause: str
    compensated: list[str] = Field(default_factory=list, description="Compensations that succeeded, in order.")
    failed_compensations: list[str] = Field(default_factory=list)
    uncompensated: list[str] = Field(
        default_factory=list, description="Steps that took effect but have no compensation."
    )


class SagaFailed(SagaEvent):
    """The coordinator could not drive the saga any further (not a step failure: see compensated)."""

    TYPE: ClassVar[str] = EVENT_PREFIX + "failed"
    reason: str


EVENT_TYPES: dict[str, type[SagaEvent]] = {
    cls.TYPE: cls
    for cls in (
        SagaCreated,
        StepStarted,
        StepSucceeded,
        StepRetrying,
        StepFailed,
        CompensationStarted,
        CompensationSucceeded,
        CompensationRetrying,
        CompensationFailed,
        SagaPaused,
        SagaResumed,
        SagaCancelRequested,
        SagaCompleted,
        SagaCompensated,
        SagaFailed,
    )
}

CONTROL_TYPES = frozenset({SagaPaused.TYPE, SagaResumed.TYPE, SagaCancelRequested.TYPE})
"""Events written by commands (pause/resume/cancel) rather than by the coordinator running the saga."""

TERMINAL_TYPES = frozenset({SagaCompleted.TYPE, SagaCompensated.TYPE, SagaFailed.TYPE})


def parse_event(event_type: str, data: dict[str, Any]) -> SagaEvent | None:
    """The typed event for a stored one; None for a type this version does not know.

    Raises:
        SagaHistoryError: the payload does not match its type (e.g. a stored plan that no
            longer validates).
    """
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        return None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SagaHistoryError(
            f"unreadable {event_type} event",
            details={"errors": exc.errors(include_url=False, include_input=False, include_context=False)},
        ) from exc


class SagaProgress(BaseModel):
    """Published on ``sf.progress.<saga_id>`` after every recorded transition (plain pub/sub)."""

    __schema_name__: ClassVar[str] = EVENT_PREFIX + "progress"
    saga_id: str
    position: int
    event: str = Field(description="Short event name, e.g. 'step_succeeded'.")
    status: str
    step_id: str | None = None
    attempt: int | None = None
    steps_total: int = 0
    steps_succeeded: int = 0
    at: dt.datetime
