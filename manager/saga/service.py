"""The ``saga`` bus service: start, list, show, pause, resume, cancel.

Commands (``sf.cmd.saga.<verb>``)::

    start   StartSaga {plan}                 -> SagaView     records saga.created, then runs it here
    list    ListSagas {status?, limit}       -> SagaList     summaries, oldest first
    show    SagaRef {saga_id}                -> SagaView     state folded from the saga's events
    pause   SagaRef {saga_id, reason}        -> SagaView
    resume  SagaRef {saga_id, reason}        -> SagaView
    cancel  SagaRef {saga_id, reason}        -> SagaView

Errors: ``validation`` (bad plan), ``already_exists``, ``not_found``, ``invalid_state``
(e.g. pausing a finished saga), ``conflict`` (retry).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from bus.connection import Bus
from bus.service import Authenticator, BusService, CommandContext
from manager.saga.coordinator import SagaCoordinator
from manager.saga.events import StepError
from manager.saga.plan import TOKEN_PATTERN, SagaPlan
from manager.saga.state import CompensationStatus, SagaState, SagaStatus, StepStatus

SERVICE_NAME = "saga"
SERVICE_VERSION = "0.1.0"


class StartSaga(BaseModel):
    """``start``: the plan of the saga to create and run."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.start_request"
    plan: SagaPlan


class SagaRef(BaseModel):
    """``show``/``pause``/``resume``/``cancel``: which saga, and why (recorded in the event)."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.ref"
    saga_id: str = Field(pattern=TOKEN_PATTERN)
    reason: str = Field(default="", max_length=500)


class ListSagas(BaseModel):
    """``list``: an optional status filter and a limit."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.list_request"
    status: SagaStatus | None = None
    limit: int = Field(default=1000, ge=1, le=100_000)


class StepView(BaseModel):
    """One step of a :class:`SagaView`."""

    step_id: str
    status: StepStatus
    attempts: int
    group: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    result: dict[str, Any] | None = None
    error: StepError | None = None
    in_doubt: bool = False
    compensation_status: CompensationStatus | None = None
    compensation_error: StepError | None = None


class SagaView(BaseModel):
    """A saga as the service shows it."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.view"
    saga_id: str
    name: str
    status: SagaStatus
    position: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    steps: list[StepView] = Field(default_factory=list)
    next_steps: list[str] = Field(default_factory=list)
    compensations_remaining: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    failed_step: str | None = None
    compensation_cause: str | None = None
    compensated: list[str] = Field(default_factory=list)
    failed_compensations: list[str] = Field(default_factory=list)
    uncompensated: list[str] = Field(default_factory=list)
    failure_reason: str | None = None

    @classmethod
    def from_state(cls, state: SagaState) -> SagaView:
        """The view of a folded saga."""
        plan = state.require_plan()
        steps = []
        for spec in plan.steps:
            st = state.steps[spec.step_id]
            steps.append(
                StepView(
                    step_id=spec.step_id,
                    status=st.status,
                    attempts=st.attempts,
                    group=spec.group,
                    depends_on=spec.depends_on,
                    result=st.result,
                    error=st.error,
                    in_doubt=st.in_doubt,
                    compensation_status=st.compensation_status,
                    compensation_error=st.compensation_error,
                )
            )
        compensating = state.phase is SagaStatus.COMPENSATING
        return cls(
            saga_id=state.saga_id,
            name=plan.name,
            status=state.status,
            position=state.position,
            created_at=state.created_at,
            updated_at=state.updated_at,
            steps=steps,
            next_steps=state.steps_to_run(),
            compensations_remaining=state.compensations_remaining() if compensating else [],
            cancel_requested=state.cancel_requested,
            failed_step=state.failed_step,
            compensation_cause=state.compensation_cause,
            compensated=state.compensated,
            failed_compensations=state.failed_compensations,
            uncompensated=state.uncompensated,
            failure_reason=state.failure_reason,
        )


class SagaSummary(BaseModel):
    """One line of ``list``."""

    saga_id: str
    name: str
    status: SagaStatus
    steps_total: int
    steps_succeeded: int
    position: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @classmethod
    def from_state(cls, state: SagaState) -> SagaSummary:
        """The summary of a folded saga."""
        return cls(
            saga_id=state.saga_id,
            name=state.plan.name if state.plan else "",
            status=state.status,
            steps_total=len(state.steps),
            steps_succeeded=sum(1 for s in state.steps.values() if s.status is StepStatus.SUCCEEDED),
            position=state.position,
            created_at=state.created_at,
            updated_at=state.updated_at,
        )


class SagaList(BaseModel):
    """``list`` reply."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.list"
    sagas: list[SagaSummary]


class SagaService:
    """The coordinator's command surface on the bus (service name ``saga``)."""

    def __init__(
        self,
        bus: Bus,
        coordinator: SagaCoordinator,
        *,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.service = BusService(
            bus,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="Saga coordinator: multi-step jobs with compensation.",
            authenticator=authenticator,
            instance_metadata={"instance": coordinator.instance_id},
        )
        cmd = self.service.command
        cmd("start", StartSaga, SagaView, description="Create a saga from a plan and run it.")(self._start)
        cmd("list", ListSagas, SagaList, description="List sagas.")(self._list)
        cmd("show", SagaRef, SagaView, description="Show one saga, folded from its events.")(self._show)
        cmd("pause", SagaRef, SagaView, description="Stop starting steps; in-flight attempts finish.")(self._pause)
        cmd("resume", SagaRef, SagaView, description="Lift a pause.")(self._resume)
        cmd("cancel", SagaRef, SagaView, description="Stop and compensate in reverse.")(self._cancel)

    async def start(self) -> None:
        """Register the service's endpoints on the bus."""
        await self.service.start()

    async def stop(self) -> None:
        """Unregister the endpoints."""
        await self.service.stop()

    async def __aenter__(self) -> SagaService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    def _actor(ctx: CommandContext) -> str | None:
        return ctx.envelope.actor

    async def _start(self, ctx: CommandContext, req: StartSaga) -> SagaView:
        state = await self.coordinator.start_saga(req.plan, actor=self._actor(ctx))
        if not self.coordinator.submit(req.plan.saga_id):
            ctx.log.warning("saga_not_running", saga_id=req.plan.saga_id, reason="coordinator is not serving")
        return SagaView.from_state(state)

    async def _list(self, ctx: CommandContext, req: ListSagas) -> SagaList:
        states = await self.coordinator.list_sagas()
        summaries = [SagaSummary.from_state(s) for s in states if s.plan is not None]
        if req.status is not None:
            summaries = [s for s in summaries if s.status is req.status]
        return SagaList(sagas=summaries[: req.limit])

    async def _show(self, ctx: CommandContext, req: SagaRef) -> SagaView:
        return SagaView.from_state(await self.coordinator.get(req.saga_id))

    async def _pause(self, ctx: CommandContext, req: SagaRef) -> SagaView:
        state = await self.coordinator.pause(req.saga_id, reason=req.reason, actor=self._actor(ctx))
        return SagaView.from_state(state)

    async def _resume(self, ctx: CommandContext, req: SagaRef) -> SagaView:
        state = await self.coordinator.resume(req.saga_id, reason=req.reason, actor=self._actor(ctx))
        return SagaView.from_state(state)

    async def _cancel(self, ctx: CommandContext, req: SagaRef) -> SagaView:
        state = await self.coordinator.cancel(req.saga_id, reason=req.reason, actor=self._actor(ctx))
        return SagaView.from_state(state)
