"""The coordinator on the real bus: JetStream recorder, KV leases, TestParticipant, progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus import codec, subjects
from bus.client import Identity
from bus.connection import Bus
from bus.errors import ErrorCode
from manager.saga import SagaCoordinator, SagaProgress, SagaStatus, StepStatus, fold
from manager.saga.testing import Behaviour, Script, TestParticipant, chain_plan, read_effects
from manager.store import JetStreamRecorder


@pytest.fixture
async def participant(bus: Bus, tmp_path: Path) -> AsyncIterator[TestParticipant]:
    async with TestParticipant(bus, log_path=tmp_path / "effects.sqlite") as p:
        yield p


def make_coordinator(bus: Bus, instance: str = "it-1") -> SagaCoordinator:
    return SagaCoordinator(bus, JetStreamRecorder(bus), Identity(actor="coordinator"), instance_id=instance)


async def test_saga_of_real_steps_completes_and_reports_progress(
    bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    progress: list[SagaProgress] = []

    async def on_progress(msg: object) -> None:
        progress.append(SagaProgress.model_validate(codec.decode(msg.data)))  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(subjects.progress("real1"), cb=on_progress)
    coordinator = make_coordinator(bus)
    await coordinator.start_saga(chain_plan("real1", 4))
    state = await coordinator.run("real1")
    await bus.nc.flush()
    await sub.unsubscribe()

    assert state.status is SagaStatus.COMPLETED
    assert [(e.verb, e.name) for e in read_effects(tmp_path / "effects.sqlite")] == [
        ("do", "s1"),
        ("do", "s2"),
        ("do", "s3"),
        ("do", "s4"),
    ]
    assert state == fold(await JetStreamRecorder(bus).read("saga", "real1"))
    assert progress[0].event == "created"
    assert progress[-1].event == "completed"
    assert progress[-1].steps_succeeded == 4
    assert [p.position for p in progress] == sorted(p.position for p in progress)


async def test_absent_participant_is_retried_then_succeeds(bus: Bus, tmp_path: Path) -> None:
    coordinator = make_coordinator(bus)
    await coordinator.start_saga(chain_plan("late1", 2))
    recorder = JetStreamRecorder(bus)
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(coordinator.run("late1"))
        async with asyncio.timeout(5):
            while not any(e.event_type.endswith("step_retrying") for e in await recorder.read("saga", "late1")):
                await asyncio.sleep(0.02)
        async with TestParticipant(bus, log_path=tmp_path / "late.sqlite"):
            state = await run
    assert state.status is SagaStatus.COMPLETED
    s1 = state.steps["s1"]
    assert s1.attempts >= 2
    retry = next(e for e in await recorder.read("saga", "late1") if e.event_type.endswith("step_retrying"))
    assert retry.data["error"]["code"] == "unavailable"
    assert "no participant" in retry.data["error"]["message"]
    assert not retry.data["error"]["outcome_unknown"]
    assert [e.name for e in read_effects(tmp_path / "late.sqlite")] == ["s1", "s2"]


async def test_step_failing_for_good_compensates_in_reverse(bus: Bus, tmp_path: Path) -> None:
    script = Script(do={"s4": Behaviour(fail_always=ErrorCode.VALIDATION)})
    async with TestParticipant(bus, log_path=tmp_path / "fail.sqlite", script=script):
        coordinator = make_coordinator(bus)
        await coordinator.start_saga(chain_plan("fail1", 5))
        state = await coordinator.run("fail1")
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == "s4"
    assert state.steps["s4"].status is StepStatus.FAILED
    assert state.steps["s5"].status is StepStatus.PENDING
    assert [(e.verb, e.name) for e in read_effects(tmp_path / "fail.sqlite")] == [
        ("do", "s1"),
        ("do", "s2"),
        ("do", "s3"),
        ("undo", "s3"),
        ("undo", "s2"),
        ("undo", "s1"),
    ]
    assert state == fold(await JetStreamRecorder(bus).read("saga", "fail1"))


async def test_participant_dedupes_by_idempotency_key_on_the_bus(
    bus: Bus, participant: TestParticipant, tmp_path: Path
) -> None:
    from bus.client import request_raw

    payload = {"name": "x", "idempotency_key": "k-1"}
    _, first = await request_raw(bus, "sf.cmd.testpart.do", payload)
    _, again = await request_raw(bus, "sf.cmd.testpart.do", payload)
    assert first == again
    assert len(read_effects(tmp_path / "effects.sqlite")) == 1
    assert participant.log.calls() == [("do", "x", "k-1"), ("do", "x", "k-1")]


async def test_cancel_from_another_coordinator_interrupts_a_backoff(bus: Bus, tmp_path: Path) -> None:
    # s2 fails retryably with a long backoff; a cancel written by another coordinator reaches the
    # running one through the event subject at once instead of after the backoff.
    from manager.saga import RetryPolicy

    script = Script(do={"s2": Behaviour(fail_times=99)})
    plan = chain_plan("xc1", 3, retry=RetryPolicy(max_attempts=5, initial_backoff_s=60, max_backoff_s=60))
    runner, other = make_coordinator(bus, "runner"), make_coordinator(bus, "other")
    recorder = JetStreamRecorder(bus)
    async with (
        TestParticipant(bus, log_path=tmp_path / "xc.sqlite", script=script),
        asyncio.TaskGroup() as tg,
    ):
        serving = tg.create_task(runner.serve())
        await runner.start_saga(plan)
        runner.submit("xc1")
        async with asyncio.timeout(5):
            while not any(e.event_type.endswith("step_retrying") for e in await recorder.read("saga", "xc1")):
                await asyncio.sleep(0.02)
            await other.cancel("xc1")
            while not (state := fold(await recorder.read("saga", "xc1"))).is_terminal:
                await asyncio.sleep(0.02)
        serving.cancel()
    assert state.status is SagaStatus.COMPENSATED
    assert state.compensated == ["s1"]


async def test_step_requests_carry_the_key_in_payload_header_and_message_id(bus: Bus) -> None:
    from nats.aio.msg import Msg

    from bus.subjects import Header
    from manager.saga import ActionRef, SagaPlan, StepSpec
    from manager.saga.transport import IDEMPOTENCY_HEADER, key_of_msg_id

    seen: list[tuple[dict[str, str], dict[str, object]]] = []

    async def participant(msg: Msg) -> None:
        seen.append((dict(msg.headers or {}), codec.decode_mapping(msg.data)))
        if len(seen) == 1:
            return  # first attempt: no reply (times out), the retry must carry the same key
        await msg.respond(codec.encode({"ok": True}))

    sub = await bus.nc.subscribe("sf.agent.vna-1.configure", cb=participant)
    plan = SagaPlan(
        saga_id="hdr1",
        name="headers",
        steps=[
            StepSpec(
                step_id="cfg",
                action=ActionRef(subject="sf.agent.vna-1.configure", payload={"vlan": 10}),
                timeout_s=0.2,
            )
        ],
    )
    coordinator = make_coordinator(bus)
    await coordinator.start_saga(plan)
    state = await coordinator.run("hdr1")
    await sub.unsubscribe()
    assert state.status is SagaStatus.COMPLETED
    assert state.steps["cfg"].result == {"ok": True}
    assert len(seen) == 2
    msg_ids = set()
    for headers, payload in seen:
        assert payload == {"vlan": 10, "idempotency_key": "hdr1:cfg:action"}
        assert headers[IDEMPOTENCY_HEADER] == "hdr1:cfg:action"
        assert key_of_msg_id(headers[Header.MSG_ID]) == "hdr1:cfg:action"
        assert headers[Header.CORRELATION_ID] == "hdr1"
        assert headers[Header.ACTOR] == "coordinator"
        msg_ids.add(headers[Header.MSG_ID])
    assert len(msg_ids) == 2  # a fresh message id per send: signed-command replay checks pass


class SignedFresh:
    """A participant-side authenticator like the manager's: signature plus replay check."""

    def __init__(self, public_key: str) -> None:
        from bus.signing import MemoryNonceStore

        self.public_key = public_key
        self.nonces = MemoryNonceStore()

    async def authenticate(self, subject: str, envelope: object, body: bytes) -> str:
        from bus import signing

        signing.verify(self.public_key, subject, envelope, body)  # type: ignore[arg-type]
        await signing.check_fresh(envelope, self.nonces)  # type: ignore[arg-type]
        return "coordinator"


