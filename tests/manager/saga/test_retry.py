"""Retry policy: which failures are retried, with which delays, until when."""

from __future__ import annotations

from typing import Any

import pytest

from bus.errors import (
    BusTimeout,
    BusUnavailable,
    ConcurrencyConflict,
    ErrorCode,
    Forbidden,
    InvalidState,
    NoResponders,
    RemoteTimeout,
    RemoteUnavailable,
    ValidationFailed,
)
from manager.saga import RetryPolicy, SagaCoordinator, SagaStatus, StepStatus, classify
from manager.saga.testing import Behaviour, FakeClock, MemoryTransport, ScriptedParticipant, chain_plan

from .conftest import MakeCoordinator


@pytest.mark.parametrize(
    ("exc", "retryable", "unknown"),
    [
        (NoResponders("gone"), True, False),
        (BusTimeout("slow"), True, True),
        (BusUnavailable("down"), True, True),
        (TimeoutError(), True, True),
        (RemoteUnavailable("busy"), True, False),
        (RemoteTimeout("participant timed out"), True, True),
        (ConcurrencyConflict("moved"), True, False),
        (ValidationFailed("bad"), False, False),
        (InvalidState("no"), False, False),
        (Forbidden("no"), False, False),
        (ValueError("bug"), False, False),
    ],
)
def test_classification(exc: BaseException, retryable: bool, unknown: bool) -> None:
    err = classify(exc, RetryPolicy())
    assert (err.retryable, err.outcome_unknown) == (retryable, unknown)


def test_non_retryable_codes_override_the_error() -> None:
    policy = RetryPolicy(non_retryable_codes=[ErrorCode.TIMEOUT])
    assert not classify(BusTimeout("slow"), policy).retryable
    assert classify(NoResponders("gone"), policy).retryable


async def test_retryable_failures_are_retried_with_backoff(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, clock: FakeClock
) -> None:
    participant.script.do["s2"] = Behaviour(fail_times=3)
    plan = chain_plan("r1", 3, retry=RetryPolicy(max_attempts=5, initial_backoff_s=1, max_backoff_s=3))
    await coordinator.start_saga(plan)
    state = await coordinator.run("r1")
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["s2"].attempts == 4
    assert clock.sleeps == [1, 2, 3]  # capped by max_backoff_s
    assert [e.name for e in participant.log.effects()] == ["s1", "s2", "s3"]


async def test_exhausted_attempts_fail_the_step_for_good(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, transport: MemoryTransport
) -> None:
    participant.script.do["s2"] = Behaviour(fail_times=99)
    await coordinator.start_saga(chain_plan("r2", 3, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.1)))
    state = await coordinator.run("r2")
    assert state.steps["s2"].status is StepStatus.FAILED
    assert state.steps["s2"].attempts == 3
    assert [k for _, k in transport.requests].count("r2:s2:action") == 3
    assert state.status is SagaStatus.COMPENSATED
    assert state.compensated == ["s1"]


async def test_non_retryable_error_fails_at_once(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, transport: MemoryTransport
) -> None:
    participant.script.do["s1"] = Behaviour(fail_always=ErrorCode.INVALID_STATE)
    await coordinator.start_saga(chain_plan("r3", 2))
    state = await coordinator.run("r3")
    assert state.steps["s1"].status is StepStatus.FAILED
    assert state.steps["s1"].error is not None and state.steps["s1"].error.code == "invalid_state"
    assert transport.requests == [("sf.cmd.testpart.do", "r3:s1:action")]
    assert state.status is SagaStatus.COMPENSATED
    assert state.compensated == []  # the failed step never took effect


class FlakyTransport:
    """No responders for the first ``absent`` requests, then the real participant."""

    def __init__(self, inner: MemoryTransport, absent: int) -> None:
        self.inner, self.absent = inner, absent

    async def request(self, subject: str, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if self.absent > 0:
            self.absent -= 1
            raise NoResponders(f"no participant serves {subject}")
        return await self.inner.request(subject, payload, **kw)


async def test_absent_participant_is_retried_until_it_appears(
    make_coordinator: MakeCoordinator, transport: MemoryTransport, participant: ScriptedParticipant
) -> None:
    coordinator = make_coordinator(transport=FlakyTransport(transport, absent=2))
    await coordinator.start_saga(chain_plan("r4", 2))
    state = await coordinator.run("r4")
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["s1"].attempts == 3
    assert len(participant.log.effects()) == 2


async def test_timeouts_keep_the_same_key_and_the_effect_happens_once(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, transport: MemoryTransport
) -> None:
    # The participant is slower than the step timeout: attempts time out while it works.
    plan = chain_plan("r5", 1, timeout_s=0.05, behaviours={"s1": Behaviour(sleep_s=0.12)})
    await coordinator.start_saga(plan)
    state = await coordinator.run("r5")
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["s1"].attempts >= 2
    assert state.steps["s1"].in_doubt
    assert {k for _, k in transport.requests} == {"r5:s1:action"}
    assert len(participant.log.effects()) == 1
