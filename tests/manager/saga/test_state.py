"""The pure fold: statuses, what runs next, what to compensate and in which order."""

from __future__ import annotations

import datetime as dt

import pytest

from manager.saga import SagaHistoryError, SagaPlan, SagaState, SagaStatus, StepStatus, fold
from manager.saga.events import (
    CompensationFailed,
    CompensationStarted,
    CompensationSucceeded,
    SagaCancelRequested,
    SagaCompensated,
    SagaCompleted,
    SagaCreated,
    SagaEvent,
    SagaPaused,
    SagaResumed,
    StepError,
    StepFailed,
    StepRetrying,
    StepStarted,
    StepSucceeded,
)
from manager.saga.testing import chain_plan, participant_step
from manager.store import StoredEvent

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
RETRYABLE = StepError(code="unavailable", message="down", retryable=True)
TIMEOUT = StepError(code="timeout", message="slow", retryable=True, outcome_unknown=True)
FATAL = StepError(code="validation", message="no", retryable=False)


def stored(saga_id: str, events: list[SagaEvent]) -> list[StoredEvent]:
    return [
        StoredEvent(
            position=i * 10,  # positions are global: other aggregates' events sit in between
            aggregate_type="saga",
            aggregate_id=saga_id,
            event_type=ev.TYPE,
            data=ev.model_dump(mode="json"),
            timestamp=T0,
            actor="t",
            msg_id=f"m{i}",
        )
        for i, ev in enumerate(events, start=1)
    ]


def started(step: str, attempt: int = 1) -> StepStarted:
    return StepStarted(at=T0, step_id=step, attempt=attempt, idempotency_key=f"k:{step}")


def ok(step: str, attempt: int = 1) -> StepSucceeded:
    return StepSucceeded(at=T0, step_id=step, attempt=attempt, result={"step": step})


def diamond() -> SagaPlan:
    #   a -> b -> d
    #   a -> c -> d
    return SagaPlan(
        saga_id="dia",
        name="diamond",
        max_parallel=4,
        steps=[
            participant_step("a"),
            participant_step("b", depends_on=["a"]),
            participant_step("c", depends_on=["a"]),
            participant_step("d", depends_on=["b", "c"], compensate=False),
        ],
    )


def test_created_saga_is_pending_with_roots_ready() -> None:
    state = fold(stored("dia", [SagaCreated(at=T0, plan=diamond())]))
    assert state.status is SagaStatus.PENDING
    assert state.steps_to_run() == ["a"]
    assert state.position == 10
    assert state.created_at == T0


def test_dependencies_gate_what_runs_next() -> None:
    events: list[SagaEvent] = [SagaCreated(at=T0, plan=diamond()), started("a"), ok("a")]
    state = fold(stored("dia", events))
    assert state.status is SagaStatus.RUNNING
    assert state.steps_to_run() == ["b", "c"]
    state = fold(stored("dia", [*events, started("b"), ok("b")]))
    assert state.steps_to_run() == ["c"]


def test_started_without_result_is_to_be_rerun() -> None:
    state = fold(stored("dia", [SagaCreated(at=T0, plan=diamond()), started("a")]))
    assert state.steps["a"].status is StepStatus.RUNNING
    assert state.steps_to_run() == ["a"]


def test_retrying_counts_attempts_and_notes_unknown_outcomes() -> None:
    events: list[SagaEvent] = [
        SagaCreated(at=T0, plan=diamond()),
        started("a"),
        StepRetrying(at=T0, step_id="a", attempt=1, error=RETRYABLE, delay_s=0.1),
    ]
    state = fold(stored("dia", events))
    assert (state.steps["a"].status, state.steps["a"].attempts, state.steps["a"].in_doubt) == (
        StepStatus.RETRYING,
        1,
        False,
    )
    events += [started("a", 2), StepRetrying(at=T0, step_id="a", attempt=2, error=TIMEOUT, delay_s=0.2)]
    state = fold(stored("dia", events))
    assert state.steps["a"].attempts == 2
    assert state.steps["a"].in_doubt
    assert state.steps_to_run() == ["a"]


def test_failure_switches_to_compensating_in_reverse_completion_order() -> None:
    plan = chain_plan("c", 4)
    events: list[SagaEvent] = [SagaCreated(at=T0, plan=plan)]
    for s in ("s1", "s2", "s3"):
        events += [started(s), ok(s)]
    events += [started("s4"), StepFailed(at=T0, step_id="s4", attempt=1, error=FATAL)]
    state = fold(stored("c", events))
    assert state.status is SagaStatus.COMPENSATING
    assert state.failed_step == "s4"
    assert state.steps_to_run() == []
    assert state.compensations_remaining() == ["s3", "s2", "s1"]
    events += [
        CompensationStarted(at=T0, step_id="s3", attempt=1, idempotency_key="x"),
        CompensationSucceeded(at=T0, step_id="s3", attempt=1),
        CompensationStarted(at=T0, step_id="s2", attempt=1, idempotency_key="y"),
        CompensationFailed(at=T0, step_id="s2", attempt=1, error=FATAL),
        CompensationStarted(at=T0, step_id="s1", attempt=1, idempotency_key="z"),
    ]
    state = fold(stored("c", events))
    assert state.compensations_remaining() == ["s1"]  # started, no result: run it again
    assert state.failed_compensations == ["s2"]
    events += [
        CompensationSucceeded(at=T0, step_id="s1", attempt=1),
        SagaCompensated(at=T0, cause="x", compensated=["s3", "s1"], failed_compensations=["s2"]),
    ]
    state = fold(stored("c", events))
    assert state.status is SagaStatus.COMPENSATED
    assert state.is_terminal
    assert state.compensated == ["s3", "s1"]


