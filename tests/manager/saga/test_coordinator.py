"""The coordinator on in-memory parts: order, compensation, control, concurrency, recovery, replay."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bus.errors import ErrorCode
from manager.saga import (
    LeaseHeld,
    LeaseLost,
    MemoryLeases,
    SagaCoordinator,
    SagaExists,
    SagaNotFound,
    SagaPlan,
    SagaStateError,
    SagaStatus,
    StepStatus,
    fold,
)
from manager.saga.events import SagaCreated, StepStarted, StepSucceeded
from manager.saga.state import CompensationStatus
from manager.saga.testing import (
    Behaviour,
    FakeClock,
    MemoryTransport,
    ScriptedParticipant,
    chain_plan,
    participant_step,
)
from manager.store import MemoryRecorder, NewEvent

from .conftest import MakeCoordinator


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            value = cond()
            if not isinstance(value, bool):
                value = await value
            if value:
                return
            await asyncio.sleep(0.002)


def effects(participant: ScriptedParticipant) -> list[tuple[str, str]]:
    return [(e.verb, e.name) for e in participant.log.effects()]


async def replayed(recorder: MemoryRecorder, saga_id: str) -> Any:
    return fold(await recorder.read("saga", saga_id))


# -- the happy path and replay ---------------------------------------------------------------------


async def test_chain_runs_in_order_and_completes(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, recorder: MemoryRecorder
) -> None:
    await coordinator.start_saga(chain_plan("h1", 4))
    state = await coordinator.run("h1")
    assert state.status is SagaStatus.COMPLETED
    assert effects(participant) == [("do", "s1"), ("do", "s2"), ("do", "s3"), ("do", "s4")]
    assert state.steps["s3"].result is not None and state.steps["s3"].result["effect"] == 3
    assert state == await replayed(recorder, "h1")


async def test_start_twice_is_refused(coordinator: SagaCoordinator) -> None:
    await coordinator.start_saga(chain_plan("dup", 1))
    with pytest.raises(SagaExists):
        await coordinator.start_saga(chain_plan("dup", 2))


async def test_start_of_the_same_plan_again_returns_the_saga(
    coordinator: SagaCoordinator, recorder: MemoryRecorder
) -> None:
    first = await coordinator.start_saga(chain_plan("again", 2))
    second = await coordinator.start_saga(chain_plan("again", 2))
    assert second.saga_id == first.saga_id and second.position == first.position
    assert len(await recorder.read("saga", "again")) == 1


async def test_unknown_saga(coordinator: SagaCoordinator) -> None:
    with pytest.raises(SagaNotFound):
        await coordinator.run("nope")
    with pytest.raises(SagaNotFound):
        await coordinator.cancel("nope")


async def test_running_a_finished_saga_is_a_no_op(coordinator: SagaCoordinator, transport: MemoryTransport) -> None:
    await coordinator.start_saga(chain_plan("h2", 1))
    first = await coordinator.run("h2")
    sent = len(transport.requests)
    again = await coordinator.run("h2")
    assert again == first
    assert len(transport.requests) == sent


@pytest.mark.parametrize(
    "script",
    [
        {},
        {"do": {"s2": Behaviour(fail_times=2)}},
        {"do": {"s3": Behaviour(fail_always=ErrorCode.VALIDATION)}},
        {"do": {"s3": Behaviour(fail_always=ErrorCode.FORBIDDEN)}, "undo": {"s1": Behaviour(fail_times=99)}},
    ],
    ids=["completed", "retried", "compensated", "compensation-failed"],
)
async def test_replay_rebuilds_the_live_state(
    coordinator: SagaCoordinator,
    participant: ScriptedParticipant,
    recorder: MemoryRecorder,
    script: dict[str, dict[str, Behaviour]],
) -> None:
    participant.script.do.update(script.get("do", {}))
    participant.script.undo.update(script.get("undo", {}))
    await coordinator.start_saga(chain_plan("rp", 4))
    live = await coordinator.run("rp")
    assert live.is_terminal
    assert live == await replayed(recorder, "rp")
    assert live.model_dump() == (await replayed(recorder, "rp")).model_dump()


# -- compensation ------------------------------------------------------------------------------


async def test_failure_compensates_in_reverse_completion_order(
    coordinator: SagaCoordinator, participant: ScriptedParticipant
) -> None:
    participant.script.do["s5"] = Behaviour(fail_always=ErrorCode.VALIDATION)
    await coordinator.start_saga(chain_plan("c1", 5))
    state = await coordinator.run("c1")
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "s5"
    undone = [name for verb, name in effects(participant) if verb == "undo"]
    assert undone == ["s4", "s3", "s2", "s1"]
    assert state.compensated == ["s4", "s3", "s2", "s1"]
    assert state.failed_compensations == []


async def test_a_failing_compensation_does_not_stop_the_others(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, transport: MemoryTransport
) -> None:
    participant.script.do["s4"] = Behaviour(fail_always=ErrorCode.VALIDATION)
    participant.script.undo["s2"] = Behaviour(fail_times=99)  # retryable, until attempts run out
    await coordinator.start_saga(chain_plan("c2", 4))
    state = await coordinator.run("c2")
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_compensations == ["s2"]
    assert state.compensated == ["s3", "s1"]
    assert [k for _, k in transport.requests].count("c2:s2:compensation") == 5
    assert state.steps["s2"].compensation_status is CompensationStatus.FAILED
    error = state.steps["s2"].compensation_error
    assert error is not None and error.code == ErrorCode.UNAVAILABLE and error.retryable
    assert "scripted failure 5/99" in error.message


async def test_compensation_is_shielded_from_cancellation(
    make_coordinator: MakeCoordinator, participant: ScriptedParticipant, recorder: MemoryRecorder
) -> None:
    participant.script.do["s3"] = Behaviour(fail_always=ErrorCode.VALIDATION)
    participant.script.undo["s2"] = Behaviour(sleep_s=0.1)
    coordinator = make_coordinator()
    await coordinator.start_saga(chain_plan("c3", 3))
    task = asyncio.create_task(coordinator.run("c3"))
    await until(lambda: participant.active > 0 and ("undo", "s1") not in effects(participant))
    await until(lambda: any(k.endswith("s2:compensation") for _, k in coordinator._transport.requests))  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The undo in flight finished and was recorded before the cancellation went through.
    assert ("undo", "s2") in effects(participant)
    state = await replayed(recorder, "c3")
    assert state.compensated == ["s2"]
    assert state.status is SagaStatus.COMPENSATING
    # A restarted coordinator finishes the rest.
    final = await make_coordinator().run("c3")
    assert final.status is SagaStatus.COMPENSATED
    assert [n for v, n in effects(participant) if v == "undo"] == ["s2", "s1"]


# -- pause / resume / cancel -------------------------------------------------------------------


async def test_pause_lets_the_step_in_flight_finish_then_resume_completes(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, recorder: MemoryRecorder
) -> None:
    participant.script.default = Behaviour(sleep_s=0.05)
    await coordinator.start_saga(chain_plan("p1", 3))
    task = asyncio.create_task(coordinator.run("p1"))
    await until(lambda: participant.active == 1)
    paused = await coordinator.pause("p1", reason="maintenance")
    assert paused.status is SagaStatus.PAUSED
    state = await task
    assert state.status is SagaStatus.PAUSED
    assert state.steps["s1"].status is StepStatus.SUCCEEDED
    assert state.steps["s2"].status is StepStatus.PENDING
    assert await coordinator.pause("p1") == await replayed(recorder, "p1")  # idempotent
    assert (await coordinator.run("p1")).status is SagaStatus.PAUSED  # paused sagas do not run
    await coordinator.resume("p1")
    final = await coordinator.run("p1")
    assert final.status is SagaStatus.COMPLETED
    assert effects(participant) == [("do", "s1"), ("do", "s2"), ("do", "s3")]
    assert final == await replayed(recorder, "p1")


async def test_pause_from_another_coordinator_is_noticed(
    make_coordinator: MakeCoordinator, participant: ScriptedParticipant
) -> None:
    participant.script.default = Behaviour(sleep_s=0.05)
    runner, other = make_coordinator("c1"), make_coordinator("c2")
    await runner.start_saga(chain_plan("p2", 3))
    task = asyncio.create_task(runner.run("p2"))
    await until(lambda: participant.active == 1)
    await other.pause("p2")  # no bus: the runner learns it from its next append's conflict
    state = await task
    assert state.status is SagaStatus.PAUSED
    assert effects(participant) == [("do", "s1")]


async def test_cancel_stops_new_steps_and_compensates_in_reverse(
    coordinator: SagaCoordinator, participant: ScriptedParticipant, recorder: MemoryRecorder
) -> None:
    participant.script.default = Behaviour(sleep_s=0.03)
    await coordinator.start_saga(chain_plan("x1", 5))
    task = asyncio.create_task(coordinator.run("x1"))
    await until(lambda: ("do", "s2") in effects(participant) and participant.active == 1)  # s3 in flight
    await coordinator.cancel("x1", reason="operator")
    state = await task
    assert state.status is SagaStatus.COMPENSATED
    assert state.cancel_requested
    assert state.compensation_cause == "cancelled: operator"
    assert effects(participant) == [
        ("do", "s1"),
        ("do", "s2"),
        ("do", "s3"),  # was in flight: it finishes, then it is compensated too
        ("undo", "s3"),
        ("undo", "s2"),
        ("undo", "s1"),
    ]
    assert state == await replayed(recorder, "x1")
    with pytest.raises(SagaStateError):
        await coordinator.cancel("x1")
    with pytest.raises(SagaStateError):
        await coordinator.pause("x1")


async def test_cancel_a_paused_saga(coordinator: SagaCoordinator, participant: ScriptedParticipant) -> None:
    await coordinator.start_saga(chain_plan("x2", 3))
    await coordinator.pause("x2")
    await coordinator.cancel("x2")
    state = await coordinator.run("x2")
    assert state.status is SagaStatus.COMPENSATED
    assert effects(participant) == []


# -- concurrency -------------------------------------------------------------------------------


async def test_group_limit_is_respected(coordinator: SagaCoordinator, participant: ScriptedParticipant) -> None:
    participant.script.default = Behaviour(sleep_s=0.02)
    steps = [participant_step(f"g{i}", group="capture") for i in range(6)]
    plan = SagaPlan(saga_id="g1", name="g", steps=steps, max_parallel=8, group_limits={"capture": 2})
    await coordinator.start_saga(plan)
    assert (await coordinator.run("g1")).status is SagaStatus.COMPLETED
    assert participant.max_active == 2


async def test_max_parallel_is_respected(coordinator: SagaCoordinator, participant: ScriptedParticipant) -> None:
    participant.script.default = Behaviour(sleep_s=0.02)
    plan = SagaPlan(saga_id="g2", name="g", steps=[participant_step(f"p{i}") for i in range(7)], max_parallel=3)
    await coordinator.start_saga(plan)
    assert (await coordinator.run("g2")).status is SagaStatus.COMPLETED
    assert participant.max_active == 3


async def test_waves_run_in_dependency_order(coordinator: SagaCoordinator, participant: ScriptedParticipant) -> None:
    participant.script.default = Behaviour(sleep_s=0.01)
    capture = [participant_step(f"cap{i}", group="capture") for i in range(3)]
    deploy = [participant_step(f"dep{i}", group="deploy", depends_on=[c.step_id for c in capture]) for i in range(3)]
    plan = SagaPlan(saga_id="g3", name="waves", steps=capture + deploy, max_parallel=6)
    await coordinator.start_saga(plan)
    assert (await coordinator.run("g3")).status is SagaStatus.COMPLETED
    names = [n for _, n in effects(participant)]
    assert max(names.index(c.step_id) for c in capture) < min(names.index(d.step_id) for d in deploy)
    assert participant.max_active == 3


# -- recovery and ownership ----------------------------------------------------------------------


async def test_recovery_reruns_the_interrupted_step_with_the_same_key(
    coordinator: SagaCoordinator,
    participant: ScriptedParticipant,
    recorder: MemoryRecorder,
    transport: MemoryTransport,
    clock: FakeClock,
) -> None:
    # A previous coordinator ran s1, started s2 (whose effect happened) and died before recording it.
    plan = chain_plan("rc", 3)
    at = clock.now()
    for expected, ev in enumerate(
        [
            SagaCreated(at=at, plan=plan),
            StepStarted(at=at, step_id="s1", attempt=1, idempotency_key="rc:s1:action"),
            StepSucceeded(at=at, step_id="s1", attempt=1, result={"effect": 1}),
            StepStarted(at=at, step_id="s2", attempt=1, idempotency_key="rc:s2:action"),
        ]
    ):
        await recorder.append("saga", "rc", NewEvent(ev.TYPE, ev.model_dump(mode="json")), expected=expected)
    await participant.handle("do", {"idempotency_key": "rc:s1:action", "name": "s1"})
    await participant.handle("do", {"idempotency_key": "rc:s2:action", "name": "s2"})

    state = await coordinator.run("rc")
    assert state.status is SagaStatus.COMPLETED
    keys = [k for _, k in transport.requests]
    assert "rc:s1:action" not in keys  # succeeded: never again
    assert keys == ["rc:s2:action", "rc:s3:action"]  # same key for the interrupted step
    assert state.steps["s2"].attempts == 1  # an interrupted attempt is repeated, not counted again
    assert [e.name for e in participant.log.effects()] == ["s1", "s2", "s3"]  # each effect once


async def test_killed_run_is_resumed_by_another_coordinator(
    make_coordinator: MakeCoordinator, participant: ScriptedParticipant, recorder: MemoryRecorder
) -> None:
    participant.script.default = Behaviour(sleep_s=0.02)
    first = make_coordinator("c1")
    await first.start_saga(chain_plan("k1", 4))
    task = asyncio.create_task(first.run("k1"))
    await until(lambda: ("do", "s2") in effects(participant))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await make_coordinator("c2").resume_all()
    assert result["k1"].status is SagaStatus.COMPLETED
    assert [n for _, n in effects(participant)] == ["s1", "s2", "s3", "s4"]
    assert result["k1"] == await replayed(recorder, "k1")


async def test_lease_keeps_a_second_coordinator_out(
    make_coordinator: MakeCoordinator, participant: ScriptedParticipant, leases: MemoryLeases
) -> None:
    participant.script.default = Behaviour(sleep_s=0.05)
    first, second = make_coordinator("c1"), make_coordinator("c2")
    await first.start_saga(chain_plan("l1", 2))
    task = asyncio.create_task(first.run("l1"))
    await until(lambda: participant.active == 1)
    with pytest.raises(LeaseHeld):
        await second.run("l1")
    with pytest.raises(LeaseHeld):
        await first.run("l1")  # not twice in one coordinator either
    assert (await task).status is SagaStatus.COMPLETED
    assert leases.holder("l1") is None  # released


async def test_same_instance_takes_its_lease_back_at_once(
    make_coordinator: MakeCoordinator, leases: MemoryLeases
) -> None:
    coordinator = make_coordinator("c1")
    await coordinator.start_saga(chain_plan("l2", 1))
    await leases.acquire("l2", "c1")  # left behind by a crashed process with the same instance id
    assert (await make_coordinator("c1").run("l2")).status is SagaStatus.COMPLETED
    await leases.acquire("l2", "dead")
    leases.expire("l2")  # the dead holder's TTL ran out
    assert (await make_coordinator("c2").run("l2")).status is SagaStatus.COMPLETED


async def test_two_coordinators_without_leases_cannot_both_win(
    recorder: MemoryRecorder, participant: ScriptedParticipant, transport: MemoryTransport, clock: FakeClock
) -> None:
    # A split brain (each thinks it holds the lease): optimistic concurrency stops one of them.
    participant.script.default = Behaviour(sleep_s=0.01)

    def make(instance: str) -> SagaCoordinator:
        from bus.client import Identity

        return SagaCoordinator(
            None,
            recorder,
            Identity(actor=instance),
            clock=clock,
            transport=transport,
            leases=MemoryLeases(),
            instance_id=instance,
        )

    a, b = make("a"), make("b")
    await a.start_saga(chain_plan("sb", 4))
    results = await asyncio.gather(a.run("sb"), b.run("sb"), return_exceptions=True)
    assert sum(isinstance(r, LeaseLost) for r in results) >= 1
    final = await replayed(recorder, "sb")
    if final.status is not SagaStatus.COMPLETED:  # the loser may have stopped the winner's plan midway
        final = await a.run("sb")
    assert final.status is SagaStatus.COMPLETED
    assert sorted(n for _, n in effects(participant)) == ["s1", "s2", "s3", "s4"]  # each effect once


async def test_resume_all_skips_finished_and_paused_sagas(
    coordinator: SagaCoordinator, participant: ScriptedParticipant
) -> None:
    await coordinator.start_saga(chain_plan("done", 1))
    await coordinator.run("done")
    await coordinator.start_saga(chain_plan("held", 1))
    await coordinator.pause("held")
    await coordinator.start_saga(chain_plan("new1", 2))
    await coordinator.start_saga(chain_plan("new2", 2))
    assert await coordinator.find_unfinished() == ["new1", "new2"]
    result = await coordinator.resume_all()
    assert sorted(result) == ["new1", "new2"]
    assert all(s.status is SagaStatus.COMPLETED for s in result.values())
    listed = {s.saga_id: s.status for s in await coordinator.list_sagas()}
    assert listed == {
        "done": SagaStatus.COMPLETED,
        "held": SagaStatus.PAUSED,
        "new1": SagaStatus.COMPLETED,
        "new2": SagaStatus.COMPLETED,
    }


async def test_serve_runs_submitted_and_resumed_sagas(coordinator: SagaCoordinator, recorder: MemoryRecorder) -> None:
    await coordinator.start_saga(chain_plan("early", 2))  # unfinished before serve starts
    assert not coordinator.submit("early")  # not serving yet
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(coordinator.serve())
        await coordinator.start_saga(chain_plan("late", 2))
        await until(lambda: coordinator._tg is not None)
        assert coordinator.submit("late")

        async def finished() -> bool:
            states = [await replayed(recorder, s) for s in ("early", "late")]
            return all(s.is_terminal for s in states)

        await until(finished)
        serving.cancel()
    assert (await replayed(recorder, "late")).status is SagaStatus.COMPLETED


async def test_unreadable_histories_are_listed_but_not_resumed(
    coordinator: SagaCoordinator, recorder: MemoryRecorder
) -> None:
    await recorder.append("saga", "bad", NewEvent("skyferry.v1.saga.step_started", {"x": 1}), expected=0)
    await coordinator.start_saga(chain_plan("good", 1))
    assert await coordinator.find_unfinished() == ["good"]
    assert (await coordinator.resume_all())["good"].status is SagaStatus.COMPLETED


class GatedClock(FakeClock):
    """A fake clock whose first sleep waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await super().sleep(seconds)


async def test_pause_and_resume_seen_together_keep_the_backoff(
    make_coordinator: MakeCoordinator, participant: ScriptedParticipant
) -> None:
    clock = GatedClock()
    participant.script.do["s1"] = Behaviour(fail_times=2)
    runner, other = make_coordinator("c1", clock=clock), make_coordinator("c2", clock=clock)
    await runner.start_saga(chain_plan("pr1", 1))
    task = asyncio.create_task(runner.run("pr1"))
    await clock.waiting.wait()  # the runner sleeps its first backoff
    await other.pause("pr1")
    await other.resume("pr1")  # the runner sees both at its next append, at once
    clock.gate.set()
    state = await task
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["s1"].attempts == 3
    assert clock.sleeps == [0.05, 0.1]  # the second backoff was not skipped