@pytest.mark.parametrize("exact_msg_id", [False, True])
async def test_retries_pass_a_replay_checking_participant(bus: Bus, tmp_path: Path, exact_msg_id: bool) -> None:
    from bus import signing
    from manager.saga import BusTransport, RetryPolicy

    seed = signing.generate_user_seed()
    identity = Identity(actor="coordinator", seed=seed)
    script = Script(default=Behaviour(sleep_s=0.3))  # slower than the step timeout: the first attempt times out
    auth = SignedFresh(signing.public_key_of(seed))
    plan = chain_plan("sig1", 1, timeout_s=0.2, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05))
    async with TestParticipant(bus, log_path=tmp_path / "sig.sqlite", script=script, authenticator=auth):
        coordinator = SagaCoordinator(
            bus,
            JetStreamRecorder(bus),
            identity,
            transport=BusTransport(bus, identity, exact_msg_id=exact_msg_id),
            instance_id="sig",
        )
        await coordinator.start_saga(plan)
        state = await coordinator.run("sig1")
    if exact_msg_id:
        # The bare key as message id is the same on every attempt: the retry is refused as a replay.
        assert state.status is SagaStatus.COMPENSATED
        assert state.steps["s1"].error is not None and state.steps["s1"].error.code == "unauthenticated"
    else:
        assert state.status is SagaStatus.COMPLETED
        assert [e.name for e in read_effects(tmp_path / "sig.sqlite")] == ["s1"]
