"""The saga aggregate: a pure fold of its events.

``SagaState.apply(event)`` changes the state in place and returns it; it does no
I/O and reads no clock, so folding the recorded events of a saga rebuilds
exactly the state the live coordinator had (tested).

Which steps are compensated (the choice the coordinator relies on): a step
whose action *may have taken effect*: it succeeded, or it was started and has
no result (the coordinator died or was stopped mid-step), or one of its
attempts ended with an unknown outcome (timeout, lost connection). A step that
only ever got definite error replies (or no responders) is not compensated.
Compensations must therefore tolerate "nothing to undo".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from manager.saga.errors import SagaHistoryError
from manager.saga.events import (
    CompensationFailed,
    CompensationRetrying,
    CompensationStarted,
    CompensationSucceeded,
    SagaCancelRequested,
    SagaCompensated,
    SagaCompleted,
    SagaCreated,
    SagaEvent,
    SagaFailed,
    SagaPaused,
    SagaResumed,
    StepError,
    StepFailed,
    StepRetrying,
    StepStarted,
    StepSucceeded,
    parse_event,
)
from manager.saga.plan import SagaPlan
from manager.store.recorder import StoredEvent


class SagaStatus(StrEnum):
    """Where a saga is; completed, compensated and failed are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


class StepStatus(StrEnum):
    """Where a step's action is."""

    PENDING = "pending"
    RUNNING = "running"
    """Started, no result yet (in flight, or interrupted by a coordinator crash)."""
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class CompensationStatus(StrEnum):
    """Where a step's compensation is (None in StepState: not started)."""

    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class StepState(BaseModel):
    """What the events say about one step."""

    step_id: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    result: dict[str, Any] | None = None
    error: StepError | None = None
    in_doubt: bool = False
    """An attempt ended with an unknown outcome, so the effect may have happened."""
    order: int | None = None
    """Fold sequence of the step's success (or last start): compensations run by descending order."""
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    compensation_status: CompensationStatus | None = None
    compensation_attempts: int = 0
    compensation_result: dict[str, Any] | None = None
    compensation_error: StepError | None = None

    @property
    def may_have_effect(self) -> bool:
        """Succeeded, started without result, or an attempt of unknown outcome: compensate it."""
        return self.status in (StepStatus.SUCCEEDED, StepStatus.RUNNING) or self.in_doubt


