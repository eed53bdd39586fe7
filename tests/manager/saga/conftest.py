"""Saga test fixtures: in-memory recorder, transport, participant and clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from bus.client import Identity
from manager.saga import MemoryLeases, SagaCoordinator
from manager.saga.testing import FakeClock, MemoryTransport, ScriptedParticipant
from manager.store import MemoryRecorder

MakeCoordinator = Callable[..., SagaCoordinator]


@pytest.fixture
def recorder() -> MemoryRecorder:
    return MemoryRecorder()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def participant() -> ScriptedParticipant:
    return ScriptedParticipant()


@pytest.fixture
async def transport(participant: ScriptedParticipant) -> AsyncIterator[MemoryTransport]:
    t = MemoryTransport()
    t.serve(participant)
    yield t
    await t.aclose()


@pytest.fixture
def leases() -> MemoryLeases:
    return MemoryLeases(ttl_s=5.0)


@pytest.fixture
def make_coordinator(
    recorder: MemoryRecorder, clock: FakeClock, transport: MemoryTransport, leases: MemoryLeases
) -> MakeCoordinator:
    def make(instance_id: str = "c1", **kwargs: object) -> SagaCoordinator:
        opts: dict[str, object] = {"clock": clock, "transport": transport, "leases": leases, "instance_id": instance_id}
        opts.update(kwargs)
        return SagaCoordinator(None, recorder, Identity(actor="tester"), **opts)  # type: ignore[arg-type]

    return make


@pytest.fixture
def coordinator(make_coordinator: MakeCoordinator) -> SagaCoordinator:
    return make_coordinator()
