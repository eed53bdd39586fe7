"""The saga coordinator: drives sagas from their events, one recorded transition at a time.

How a saga moves (every arrow is an event appended with ``expected`` = the last
position this coordinator knows, see :mod:`manager.saga.events`)::

    created -> (step_started -> step_retrying* -> step_succeeded | step_failed)* -> completed
                                  step_failed / cancel_requested -> compensating
    compensating -> (compensation_started -> compensation_retrying* -> compensation_succeeded | _failed)*
                 -> compensated {failed_compensations}
    paused / resumed may come in between; failed is for sagas the coordinator cannot drive at all.

Recovery. A restarted coordinator folds the events and continues:

* a step with ``step_succeeded`` never runs again;
* a step with ``step_started`` and no outcome (we died mid-step) runs again with the
  *same* idempotency key and the same attempt number, so a participant that dedupes
  performs its effect once;
* the same holds for compensations, which run one at a time in reverse completion
  order, each shielded from cancellation; a failing one (after its retries) is
  recorded and the next one still runs.

Which steps are compensated is decided by :attr:`StepState.may_have_effect`: succeeded
steps, started-without-result steps and steps with an attempt of unknown outcome.

Ownership. A coordinator drives a saga only while it holds the saga's lease
(:mod:`manager.saga.leases`); ``pause``/``resume``/``cancel`` are plain appends any
coordinator can make, and the running one notices them (a poke from the event
subject, or a concurrency conflict on its next append). Any other foreign event means
another coordinator took over: :class:`LeaseLost`, and this run stops.

Concurrency is structured: a saga's steps run in a ``TaskGroup`` owned by its run, runs
in the ``TaskGroup`` of :meth:`SagaCoordinator.serve` (or of :meth:`resume_all`).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import codec, subjects
from bus.client import Identity
from bus.connection import Bus
from bus.errors import BusTimeout, BusUnavailable, ConcurrencyConflict, SkyferryError
from bus.subjects import ContentType, Header
from manager.saga.aio import run_shielded, sleep_unless
from manager.saga.clock import Clock, SystemClock
from manager.saga.errors import LeaseHeld, LeaseLost, SagaExists, SagaHistoryError, SagaNotFound, SagaStateError
from manager.saga.events import (
    AGGREGATE,
    CONTROL_TYPES,
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
    SagaProgress,
    SagaResumed,
    StepError,
    StepFailed,
    StepRetrying,
    StepStarted,
    StepSucceeded,
)
from manager.saga.leases import DEFAULT_LEASE_TTL_S, KvLeases, Lease, LeaseManager, MemoryLeases
from manager.saga.plan import ActionRef, RetryPolicy, SagaPlan
from manager.saga.state import CompensationStatus, SagaState, SagaStatus, StepStatus, fold
from manager.saga.transport import BusTransport, StepTransport, classify
from manager.store.recorder import EventRecorder, NewEvent, StoredEvent

log = structlog.get_logger(__name__)

_MAX_CONFLICTS = 20
_FULL_SCAN_S = 60.0
"""How often the periodic scan re-reads saga events even without seeing saga activity."""


def default_instance_id() -> str:
    """``<host>-<pid>-<random>``, subject-token-safe and unique per process."""
    raw = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[-64:]


@dataclass(eq=False)
class _Run:
    """This coordinator's live drive of one saga."""

    state: SagaState
    lease: Lease
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when no new step attempt may start (paused, cancelled, a step failed)."""
    inflight: set[str] = field(default_factory=set)
    poked: bool = False

    def poke(self) -> None:
        """Someone else appended to the saga: re-read it at the next occasion."""
        self.poked = True
        self.changed.set()


@dataclass
class _Index:
    """Every saga folded from ``read_all``, kept up to date incrementally (the list / scan read model)."""

    states: dict[str, SagaState] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    """Sagas whose history does not fold; never resumed automatically."""
    position: int = 0
    dirty: bool = True
    forced_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SagaCoordinator:
    """Starts, drives, pauses, resumes and cancels sagas; see the module docstring for the rules.

    Args:
        bus: the bus, for step requests, leases, progress and control notifications. ``None`` in
            unit tests, which then pass ``transport`` (and get in-memory leases).
        recorder: where saga events live.
        identity: the coordinator's actor id (and seed to sign step requests).
        clock: time source for event timestamps and retry backoff.
        transport: how step actions are sent; default :class:`BusTransport`.
        leases: default :class:`KvLeases` on the bus, :class:`MemoryLeases` without one.
        instance_id: this coordinator's lease holder id; must be unique among live coordinators.
        scan_interval_s: how often :meth:`serve` looks for unfinished sagas nobody drives.
        max_sagas: sagas driven at once by :meth:`serve` / :meth:`resume_all`.
    """

    def __init__(
        self,
        bus: Bus | None,
        recorder: EventRecorder,
        identity: Identity,
        *,
        clock: Clock | None = None,
        transport: StepTransport | None = None,
        leases: LeaseManager | None = None,
        instance_id: str | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        scan_interval_s: float | None = None,
        max_sagas: int = 64,
        append_retries: int = 5,
    ) -> None:
        if transport is None:
            if bus is None:
                raise ValueError("a coordinator without a bus needs a transport")
            transport = BusTransport(bus, identity)
        if leases is None:
            leases = KvLeases(bus, ttl_s=lease_ttl_s) if bus is not None else MemoryLeases(lease_ttl_s)
        self.bus = bus
        self.recorder = recorder
        self.identity = identity
        self.instance_id = subjects.token(instance_id or default_instance_id())
        self._clock: Clock = clock or SystemClock()
        self._transport = transport
        self._leases = leases
        self._scan_interval_s = scan_interval_s if scan_interval_s is not None else leases.ttl_s
        self._slots = asyncio.Semaphore(max_sagas)
        self._append_retries = append_retries
        self._runs: dict[str, _Run] = {}
        self._claimed: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rerun: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._index = _Index()
        self._log = log.bind(instance=self.instance_id)

    # -- commands ------------------------------------------------------------------------------

    async def start_saga(self, plan: SagaPlan, *, actor: str | None = None) -> SagaState:
        """Record ``saga.created`` (it does not run the saga: see :meth:`run` / :meth:`submit`).

        Starting the same plan again (an operator's retry after a lost reply or a crash) returns
        the saga as it stands: the first start took effect, and its record is ``saga.created``.

        Raises:
            SagaExists: a saga with that id was already created with a different plan.
        """
        event = SagaCreated(at=self._clock.now(), plan=plan)
        try:
            stored = await self._write(plan.saga_id, event, expected=0, actor=actor)
        except ConcurrencyConflict as exc:
            existing = await self.get(plan.saga_id)
            if existing.plan == plan:
                self._log.info("saga_start_replayed", saga_id=plan.saga_id, status=existing.status.value)
                return existing
            raise SagaExists(
                f"saga {plan.saga_id} already exists with another plan", details={"saga_id": plan.saga_id}
            ) from exc
        state = SagaState(saga_id=plan.saga_id).apply(stored)
        self._index.dirty = True
        await self._publish_progress(state, event)
        self._log.info("saga_created", saga_id=plan.saga_id, name=plan.name, steps=len(plan.steps), actor=actor)
        return state

    async def get(self, saga_id: str) -> SagaState:
        """The saga folded from its events.

        Raises:
            SagaNotFound: no events for that id.
        """
        try:
            events = await self.recorder.read(AGGREGATE, subjects.token(saga_id))
        except ValueError:  # not a subject token: no saga can have that id
            events = []
        if not events:
            raise SagaNotFound(f"no saga {saga_id}", details={"saga_id": saga_id})
        return fold(events, saga_id)

    async def list_sagas(self) -> list[SagaState]:
        """Every known saga, oldest first, from an in-memory read model of the saga events.

        The model is re-read when a saga event was seen on the bus (while :meth:`serve` runs) or
        written here; without ``serve`` other coordinators' changes show up only after that.
        """
        await self._refresh_index(force=self.bus is None, wait=False)
        return sorted(self._index.states.values(), key=lambda s: (s.created_at is None, s.created_at, s.saga_id))

    async def pause(self, saga_id: str, *, reason: str = "", actor: str | None = None) -> SagaState:
        """Stop starting new steps/compensations; attempts in flight finish. No-op if already paused.

        Raises:
            SagaNotFound, SagaStateError: unknown or finished saga.
        """

        def decide(st: SagaState) -> SagaEvent | None:
            _refuse_if_terminal(st, "pause")
            return None if st.paused else SagaPaused(at=self._clock.now(), reason=reason)

        return await self._control(saga_id, decide, actor)

    async def resume(self, saga_id: str, *, reason: str = "", actor: str | None = None) -> SagaState:
        """Lift a pause and (when serving) run the saga again. No-op if not paused.

        Raises:
            SagaNotFound, SagaStateError: unknown or finished saga.
        """

        def decide(st: SagaState) -> SagaEvent | None:
            _refuse_if_terminal(st, "resume")
            return SagaResumed(at=self._clock.now(), reason=reason) if st.paused else None

        state = await self._control(saga_id, decide, actor)
        self.submit(saga_id)
        return state

    async def cancel(self, saga_id: str, *, reason: str = "", actor: str | None = None) -> SagaState:
        """Stop starting steps, then compensate what took effect, in reverse. No-op if already compensating.

        Raises:
            SagaNotFound, SagaStateError: unknown or finished saga.
        """

        def decide(st: SagaState) -> SagaEvent | None:
            _refuse_if_terminal(st, "cancel")
            if st.phase is SagaStatus.COMPENSATING:
                return None
            return SagaCancelRequested(at=self._clock.now(), reason=reason)

        state = await self._control(saga_id, decide, actor)
        self.submit(saga_id)
        return state

    async def _control(
        self, saga_id: str, decide: Callable[[SagaState], SagaEvent | None], actor: str | None
    ) -> SagaState:
        for _ in range(_MAX_CONFLICTS):
            state = await self.get(saga_id)
            event = decide(state)
            if event is None:
                return state
            try:
                stored = await self._write(saga_id, event, expected=state.position, actor=actor)
            except ConcurrencyConflict:
                continue  # the saga moved on meanwhile: decide again on the fresh state
            state.apply(stored)
            self._index.dirty = True
            await self._publish_progress(state, event)
            run = self._runs.get(saga_id)
            if run is not None:
                run.poke()
            self._log.info("saga_" + event.short_name(), saga_id=saga_id, actor=actor)
            return state
        raise ConcurrencyConflict(f"saga {saga_id} keeps changing; try again", details={"saga_id": saga_id})

    # -- driving one saga ----------------------------------------------------------------------

    async def run(self, saga_id: str) -> SagaState:
        """Drive a saga until it is finished or paused, holding its lease meanwhile.

        Raises:
            SagaNotFound: unknown saga.
            LeaseHeld: another coordinator (or another run here) drives it.
            LeaseLost: it was taken over while running.
        """
        if saga_id in self._claimed:
            raise LeaseHeld(f"saga {saga_id} already runs here", details={"saga_id": saga_id})
        self._claimed.add(saga_id)  # before any await: two local runs of one saga must not race
        try:
            state = await self.get(saga_id)
            if state.is_terminal or state.paused:
                return state
            lease = await self._leases.acquire(saga_id, self.instance_id)
            run = _Run(state=state, lease=lease)
            self._runs[saga_id] = run
            try:
                run.state = await self.get(saga_id)  # it may have moved while we waited for the lease
                self._log.info("saga_run", saga_id=saga_id, status=str(run.state.status), position=run.state.position)
                async with asyncio.TaskGroup() as tg:
                    keeper = tg.create_task(self._keep_lease(run), name=f"saga-lease:{saga_id}")
                    driver = tg.create_task(self._drive(run), name=f"saga:{saga_id}")
                    driver.add_done_callback(lambda _t: keeper.cancel())
            except BaseExceptionGroup as group:
                raise _unwrap(group) from None
            finally:
                del self._runs[saga_id]
                await self._leases.release(run.lease)
        finally:
            self._claimed.discard(saga_id)
        self._log.info("saga_run_ended", saga_id=saga_id, status=str(run.state.status), position=run.state.position)
        return run.state

    async def _keep_lease(self, run: _Run) -> None:
        ttl = self._leases.ttl_s
        deadline = time.monotonic() + ttl
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                run.lease = await self._leases.renew(run.lease)
                deadline = time.monotonic() + ttl
            except (BusTimeout, BusUnavailable) as exc:
                if time.monotonic() + ttl / 3 >= deadline:
                    raise LeaseLost(f"cannot renew the lease of saga {run.state.saga_id}") from exc
                self._log.warning("saga_lease_renew_failed", saga_id=run.state.saga_id, error=str(exc))

    async def _drive(self, run: _Run) -> None:
        while True:
            await self._sync_if_poked(run)
            st = run.state
            if st.is_terminal or st.paused:
                return
            st.require_plan()
            if st.phase is SagaStatus.COMPENSATING:
                await self._compensate(run)
            else:
                await self._forward(run)

    async def _forward(self, run: _Run) -> None:
        """Start ready steps within the concurrency limits until done, paused, cancelled or failed."""
        run.stop.clear()
        async with asyncio.TaskGroup() as tg:
            while True:
                run.changed.clear()
                await self._sync_if_poked(run)
                st = run.state
                if not st.forward_allowed:
                    run.stop.set()
                    break  # the TaskGroup waits for the attempts in flight
                for step_id in self._schedulable(run):
                    run.inflight.add(step_id)
                    tg.create_task(self._run_step(run, step_id), name=f"saga:{st.saga_id}:{step_id}")
                if not run.inflight:
                    if st.all_succeeded():
                        await self._append(run, SagaCompleted(at=self._clock.now()), when=_forward_allowed)
                    else:
                        reason = "no step can run although the saga is not finished"
                        await self._append(run, SagaFailed(at=self._clock.now(), reason=reason), when=_forward_allowed)
                    continue
                await run.changed.wait()

    def _schedulable(self, run: _Run) -> list[str]:
        plan = run.state.require_plan()
        total = len(run.inflight)
        per_group = Counter(plan.step(s).group for s in run.inflight)
        out: list[str] = []
        for step_id in run.state.steps_to_run():
            if total >= plan.max_parallel:
                break
            group = plan.step(step_id).group
            if step_id in run.inflight or (group is not None and per_group[group] >= plan.group_limit(group)):
                continue
            out.append(step_id)
            total += 1
            per_group[group] += 1
        return out

    async def _run_step(self, run: _Run, step_id: str) -> None:
        try:
            await self._step_attempts(run, step_id)
        finally:
            run.inflight.discard(step_id)
            run.changed.set()

    async def _step_attempts(self, run: _Run, step_id: str) -> None:
        spec = run.state.require_plan().step(step_id)
        st = run.state.steps[step_id]
        # An interrupted attempt (started, no outcome) is repeated under the same number and key.
        attempt = st.attempts if st.status is StepStatus.RUNNING and st.attempts else st.attempts + 1
        policy = spec.retry
        while True:
            started = StepStarted(
                at=self._clock.now(), step_id=step_id, attempt=attempt, idempotency_key=spec.action_key
            )
            if not await self._append(run, started, when=_forward_allowed):
                return
            outcome = await self._attempt(run, spec.action, spec.action_key, spec.timeout_s, policy)
            now = self._clock.now()
            if not isinstance(outcome, StepError):
                await self._append(run, StepSucceeded(at=now, step_id=step_id, attempt=attempt, result=outcome))
                return
            if not outcome.retryable or attempt >= policy.max_attempts:
                await self._append(run, StepFailed(at=now, step_id=step_id, attempt=attempt, error=outcome))
                return
            delay = policy.delay(attempt)
            retrying = StepRetrying(at=now, step_id=step_id, attempt=attempt, error=outcome, delay_s=delay)
            await self._append(run, retrying)
            if await sleep_unless(self._clock, delay, run.stop):
                return  # paused or cancelled: the step stays "retrying"
            attempt += 1

    async def _attempt(
        self, run: _Run, action: ActionRef, key: str, timeout: float, policy: RetryPolicy
    ) -> dict[str, Any] | StepError:
        saga_id = run.state.saga_id
        try:
            # The transport has its own timeout; this one is the backstop for one that hangs.
            async with asyncio.timeout(timeout + 1.0):
                return await self._transport.request(
                    action.subject, action.payload, idempotency_key=key, timeout=timeout, correlation_id=saga_id
                )
        except Exception as exc:
            error = classify(exc, policy)
            self._log.info(
                "saga_attempt_failed",
                saga_id=saga_id,
                key=key,
                code=error.code,
                retryable=error.retryable,
                error=error.message,
            )
            return error

    # -- compensation --------------------------------------------------------------------------

    async def _compensate(self, run: _Run) -> None:
        """Run the due compensations one by one, in reverse completion order, then record the outcome."""
        while True:
            await self._sync_if_poked(run)
            st = run.state
            if st.paused or st.phase is not SagaStatus.COMPENSATING:
                return
            remaining = st.compensations_remaining()
            if not remaining:
                done = SagaCompensated(
                    at=self._clock.now(),
                    cause=st.compensation_cause or "",
                    compensated=list(st.compensated),
                    failed_compensations=list(st.failed_compensations),
                    uncompensated=st.uncompensable(),
                )
                await self._append(run, done, when=_compensating)
                return
            await run_shielded(self._compensate_step(run, remaining[0]))

    async def _compensate_step(self, run: _Run, step_id: str) -> None:
        spec = run.state.require_plan().step(step_id)
        action = spec.compensation
        if action is None:  # compensations_remaining() never yields such a step
            return
        st = run.state.steps[step_id]
        running = st.compensation_status is CompensationStatus.RUNNING and st.compensation_attempts
        attempt = st.compensation_attempts if running else st.compensation_attempts + 1
        policy, key = spec.compensation_policy, spec.compensation_key
        while True:
            await self._append(
                run, CompensationStarted(at=self._clock.now(), step_id=step_id, attempt=attempt, idempotency_key=key)
            )
            outcome = await self._attempt(run, action, key, spec.timeout_s, policy)
            now = self._clock.now()
            if not isinstance(outcome, StepError):
                await self._append(run, CompensationSucceeded(at=now, step_id=step_id, attempt=attempt, result=outcome))
                return
            if not outcome.retryable or attempt >= policy.max_attempts:
                await self._append(run, CompensationFailed(at=now, step_id=step_id, attempt=attempt, error=outcome))
                self._log.error("saga_compensation_failed", saga_id=run.state.saga_id, step_id=step_id)
                return
            delay = policy.delay(attempt)
            await self._append(
                run, CompensationRetrying(at=now, step_id=step_id, attempt=attempt, error=outcome, delay_s=delay)
            )
            await self._clock.sleep(delay)
            attempt += 1

    # -- recording -----------------------------------------------------------------------------

    async def _write(self, saga_id: str, event: SagaEvent, *, expected: int, actor: str | None = None) -> StoredEvent:
        """Append one event, retrying transport failures with the same message id (deduped)."""
        data = event.model_dump(mode="json")
        new = NewEvent(event.TYPE, data, actor=actor or self.identity.actor, correlation_id=saga_id)
        delay = 0.05
        for attempt in range(1, self._append_retries + 1):
            try:
                position = await self.recorder.append(AGGREGATE, saga_id, new, expected=expected)
                break
            except (BusTimeout, BusUnavailable) as exc:
                if attempt == self._append_retries:
                    raise
                self._log.warning("saga_append_retry", saga_id=saga_id, error=str(exc), attempt=attempt)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        return StoredEvent(
            position=position,
            aggregate_type=AGGREGATE,
            aggregate_id=saga_id,
            event_type=event.TYPE,
            data=data,
            timestamp=event.at,
            actor=new.actor,
            msg_id=new.msg_id,
            correlation_id=saga_id,
        )

    async def _append(self, run: _Run, event: SagaEvent, *, when: Callable[[SagaState], bool] | None = None) -> bool:
        """Append with ``expected`` = our last position; False if ``when`` no longer holds.

        A conflict means someone appended meanwhile: control events are folded in and the
        append is reconsidered; anything else means we lost the saga (:class:`LeaseLost`).
        """
        saga_id = run.state.saga_id
        async with run.lock:
            for _ in range(_MAX_CONFLICTS):
                if when is not None and not when(run.state):
                    return False
                try:
                    stored = await self._write(saga_id, event, expected=run.state.position)
                except ConcurrencyConflict:
                    await self._sync_locked(run)
                    continue
                self._applied(run, stored)
                await self._publish_progress(run.state, event)
                self._log.debug("saga_recorded", saga_id=saga_id, type=event.short_name(), position=stored.position)
                return True
        raise LeaseLost(f"saga {saga_id}: appends keep conflicting", details={"saga_id": saga_id})

    def _applied(self, run: _Run, stored: StoredEvent) -> None:
        run.state.apply(stored)
        if run.state.forward_allowed:  # e.g. paused and resumed before the run noticed the pause
            run.stop.clear()
        else:
            run.stop.set()
        run.changed.set()

    async def _sync_if_poked(self, run: _Run) -> None:
        if run.poked:
            run.poked = False
            async with run.lock:
                await self._sync_locked(run)

    async def _sync_locked(self, run: _Run) -> None:
        saga_id = run.state.saga_id
        for ev in await self.recorder.read(AGGREGATE, saga_id):
            if ev.position <= run.state.position:
                continue
            if ev.event_type not in CONTROL_TYPES:
                raise LeaseLost(
                    f"saga {saga_id} was written by someone else ({ev.event_type} at {ev.position})",
                    details={"saga_id": saga_id, "position": ev.position, "actor": ev.actor},
                )
            self._applied(run, ev)

    async def _publish_progress(self, state: SagaState, event: SagaEvent) -> None:
        if self.bus is None:
            return
        progress = SagaProgress(
            saga_id=state.saga_id,
            position=state.position,
            event=event.short_name(),
            status=state.status.value,
            step_id=getattr(event, "step_id", None),
            attempt=getattr(event, "attempt", None),
            steps_total=len(state.steps),
            steps_succeeded=sum(1 for s in state.steps.values() if s.status is StepStatus.SUCCEEDED),
            at=event.at,
        )
        headers = {
            Header.SCHEMA.value: SagaProgress.__schema_name__,
            Header.CONTENT_TYPE.value: ContentType.MSGPACK.value,
            Header.CORRELATION_ID.value: state.saga_id,
        }
        try:
            await self.bus.nc.publish(subjects.progress(state.saga_id), codec.encode(progress), headers=headers)
        except Exception as exc:  # progress is best effort; the events are the record
            self._log.debug("saga_progress_not_published", saga_id=state.saga_id, error=repr(exc))

    # -- many sagas ----------------------------------------------------------------------------

    async def find_unfinished(self, *, force: bool = True) -> list[str]:
        """Ids of sagas that are neither finished nor paused, from a scan of all saga events."""
        await self._refresh_index(force=force)
        return sorted(
            sid
            for sid, st in self._index.states.items()
            if st.plan is not None and not st.is_terminal and not st.paused and sid not in self._index.broken
        )

    async def resume_all(self) -> dict[str, SagaState]:
        """Continue every unfinished saga nobody else drives; wait for them; return their end states.

        Sagas whose lease another coordinator holds are skipped (it drives them).
        """
        results: dict[str, SagaState] = {}
        ids = await self.find_unfinished()
        self._log.info("saga_resume_all", count=len(ids))
        async with asyncio.TaskGroup() as tg:
            for saga_id in ids:
                tg.create_task(self._run_logged(saga_id, results), name=f"saga-resume:{saga_id}")
        return results

    async def serve(self) -> None:
        """Drive sagas until cancelled.

        Resumes unfinished sagas at once and then every ``scan_interval_s`` (taking over those
        whose coordinator died, once their lease expires), runs sagas handed over with
        :meth:`submit`, and listens to saga events so that pause/cancel written by another
        coordinator reach the run here at once. Cancelling ``serve`` cancels the runs; a
        compensation in flight completes first.
        """
        if self._tg is not None:
            raise RuntimeError("this coordinator is already serving")
        sub: Subscription | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.bus is not None:
                    sub = await self.bus.nc.subscribe(subjects.events_of(AGGREGATE), cb=self._on_event)
                self._log.info("saga_coordinator_serving", scan_interval_s=self._scan_interval_s)
                await self._scan_loop()
        finally:
            self._tg = None
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # the connection may be closing
                    self._log.debug("saga_unsubscribe_failed", error=repr(exc))

    def submit(self, saga_id: str) -> bool:
        """Have :meth:`serve` drive the saga (again); False if this coordinator is not serving."""
        if self._tg is None:
            return False
        task = self._tasks.get(saga_id)
        if task is not None and not task.done():
            # A run may be about to end (e.g. it just saw a pause): make it look again afterwards.
            self._rerun.add(saga_id)
            run = self._runs.get(saga_id)
            if run is not None:
                run.poke()
            return True
        task = self._tg.create_task(self._run_logged(saga_id), name=f"saga-run:{saga_id}")
        self._tasks[saga_id] = task
        task.add_done_callback(lambda t: self._tasks.pop(saga_id) if self._tasks.get(saga_id) is t else None)
        return True

    @property
    def running(self) -> list[str]:
        """Ids of the sagas this coordinator drives right now."""
        return sorted(self._runs)

    async def _scan_loop(self) -> None:
        while True:
            try:
                stale = time.monotonic() - self._index.forced_at > _FULL_SCAN_S
                for saga_id in await self.find_unfinished(force=stale):
                    if saga_id not in self._runs:
                        self.submit(saga_id)
            except Exception as exc:  # the bus may be away for a while: keep scanning
                self._log.warning("saga_scan_failed", error=repr(exc))
            await asyncio.sleep(self._scan_interval_s)

    async def _run_logged(self, saga_id: str, results: dict[str, SagaState] | None = None) -> None:
        async with self._slots:
            while True:
                self._rerun.discard(saga_id)
                try:
                    state = await self.run(saga_id)
                    if results is not None:
                        results[saga_id] = state
                except LeaseHeld as exc:
                    self._log.debug("saga_lease_held", saga_id=saga_id, holder=exc.details.get("holder"))
                    return
                except LeaseLost as exc:
                    self._log.warning("saga_lease_lost", saga_id=saga_id, error=str(exc))
                    return
                except SkyferryError as exc:
                    self._log.error("saga_run_failed", saga_id=saga_id, error=str(exc))
                    return
                except Exception:
                    self._log.exception("saga_run_crashed", saga_id=saga_id)
                    return
                if saga_id not in self._rerun:
                    return

    async def _on_event(self, msg: Msg) -> None:
        self._index.dirty = True
        if (msg.headers or {}).get(Header.SCHEMA) not in CONTROL_TYPES:
            return
        try:
            _, saga_id = subjects.parse_event_subject(msg.subject)
        except ValueError:
            return
        run = self._runs.get(saga_id)
        if run is not None:
            run.poke()

    async def _refresh_index(self, *, force: bool, wait: bool = True) -> None:
        """Fold the saga events recorded since the last refresh into the index.

        Without ``force`` it reads only when the event subject showed saga activity: a filtered
        read of a stream without new saga events waits for the recorder's fetch timeout. With
        ``wait=False`` a refresh already under way is not waited for (the index is used as is).
        """
        idx = self._index
        if not (force or idx.dirty) or (not wait and idx.lock.locked()):
            return
        async with idx.lock:
            idx.dirty = False
            try:
                await self._read_into_index(idx)
            except BaseException:
                idx.dirty = True
                raise
            if force:
                idx.forced_at = time.monotonic()

    async def _read_into_index(self, idx: _Index) -> None:
        async for ev in self.recorder.read_all(after=idx.position, aggregate_type=AGGREGATE):
            idx.position = ev.position
            if ev.aggregate_id in idx.broken:
                continue
            state = idx.states.get(ev.aggregate_id)
            if state is None:
                state = idx.states[ev.aggregate_id] = SagaState(saga_id=ev.aggregate_id)
            try:
                state.apply(ev)
            except SagaHistoryError as exc:
                idx.broken.add(ev.aggregate_id)
                self._log.error("saga_history_unreadable", saga_id=ev.aggregate_id, error=str(exc))


def _forward_allowed(state: SagaState) -> bool:
    return state.forward_allowed


def _compensating(state: SagaState) -> bool:
    return state.phase is SagaStatus.COMPENSATING and not state.paused


def _refuse_if_terminal(state: SagaState, verb: str) -> None:
    if state.is_terminal:
        raise SagaStateError(
            f"cannot {verb} saga {state.saga_id}: it is {state.status}",
            details={"saga_id": state.saga_id, "status": state.status.value},
        )


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error inside (nested) task-group exception groups."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, SkyferryError):
            return exc
    return leaves[0] if leaves else group