class SagaState(BaseModel):
    """A saga as its events describe it."""

    saga_id: str
    plan: SagaPlan | None = None
    phase: SagaStatus = SagaStatus.PENDING
    """pending, running, compensating or a terminal status; never paused (see ``paused``)."""
    paused: bool = False
    position: int = 0
    """Recorder position of the last applied event (the ``expected`` of the next append)."""
    applied: int = 0
    steps: dict[str, StepState] = Field(default_factory=dict)
    completion_order: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    failed_step: str | None = None
    compensation_cause: str | None = None
    compensated: list[str] = Field(default_factory=list)
    failed_compensations: list[str] = Field(default_factory=list)
    uncompensated: list[str] = Field(default_factory=list)
    failure_reason: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    # -- derived -------------------------------------------------------------------------------

    @property
    def status(self) -> SagaStatus:
        """The phase, or paused."""
        if self.paused and self.phase not in TERMINAL:
            return SagaStatus.PAUSED
        return self.phase

    @property
    def is_terminal(self) -> bool:
        """Completed, compensated or failed."""
        return self.phase in TERMINAL

    @property
    def forward_allowed(self) -> bool:
        """Whether new step attempts may start."""
        return not self.paused and self.phase in (SagaStatus.PENDING, SagaStatus.RUNNING)

    def require_plan(self) -> SagaPlan:
        """The plan (raises SagaHistoryError before ``created``)."""
        if self.plan is None:
            raise SagaHistoryError(f"saga {self.saga_id} has no created event", details={"saga_id": self.saga_id})
        return self.plan

    def all_succeeded(self) -> bool:
        """Whether every step succeeded."""
        return bool(self.steps) and all(s.status is StepStatus.SUCCEEDED for s in self.steps.values())

    def steps_to_run(self) -> list[str]:
        """Steps that may start now, in plan order: ready pending/retrying steps and interrupted ones.

        A ``running`` step is included: after a crash nobody runs it, so it must be re-run with
        the same idempotency key. A live coordinator filters out its own in-flight steps.
        """
        if not self.forward_allowed or self.plan is None:
            return []
        runnable = (StepStatus.PENDING, StepStatus.RETRYING, StepStatus.RUNNING)
        out = []
        for spec in self.plan.steps:
            st = self.steps[spec.step_id]
            if st.status in runnable and all(self.steps[d].status is StepStatus.SUCCEEDED for d in spec.depends_on):
                out.append(spec.step_id)
        return out

    def compensations_remaining(self) -> list[str]:
        """Steps still to compensate, in the order to run them (reverse completion order)."""
        if self.plan is None:
            return []
        due = [
            st
            for st in self.steps.values()
            if st.may_have_effect
            and self.plan.step(st.step_id).compensation is not None
            and st.compensation_status not in (CompensationStatus.SUCCEEDED, CompensationStatus.FAILED)
        ]
        due.sort(key=lambda st: st.order or 0, reverse=True)
        return [st.step_id for st in due]

    def uncompensable(self) -> list[str]:
        """Steps that may have taken effect but have no compensation, in completion order."""
        if self.plan is None:
            return []
        out = [
            st for st in self.steps.values() if st.may_have_effect and self.plan.step(st.step_id).compensation is None
        ]
        out.sort(key=lambda st: st.order or 0)
        return [st.step_id for st in out]

    # -- folding -------------------------------------------------------------------------------

    def apply(self, event: StoredEvent) -> SagaState:
        """Apply one stored event (in place) and return the state; unknown event types only move the position."""
        if event.aggregate_id != self.saga_id:
            raise SagaHistoryError(f"event of saga {event.aggregate_id} applied to {self.saga_id}")
        typed = parse_event(event.event_type, event.data)
        if typed is not None:
            self._apply(typed)
        self.position = event.position
        self.applied += 1
        return self

    def _step(self, step_id: str) -> StepState:
        try:
            return self.steps[step_id]
        except KeyError:
            raise SagaHistoryError(
                f"event for unknown step {step_id!r} in saga {self.saga_id}",
                details={"saga_id": self.saga_id, "step_id": step_id},
            ) from None

    def _apply(self, ev: SagaEvent) -> None:
        if not isinstance(ev, SagaCreated) and self.plan is None:
            raise SagaHistoryError(f"saga {self.saga_id}: {ev.TYPE} before created")
        self.updated_at = ev.at
        seq = self.applied + 1
        match ev:
            case SagaCreated():
                if self.plan is not None:
                    raise SagaHistoryError(f"saga {self.saga_id} created twice")
                self.plan = ev.plan
                self.steps = {s.step_id: StepState(step_id=s.step_id) for s in ev.plan.steps}
                self.created_at = ev.at
            case StepStarted():
                st = self._step(ev.step_id)
                st.status, st.attempts, st.order, st.started_at = StepStatus.RUNNING, ev.attempt, seq, ev.at
                if self.phase is SagaStatus.PENDING:
                    self.phase = SagaStatus.RUNNING
            case StepSucceeded():
                st = self._step(ev.step_id)
                st.status, st.result, st.order, st.finished_at = StepStatus.SUCCEEDED, ev.result, seq, ev.at
                self.completion_order.append(ev.step_id)
            case StepRetrying():
                st = self._step(ev.step_id)
                st.status, st.error = StepStatus.RETRYING, ev.error
                st.in_doubt = st.in_doubt or ev.error.outcome_unknown
            case StepFailed():
                st = self._step(ev.step_id)
                st.status, st.error, st.finished_at = StepStatus.FAILED, ev.error, ev.at
                st.in_doubt = st.in_doubt or ev.error.outcome_unknown
                if self.phase in (SagaStatus.PENDING, SagaStatus.RUNNING):
                    self.phase = SagaStatus.COMPENSATING
                    self.failed_step = ev.step_id
                    self.compensation_cause = f"step {ev.step_id} failed: {ev.error.message}"
            case CompensationStarted():
                st = self._step(ev.step_id)
                st.compensation_status, st.compensation_attempts = CompensationStatus.RUNNING, ev.attempt
            case CompensationSucceeded():
                st = self._step(ev.step_id)
                st.compensation_status, st.compensation_result = CompensationStatus.SUCCEEDED, ev.result
                self.compensated.append(ev.step_id)
            case CompensationRetrying():
                st = self._step(ev.step_id)
                st.compensation_status, st.compensation_error = CompensationStatus.RETRYING, ev.error
            case CompensationFailed():
                st = self._step(ev.step_id)
                st.compensation_status, st.compensation_error = CompensationStatus.FAILED, ev.error
                self.failed_compensations.append(ev.step_id)
            case SagaPaused():
                self.paused = True
            case SagaResumed():
                self.paused = False
            case SagaCancelRequested():
                self.cancel_requested, self.paused = True, False
                if self.phase in (SagaStatus.PENDING, SagaStatus.RUNNING):
                    self.phase = SagaStatus.COMPENSATING
                    self.compensation_cause = f"cancelled: {ev.reason}" if ev.reason else "cancelled"
            case SagaCompleted():
                self.phase, self.paused = SagaStatus.COMPLETED, False
            case SagaCompensated():
                self.phase, self.paused = SagaStatus.COMPENSATED, False
                self.failed_compensations = list(ev.failed_compensations)
                self.uncompensated = list(ev.uncompensated)
            case SagaFailed():
                self.phase, self.paused, self.failure_reason = SagaStatus.FAILED, False, ev.reason


def fold(events: Iterable[StoredEvent], saga_id: str | None = None) -> SagaState:
    """Rebuild a saga's state from its events (in recorded order)."""
    state: SagaState | None = SagaState(saga_id=saga_id) if saga_id is not None else None
    for ev in events:
        if state is None:
            state = SagaState(saga_id=ev.aggregate_id)
        state.apply(ev)
    if state is None:
        raise SagaHistoryError("cannot fold an empty history without a saga id")
    return state
