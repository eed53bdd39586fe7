"""One contract, every recorder: memory and JetStream pass the same suite."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from bus.connection import Bus
from bus.errors import ConcurrencyConflict
from manager.store import EventRecorder, JetStreamRecorder, MemoryRecorder, NewEvent


class RecorderContract:
    """Subclasses provide ``recorder`` as a fixture."""

    async def test_positions_start_at_one_and_are_gap_free(self, recorder: EventRecorder) -> None:
        p1 = await recorder.append("app", "a1", NewEvent("t.created", {"n": 1}), expected=0)
        p2 = await recorder.append("app", "a2", NewEvent("t.created", {"n": 2}), expected=0)
        p3 = await recorder.append("app", "a1", NewEvent("t.updated", {"n": 3}), expected=p1)
        assert (p1, p2, p3) == (1, 2, 3)
        assert await recorder.last_position() == 3

    async def test_read_returns_only_that_aggregate_in_order(self, recorder: EventRecorder) -> None:
        await recorder.append("app", "a1", NewEvent("t.created", {"n": 1}), expected=0)
        await recorder.append("app", "a2", NewEvent("t.created", {"n": 2}), expected=0)
        await recorder.append("app", "a1", NewEvent("t.updated", {"n": 3}), expected=1)
        events = await recorder.read("app", "a1")
        assert [e.data["n"] for e in events] == [1, 3]
        assert [e.event_type for e in events] == ["t.created", "t.updated"]
        assert await recorder.read("app", "nope") == []

    async def test_wrong_expected_position_conflicts_and_writes_nothing(self, recorder: EventRecorder) -> None:
        await recorder.append("user", "u1", NewEvent("t.created", {}), expected=0)
        with pytest.raises(ConcurrencyConflict):
            await recorder.append("user", "u1", NewEvent("t.created", {}), expected=0)
        assert len(await recorder.read("user", "u1")) == 1
        assert await recorder.last_position() == 1

    async def test_of_concurrent_writers_exactly_one_wins(self, recorder: EventRecorder) -> None:
        await recorder.append("app", "x", NewEvent("t.created", {}), expected=0)

        async def writer(i: int) -> bool:
            try:
                await recorder.append("app", "x", NewEvent("t.updated", {"by": i}), expected=1)
                return True
            except ConcurrencyConflict:
                return False

        results = await asyncio.gather(*(writer(i) for i in range(8)))
        assert results.count(True) == 1
        assert len(await recorder.read("app", "x")) == 2

    async def test_same_msg_id_is_stored_once(self, recorder: EventRecorder) -> None:
        ev = NewEvent("t.created", {"k": "v"})
        p1 = await recorder.append("app", "d", ev, expected=0)
        p2 = await recorder.append("app", "d", ev, expected=0)
        assert p1 == p2
        assert len(await recorder.read("app", "d")) == 1

    async def test_read_until_position_and_time(self, recorder: EventRecorder) -> None:
        p1 = await recorder.append("app", "h", NewEvent("t.created", {"v": 1}), expected=0)
        await asyncio.sleep(0.02)
        cut = dt.datetime.now(dt.UTC)
        await asyncio.sleep(0.02)
        await recorder.append("app", "h", NewEvent("t.updated", {"v": 2}), expected=p1)
        assert [e.data["v"] for e in await recorder.read("app", "h", until_position=p1)] == [1]
        assert [e.data["v"] for e in await recorder.read("app", "h", until_time=cut)] == [1]

    async def test_read_all_after_and_by_type(self, recorder: EventRecorder) -> None:
        await recorder.append("app", "a", NewEvent("t.created", {}), expected=0)
        await recorder.append("user", "u", NewEvent("t.created", {}), expected=0)
        await recorder.append("app", "b", NewEvent("t.created", {}), expected=0)
        assert [e.position async for e in recorder.read_all()] == [1, 2, 3]
        assert [e.position async for e in recorder.read_all(after=1)] == [2, 3]
        assert [e.aggregate_id async for e in recorder.read_all(aggregate_type="app")] == ["a", "b"]
        assert [e async for e in recorder.read_all(after=3)] == []

    async def test_envelope_metadata_is_kept(self, recorder: EventRecorder) -> None:
        ev = NewEvent("t.created", {"x": [1, 2]}, actor="alice", correlation_id="c1", causation_id="m0")
        await recorder.append("app", "m", ev, expected=None)
        (stored,) = await recorder.read("app", "m")
        assert (stored.actor, stored.correlation_id, stored.causation_id, stored.msg_id) == (
            "alice",
            "c1",
            "m0",
            ev.msg_id,
        )
        assert stored.data == {"x": [1, 2]}
        assert stored.subject == "sf.evt.app.m"


class TestMemoryRecorder(RecorderContract):
    @pytest.fixture
    def recorder(self) -> EventRecorder:
        return MemoryRecorder()


class TestJetStreamRecorder(RecorderContract):
    @pytest.fixture
    def recorder(self, bus: Bus) -> EventRecorder:
        return JetStreamRecorder(bus)
