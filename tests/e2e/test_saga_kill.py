"""Crash the coordinator process (SIGKILL) at step boundaries and mid-step; every run ends the same.

A real nats-server, the TestParticipant in this process (its effects in sqlite), and
``python -m manager.saga.worker`` as a child process that the test kills whenever the
saga's event subject shows the chosen transition, then restarts. The fast tests kill
one saga many times in a row; the ``slow`` ones start a fresh saga per kill point.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from bus import codec, subjects
from bus.client import Identity, command
from bus.connection import Bus
from bus.errors import ErrorCode, NoResponders
from bus.server import EmbeddedNatsServer
from bus.subjects import Header
from manager.saga import RetryPolicy, SagaStatus, SagaView, fold
from manager.saga.service import ListSagas, SagaList, SagaRef, StartSaga
from manager.saga.testing import Behaviour, Script, TestParticipant, chain_plan, read_effects
from manager.store import JetStreamRecorder

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = Identity(actor="operator")
STEP_SLEEP_S = 0.25
WAIT_S = 20.0

pytestmark = pytest.mark.timeout(180)


class Worker:
    """``python -m manager.saga.worker`` as a child process."""

    def __init__(self, url: str, instance: str, log: Path, *, lease_ttl_s: float = 2.0, actor: str = "coord") -> None:
        self.url, self.instance, self.log, self.lease_ttl_s, self.actor = url, instance, log, lease_ttl_s, actor
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "manager.saga.worker",
                    "--server",
                    self.url,
                    "--instance",
                    self.instance,
                    "--lease-ttl",
                    str(self.lease_ttl_s),
                    "--actor",
                    self.actor,
                    "--log-level",
                    "debug",
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=out,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class EventWatcher:
    """Saga events as they are published on ``sf.evt.saga.<id>``: (short type, step id)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    async def open(self, saga_id: str) -> None:
        self.sub = await self.bus.nc.subscribe(subjects.event("saga", saga_id), cb=self._on)

    async def _on(self, msg: Msg) -> None:
        kind = (msg.headers or {}).get(Header.SCHEMA, "").rsplit(".", 1)[-1]
        step = codec.decode_mapping(msg.data).get("step_id")
        await self.queue.put((kind, step))

    async def wait_for(self, kind: str, step: str | None = None, timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while True:
                got = await self.queue.get()
                if got == (kind, step):
                    return

    async def settle(self) -> None:
        """Forget what the dead process published before it died."""
        await self.bus.nc.flush()
        await asyncio.sleep(0.05)
        while not self.queue.empty():
            self.queue.get_nowait()


@pytest.fixture
async def participant(bus: Bus, tmp_path: Path) -> AsyncIterator[TestParticipant]:
    script = Script(default=Behaviour(sleep_s=STEP_SLEEP_S))
    async with TestParticipant(bus, log_path=tmp_path / "effects.sqlite", script=script) as p:
        yield p


async def wait_for_service(bus: Bus, timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await command(bus, "saga", "list", ListSagas(), SagaList, identity=OPERATOR, timeout=1)
                return
            except NoResponders:
                await asyncio.sleep(0.05)


async def start(
    bus: Bus, saga_id: str, *, fail_at: str | None = None, n: int = 5, retry: RetryPolicy | None = None
) -> None:
    behaviours = {fail_at: Behaviour(fail_always=ErrorCode.VALIDATION)} if fail_at else None
    plan = chain_plan(saga_id, n, behaviours=behaviours, timeout_s=5.0, retry=retry)
    await command(bus, "saga", "start", StartSaga(plan=plan), SagaView, identity=OPERATOR)


async def show(bus: Bus, saga_id: str) -> SagaView:
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                return await command(bus, "saga", "show", SagaRef(saga_id=saga_id), SagaView, identity=OPERATOR)
            except NoResponders:  # the worker is still starting
                await asyncio.sleep(0.05)


async def wait_terminal(bus: Bus, saga_id: str, timeout: float = WAIT_S) -> None:
    """Wait until the recorded history ends the saga.

    Not by watching for the final event: the process killed last may have recorded it just
    before it died, and :meth:`EventWatcher.settle` dropped it.
    """
    recorder = JetStreamRecorder(bus)
    async with asyncio.timeout(timeout):
        while not fold(await recorder.read("saga", saga_id)).is_terminal:
            await asyncio.sleep(0.05)


async def assert_consistent_history(bus: Bus, saga_id: str) -> None:
    """Each step and compensation succeeded at most once in the recorded history."""
    events = await JetStreamRecorder(bus).read("saga", saga_id)
    done = [(e.event_type.rsplit(".", 1)[-1], e.data.get("step_id")) for e in events]
    finished = [d for d in done if d[0] in ("step_succeeded", "compensation_succeeded")]
    assert len(finished) == len(set(finished)), finished
    assert fold(events).is_terminal


def assert_completed_once(log: Path, view: SagaView, saga_id: str, n: int = 5) -> None:
    effects = read_effects(log)
    mine = [e for e in effects if e.key.startswith(f"{saga_id}:")]
    assert [(e.verb, e.name) for e in mine] == [("do", f"s{i}") for i in range(1, n + 1)]
    assert view.status is SagaStatus.COMPLETED
    # The recorded results are the participant's results for the one effect of each step.
    by_name = {e.name: e.result for e in mine}
    assert {s.step_id: s.result for s in view.steps} == by_name


def assert_compensated_once(log: Path, view: SagaView, saga_id: str, fail_at: int) -> None:
    effects = [e for e in read_effects(log) if e.key.startswith(f"{saga_id}:")]
    done = [f"s{i}" for i in range(1, fail_at)]
    expected = [("do", s) for s in done] + [("undo", s) for s in reversed(done)]
    assert [(e.verb, e.name) for e in effects] == expected
    assert view.status is SagaStatus.COMPENSATED
    assert view.failed_step == f"s{fail_at}"
    assert view.compensated == list(reversed(done))
    assert view.failed_compensations == []


def calls_for(participant: TestParticipant, saga_id: str) -> list[tuple[str, str, str]]:
    return [c for c in participant.log.calls() if c[2].startswith(f"{saga_id}:")]


async def kill_at(worker: Worker, watcher: EventWatcher, kind: str, step: str | None) -> None:
    """Kill the coordinator as soon as the event shows up, then restart it."""
    await watcher.wait_for(kind, step)
    worker.kill()
    await watcher.settle()
    worker.start()


async def kill_while_executing(worker: Worker, watcher: EventWatcher, participant: TestParticipant, key: str) -> None:
    """Kill the coordinator while the participant executes ``key`` (its effect lands after the death)."""
    async with asyncio.timeout(WAIT_S):
        while key not in participant.core.in_flight:
            await asyncio.sleep(0.005)
    worker.kill()
    await watcher.settle()
    worker.start()


# -- fast: one saga, killed again and again -------------------------------------------------------


async def test_killed_at_every_boundary_and_mid_step_completes_once(
    nats_server: EmbeddedNatsServer, bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    worker = Worker(nats_server.url, "c1", tmp_path / "worker.log")
    watcher = EventWatcher(bus)
    await watcher.open("k5")
    worker.start()
    try:
        await wait_for_service(bus)
        await start(bus, "k5")
        for i in range(1, 6):
            await kill_at(worker, watcher, "step_started", f"s{i}")  # recorded, request maybe not sent
            await kill_while_executing(worker, watcher, participant, f"k5:s{i}:action")  # mid-step
            await kill_at(worker, watcher, "step_succeeded", f"s{i}")  # boundary: before the next start
        await wait_terminal(bus, "k5")
        view = await show(bus, "k5")
    finally:
        code = worker.terminate()
    assert code == 0
    assert worker.starts == 16
    assert_completed_once(tmp_path / "effects.sqlite", view, "k5")
    calls = calls_for(participant, "k5")
    assert {key for _, _, key in calls} == {f"k5:s{i}:action" for i in range(1, 6)}  # the same key on re-runs
    assert len(calls) > 5  # interrupted steps were requested again...
    await assert_consistent_history(bus, "k5")  # ...and still succeeded once each


async def test_killed_during_compensation_ends_compensated_once(
    nats_server: EmbeddedNatsServer, bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    worker = Worker(nats_server.url, "c1", tmp_path / "worker.log")
    watcher = EventWatcher(bus)
    await watcher.open("f4")
    worker.start()
    try:
        await wait_for_service(bus)
        await start(bus, "f4", fail_at="s4")
        await kill_at(worker, watcher, "step_failed", "s4")
        for step in ("s3", "s2", "s1"):
            await kill_at(worker, watcher, "compensation_started", step)
            await kill_while_executing(worker, watcher, participant, f"f4:{step}:compensation")
            await kill_at(worker, watcher, "compensation_succeeded", step)
        await wait_terminal(bus, "f4")
        view = await show(bus, "f4")
    finally:
        assert worker.terminate() == 0
    assert_compensated_once(tmp_path / "effects.sqlite", view, "f4", fail_at=4)
    await assert_consistent_history(bus, "f4")


async def test_dead_coordinator_is_taken_over_by_another_after_its_lease_expires(
    nats_server: EmbeddedNatsServer, bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    first = Worker(nats_server.url, "a", tmp_path / "a.log", lease_ttl_s=1.0, actor="coord-a")
    second = Worker(nats_server.url, "b", tmp_path / "b.log", lease_ttl_s=1.0, actor="coord-b")
    watcher = EventWatcher(bus)
    await watcher.open("to1")
    first.start()
    try:
        await wait_for_service(bus)
        await start(bus, "to1", n=3)
        async with asyncio.timeout(WAIT_S):
            while "to1:s2:action" not in participant.core.in_flight:
                await asyncio.sleep(0.005)
        first.kill()  # mid-step; a different instance id must wait for the lease to expire
        second.start()
        await watcher.wait_for("completed")
        view = await show(bus, "to1")
    finally:
        assert second.terminate() == 0
    assert_completed_once(tmp_path / "effects.sqlite", view, "to1", n=3)
    events = await JetStreamRecorder(bus).read("saga", "to1")
    assert events[-1].actor == "coord-b"
    assert {e.actor for e in events[1:4]} == {"coord-a"}


async def test_sigterm_drains_and_releases_the_lease(
    nats_server: EmbeddedNatsServer, bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    # The next coordinator has a different id and a long TTL: only a released lease lets it in quickly.
    first = Worker(nats_server.url, "a", tmp_path / "a.log", lease_ttl_s=30.0)
    second = Worker(nats_server.url, "b", tmp_path / "b.log", lease_ttl_s=30.0)
    watcher = EventWatcher(bus)
    await watcher.open("t1")
    first.start()
    try:
        await wait_for_service(bus)
        await start(bus, "t1", n=3)
        await watcher.wait_for("step_started", "s2")
        assert first.terminate() == 0
        second.start()
        await watcher.wait_for("completed", timeout=10.0)
        view = await show(bus, "t1")
    finally:
        second.terminate()
    assert_completed_once(tmp_path / "effects.sqlite", view, "t1", n=3)


# -- slow: a fresh saga per kill point ---------------------------------------------------------------

FORWARD_POINTS = [
    (kind, f"s{i}") for i in range(1, 6) for kind in ("step_started", "executing:action", "step_succeeded")
]
COMPENSATION_POINTS = [
    ("step_started", "s4"),
    ("step_failed", "s4"),
    *[
        (kind, s)
        for s in ("s3", "s2", "s1")
        for kind in ("compensation_started", "executing:compensation", "compensation_succeeded")
    ],
]


@pytest.mark.slow
async def test_every_single_kill_point(
    nats_server: EmbeddedNatsServer, bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    worker = Worker(nats_server.url, "c1", tmp_path / "worker.log")
    worker.start()
    try:
        await wait_for_service(bus)
        cases = [("ok", None, p) for p in FORWARD_POINTS] + [("fail", "s4", p) for p in COMPENSATION_POINTS]
        for n, (kind_of_plan, fail_at, (kind, step)) in enumerate(cases):
            saga_id = f"{kind_of_plan}{n}"
            watcher = EventWatcher(bus)
            await watcher.open(saga_id)
            await start(bus, saga_id, fail_at=fail_at)
            if kind.startswith("executing:"):
                await kill_while_executing(worker, watcher, participant, f"{saga_id}:{step}:{kind.split(':')[1]}")
            else:
                await kill_at(worker, watcher, kind, step)
            await wait_terminal(bus, saga_id)
            view = await show(bus, saga_id)
            if fail_at:
                assert_compensated_once(tmp_path / "effects.sqlite", view, saga_id, fail_at=4)
            else:
                assert_completed_once(tmp_path / "effects.sqlite", view, saga_id)
            await assert_consistent_history(bus, saga_id)
            await watcher.sub.unsubscribe()
    finally:
        assert worker.terminate() == 0


@pytest.mark.slow
async def test_participant_process_killed_too(nats_server: EmbeddedNatsServer, bus: Bus, tmp_path: Path) -> None:
    """Both sides crash: the participant runs as ``python -m manager.saga.testing`` with its sqlite log."""
    log = tmp_path / "effects.sqlite"
    script = Script(default=Behaviour(sleep_s=STEP_SLEEP_S)).model_dump_json()
    argv = [sys.executable, "-m", "manager.saga.testing", "--server", nats_server.url, "--log", str(log)]

    def participant() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*argv, "--script", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    part = participant()
    worker = Worker(nats_server.url, "c1", tmp_path / "worker.log")
    watcher = EventWatcher(bus)
    await watcher.open("pk")
    worker.start()
    try:
        await wait_for_service(bus)
        # Participant processes take seconds to start here; the default 5 attempts (0.5+1+2+4 s of
        # backoff) were sometimes all spent before it answered, and the saga rightly compensated.
        await start(bus, "pk", retry=RetryPolicy(max_attempts=12, initial_backoff_s=0.5, max_backoff_s=2.0))
        await watcher.wait_for("step_started", "s2")
        part.send_signal(signal.SIGKILL)  # mid-step: its effect never happens, the coordinator retries
        part.wait()
        await watcher.wait_for("step_retrying", "s2")
        part = participant()
        await kill_at(worker, watcher, "step_started", "s4")
        await wait_terminal(bus, "pk")
        view = await show(bus, "pk")
    finally:
        worker.terminate()
        part.send_signal(signal.SIGTERM)
        part.wait(10)
    assert_completed_once(log, view, "pk")