def test_reverse_order_follows_completion_not_plan_order() -> None:
    plan = SagaPlan(saga_id="p", name="p", max_parallel=3, steps=[participant_step(s) for s in ("x", "y", "z")])
    events: list[SagaEvent] = [SagaCreated(at=T0, plan=plan), started("x"), started("y"), started("z")]
    events += [ok("z"), ok("x"), ok("y"), SagaCancelRequested(at=T0, reason="stop")]
    state = fold(stored("p", events))
    assert state.completion_order == ["z", "x", "y"]
    assert state.compensations_remaining() == ["y", "x", "z"]
    assert state.compensation_cause == "cancelled: stop"


def test_in_doubt_and_interrupted_steps_are_compensated_but_clean_failures_are_not() -> None:
    plan = SagaPlan(saga_id="d", name="d", max_parallel=3, steps=[participant_step(s) for s in ("a", "b", "c")])
    events: list[SagaEvent] = [
        SagaCreated(at=T0, plan=plan),
        started("a"),
        ok("a"),
        started("b"),  # interrupted: no outcome
        started("c"),
        StepFailed(at=T0, step_id="c", attempt=1, error=FATAL),  # definite error: no effect
    ]
    state = fold(stored("d", events))
    assert state.compensations_remaining() == ["b", "a"]
    events[-1] = StepFailed(at=T0, step_id="c", attempt=1, error=TIMEOUT)  # unknown outcome
    state = fold(stored("d", events))
    assert set(state.compensations_remaining()) == {"a", "b", "c"}


def test_steps_without_compensation_are_listed_as_uncompensable() -> None:
    events: list[SagaEvent] = [SagaCreated(at=T0, plan=diamond())]
    for s in ("a", "b", "c", "d"):
        events += [started(s), ok(s)]
    state = fold(stored("dia", [*events, SagaCancelRequested(at=T0)]))
    assert "d" not in state.compensations_remaining()
    assert state.uncompensable() == ["d"]


def test_pause_resume_keep_the_underlying_phase() -> None:
    plan = chain_plan("pr", 2)
    base: list[SagaEvent] = [SagaCreated(at=T0, plan=plan), started("s1")]
    paused = fold(stored("pr", [*base, SagaPaused(at=T0, reason="maint")]))
    assert paused.status is SagaStatus.PAUSED
    assert paused.phase is SagaStatus.RUNNING
    assert paused.steps_to_run() == []
    resumed = fold(stored("pr", [*base, SagaPaused(at=T0), SagaResumed(at=T0)]))
    assert resumed.status is SagaStatus.RUNNING
    # a failure while paused: still paused, compensating once resumed
    failed = [*base, SagaPaused(at=T0), StepFailed(at=T0, step_id="s1", attempt=1, error=FATAL)]
    assert fold(stored("pr", failed)).status is SagaStatus.PAUSED
    assert fold(stored("pr", [*failed, SagaResumed(at=T0)])).status is SagaStatus.COMPENSATING
    # cancel lifts a pause
    assert fold(stored("pr", [*base, SagaPaused(at=T0), SagaCancelRequested(at=T0)])).status is (
        SagaStatus.COMPENSATING
    )


def test_completed_saga() -> None:
    plan = chain_plan("done", 2)
    events: list[SagaEvent] = [SagaCreated(at=T0, plan=plan), started("s1"), ok("s1"), started("s2"), ok("s2")]
    state = fold(stored("done", [*events, SagaCompleted(at=T0)]))
    assert state.status is SagaStatus.COMPLETED
    assert state.all_succeeded()
    assert state.steps["s2"].result == {"step": "s2"}


def test_apply_is_incremental_and_equal_to_fold() -> None:
    events = stored("dia", [SagaCreated(at=T0, plan=diamond()), started("a"), ok("a"), started("b")])
    live = SagaState(saga_id="dia")
    for ev in events:
        live.apply(ev)
    assert live == fold(events)
    assert live.applied == 4


def test_unknown_event_types_only_move_the_position() -> None:
    events = stored("dia", [SagaCreated(at=T0, plan=diamond())])
    future = StoredEvent(
        position=99,
        aggregate_type="saga",
        aggregate_id="dia",
        event_type="skyferry.v2.saga.x",
        data={},
        timestamp=T0,
        actor=None,
        msg_id="m",
    )
    state = fold([*events, future])
    assert state.position == 99
    assert state.status is SagaStatus.PENDING


@pytest.mark.parametrize(
    "events",
    [
        [started("a")],  # before created
        [SagaCreated(at=T0, plan=diamond()), started("ghost")],
        [SagaCreated(at=T0, plan=diamond()), SagaCreated(at=T0, plan=diamond())],
    ],
)
def test_inconsistent_histories_are_refused(events: list[SagaEvent]) -> None:
    with pytest.raises(SagaHistoryError):
        fold(stored("dia", events))


def test_a_stored_plan_that_no_longer_validates_is_a_history_error() -> None:
    (created,) = stored("old", [SagaCreated(at=T0, plan=chain_plan("old", 1))])
    data = dict(created.data)
    data["plan"] = {**data["plan"], "steps": [{**data["plan"]["steps"][0], "depends_on": ["s1"]}]}
    broken = StoredEvent(**{**created.__dict__, "data": data})
    with pytest.raises(SagaHistoryError):
        fold([broken])
