"""The ``saga`` bus service: every command over NATS against a serving coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus.client import Identity, command
from bus.connection import Bus
from bus.errors import InvalidState, NotFound, ValidationFailed
from manager.saga import SagaCoordinator, SagaService, SagaStatus, SagaView
from manager.saga.service import ListSagas, SagaList, SagaRef, StartSaga
from manager.saga.testing import Behaviour, Script, TestParticipant, chain_plan
from manager.store import JetStreamRecorder

OPERATOR = Identity(actor="alice")


@pytest.fixture
async def serving(bus: Bus, tmp_path: Path) -> AsyncIterator[SagaCoordinator]:
    """A coordinator serving sagas, its service, and a slow-ish participant."""
    coordinator = SagaCoordinator(bus, JetStreamRecorder(bus), Identity(actor="coordinator"), instance_id="svc")
    script = Script(default=Behaviour(sleep_s=0.05))
    async with (
        TestParticipant(bus, log_path=tmp_path / "effects.sqlite", script=script),
        SagaService(bus, coordinator),
        asyncio.TaskGroup() as tg,
    ):
        task = tg.create_task(coordinator.serve())
        yield coordinator
        task.cancel()


async def show(bus: Bus, saga_id: str) -> SagaView:
    return await command(bus, "saga", "show", SagaRef(saga_id=saga_id), SagaView, identity=OPERATOR)


async def wait_status(bus: Bus, saga_id: str, *statuses: SagaStatus, timeout: float = 10) -> SagaView:
    async with asyncio.timeout(timeout):
        while True:
            view = await show(bus, saga_id)
            if view.status in statuses:
                return view
            await asyncio.sleep(0.02)


async def test_start_show_list(bus: Bus, serving: SagaCoordinator) -> None:
    view = await command(bus, "saga", "start", StartSaga(plan=chain_plan("svc1", 3)), SagaView, identity=OPERATOR)
    assert view.saga_id == "svc1"
    assert view.status in (SagaStatus.PENDING, SagaStatus.RUNNING)
    done = await wait_status(bus, "svc1", SagaStatus.COMPLETED)
    assert [s.status for s in done.steps] == ["succeeded"] * 3
    assert done.steps[0].result is not None and done.steps[0].result["name"] == "s1"
    listed = await command(bus, "saga", "list", ListSagas(), SagaList, identity=OPERATOR)
    assert [(s.saga_id, s.status, s.steps_succeeded) for s in listed.sagas] == [("svc1", SagaStatus.COMPLETED, 3)]
    events = await JetStreamRecorder(bus).read("saga", "svc1")
    assert events[0].actor == "alice"  # the command's actor is recorded on saga.created


async def test_pause_resume_cancel(bus: Bus, serving: SagaCoordinator) -> None:
    await command(bus, "saga", "start", StartSaga(plan=chain_plan("svc2", 6)), SagaView, identity=OPERATOR)
    await wait_status(bus, "svc2", SagaStatus.RUNNING)
    paused = await command(bus, "saga", "pause", SagaRef(saga_id="svc2"), SagaView, identity=OPERATOR)
    assert paused.status is SagaStatus.PAUSED
    await asyncio.sleep(0.2)
    frozen = await show(bus, "svc2")
    await asyncio.sleep(0.2)
    assert (await show(bus, "svc2")).position == frozen.position  # nothing moves while paused
    assert "svc2" not in serving.running
    await command(bus, "saga", "resume", SagaRef(saga_id="svc2"), SagaView, identity=OPERATOR)
    await wait_status(bus, "svc2", SagaStatus.RUNNING)
    cancelled = await command(
        bus, "saga", "cancel", SagaRef(saga_id="svc2", reason="test"), SagaView, identity=OPERATOR
    )
    assert cancelled.cancel_requested
    end = await wait_status(bus, "svc2", SagaStatus.COMPENSATED)
    done = [s.step_id for s in end.steps if s.status == "succeeded"]
    assert done and len(done) < 6
    assert end.compensated == list(reversed(done))
    assert end.compensation_cause == "cancelled: test"


async def test_list_filters_by_status(bus: Bus, serving: SagaCoordinator) -> None:
    await command(bus, "saga", "start", StartSaga(plan=chain_plan("a1", 1)), SagaView, identity=OPERATOR)
    await wait_status(bus, "a1", SagaStatus.COMPLETED)
    await command(bus, "saga", "start", StartSaga(plan=chain_plan("a2", 3)), SagaView, identity=OPERATOR)
    await command(bus, "saga", "pause", SagaRef(saga_id="a2"), SagaView, identity=OPERATOR)
    paused = await command(bus, "saga", "list", ListSagas(status=SagaStatus.PAUSED), SagaList, identity=OPERATOR)
    assert [s.saga_id for s in paused.sagas] == ["a2"]


async def test_typed_errors(bus: Bus, serving: SagaCoordinator) -> None:
    bad = chain_plan("bad", 2).model_dump(mode="json")
    bad["steps"][0]["depends_on"] = ["s2"]
    with pytest.raises(ValidationFailed):
        await command(bus, "saga", "start", {"plan": bad}, SagaView, identity=OPERATOR)
    with pytest.raises(NotFound):
        await show(bus, "ghost")
    await command(bus, "saga", "start", StartSaga(plan=chain_plan("fin", 1)), SagaView, identity=OPERATOR)
    await wait_status(bus, "fin", SagaStatus.COMPLETED)
    with pytest.raises(InvalidState):
        await command(bus, "saga", "pause", SagaRef(saga_id="fin"), SagaView, identity=OPERATOR)
    from bus.errors import AlreadyExists

    # A retried start of the same plan is answered with the saga as it stands; another plan is refused.
    again = await command(bus, "saga", "start", StartSaga(plan=chain_plan("fin", 1)), SagaView, identity=OPERATOR)
    assert again.saga_id == "fin" and again.status is SagaStatus.COMPLETED
    with pytest.raises(AlreadyExists):
        await command(bus, "saga", "start", StartSaga(plan=chain_plan("fin", 2)), SagaView, identity=OPERATOR)
