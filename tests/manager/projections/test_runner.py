"""The runner on a real nats-server: live appends, server restarts, poison messages, new databases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bus.connection import Bus
from bus.errors import BusError
from bus.messages import event_type
from bus.server import EmbeddedNatsServer
from bus.subjects import EVENTS_STREAM, Header
from manager.projections import Committed, Incoming, ProjectionRunner, Projector, StreamReader
from manager.projections import tables as t
from manager.store import JetStreamRecorder, NewEvent
from tests.manager.projections.samples import HISTORY, overlay, record

DURABLE = "sf-projector-test"


@pytest.fixture
async def projector(tmp_path: Path) -> AsyncIterator[Projector]:
    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'live.db'}") as p:
        yield p


@asynccontextmanager
async def running(runner: ProjectionRunner) -> AsyncIterator[ProjectionRunner]:
    """The runner inside a TaskGroup, stopped cleanly on exit."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run())
        await asyncio.wait_for(runner.started.wait(), 10)
        try:
            yield runner
        finally:
            runner.stop()


async def append_retrying(recorder: JetStreamRecorder, agg: str, agg_id: str, ev: NewEvent) -> int:
    """Append through a reconnect (same msg id, so a retry cannot double-append)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await recorder.append(agg, agg_id, ev, expected=None)
        except BusError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_follows_live_appends_and_reports_lag(bus: Bus, projector: Projector, tmp_path: Path) -> None:
    commits: list[Committed] = []
    runner = ProjectionRunner(bus, projector, DURABLE, fetch_timeout=0.2, on_commit=commits.append)
    recorder = JetStreamRecorder(bus)
    async with running(runner):
        positions = await record(recorder, HISTORY[:10])
        await runner.wait_for(positions[-1])
        more = await record(recorder, HISTORY[10:])
        await runner.wait_for(more[-1])
        assert await runner.lag() == 0
    assert await projector.position() == len(HISTORY)
    assert sum(c.count for c in commits) == len(HISTORY)
    lags = [lag for c in commits for lag in c.lags]
    assert len(lags) == len(HISTORY) and all(0 <= lag < 5 for lag in lags)

    # What the runner built equals a rebuild straight from the stream.
    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'rebuilt.db'}") as rebuilt:
        result = await rebuilt.rebuild(StreamReader(bus))
        assert result.count == len(HISTORY)
        assert await rebuilt.snapshot() == await projector.snapshot()


async def test_catches_up_after_a_nats_server_restart(
    bus: Bus, nats_server: EmbeddedNatsServer, projector: Projector, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[int] = []
    real = ProjectionRunner._recreate_consumer

    async def spy(self: ProjectionRunner, exists: bool, position: int) -> None:
        created.append(position)
        await real(self, exists, position)

    monkeypatch.setattr(ProjectionRunner, "_recreate_consumer", spy)
    runner = ProjectionRunner(bus, projector, DURABLE, fetch_timeout=0.2)
    recorder = JetStreamRecorder(bus)
    async with running(runner):
        p = await record(recorder, HISTORY[:5])
        await runner.wait_for(p[-1])
        await asyncio.sleep(0.2)  # let the acks reach the server
        await nats_server.restart()
        last = 0
        for i, (agg, agg_id, ev_type, data) in enumerate(HISTORY[5:12]):
            last = await append_retrying(recorder, agg, agg_id, NewEvent(ev_type, data, msg_id=f"restart-{i}"))
        await runner.wait_for(last, timeout=20)
    assert last == 12
    assert await projector.count(t.events) == 12
    assert created == [0], "the durable consumer should survive the restart"
    info = await bus.js.consumer_info(EVENTS_STREAM, DURABLE)
    assert info.ack_floor.stream_seq == 12


async def test_a_malformed_event_is_recorded_and_the_next_one_projected(bus: Bus, projector: Projector) -> None:
    runner = ProjectionRunner(bus, projector, DURABLE, fetch_timeout=0.2)
    recorder = JetStreamRecorder(bus)
    async with running(runner):
        await record(recorder, HISTORY[:1])
        garbage = {
            Header.SCHEMA.value: event_type("overlay", "created"),
            Header.CONTENT_TYPE.value: "application/msgpack",
        }
        await bus.js.publish("sf.evt.overlay.junk", b"\xc1\xc1", headers=garbage)  # 0xc1: never valid msgpack
        await bus.js.publish("sf.evt.overlay.a.b", b"", headers=garbage)  # not an event subject
        bad = NewEvent(event_type("overlay", "created"), {"record": {"id": "ov9", "vni": -1}})
        await recorder.append("overlay", "ov9", bad, expected=None)  # decodes, does not validate
        good = await recorder.append(
            "overlay", "ov7", NewEvent(event_type("overlay", "created"), overlay("ov7", "Fine")), None
        )
        await runner.wait_for(good)
    errors = await projector.errors()
    assert [(e["position"], e["subject"]) for e in errors] == [
        (2, "sf.evt.overlay.junk"),
        (3, "sf.evt.overlay.a.b"),
        (4, "sf.evt.overlay.ov9"),
    ]
    assert errors[2]["event_type"] == event_type("overlay", "created")
    rows: dict[str, Any] = await projector.snapshot([t.overlays])
    assert [o["id"] for o in rows["overlays"]] == ["ov7", "ovnet10"]


async def test_a_new_database_gets_the_whole_stream_through_the_same_durable(bus: Bus, tmp_path: Path) -> None:
    recorder = JetStreamRecorder(bus)
    positions = await record(recorder, HISTORY)
    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") as first:
        runner = ProjectionRunner(bus, first, DURABLE, fetch_timeout=0.2)
        async with running(runner):
            await runner.wait_for(positions[-1])
        expected = await first.snapshot()
    # The durable consumer now sits at the end of the stream; a fresh database is at 0.
    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}") as second:
        runner = ProjectionRunner(bus, second, DURABLE, fetch_timeout=0.2)
        async with running(runner):
            await runner.wait_for(positions[-1])
            extra = await recorder.append(
                "overlay", "late", NewEvent(event_type("overlay", "created"), overlay("late", "Late")), None
            )
            await runner.wait_for(extra)
        snap = await second.snapshot()
    assert snap["events"][:-1] == expected["events"]
    assert [o["id"] for o in snap["overlays"]] == ["late", "ovnet10", "ovnet11"]


async def test_a_rebuild_under_a_running_runner_realigns(bus: Bus, projector: Projector) -> None:
    recorder = JetStreamRecorder(bus)
    runner = ProjectionRunner(bus, projector, DURABLE, fetch_timeout=0.2, max_backoff=0.2)
    async with running(runner):
        p = await record(recorder, HISTORY[:15])
        await runner.wait_for(p[-1])
        await projector.rebuild(StreamReader(bus))
        more = await record(recorder, HISTORY[15:])
        await runner.wait_for(more[-1])
    assert await projector.count(t.events) == len(HISTORY)
    assert await projector.errors() == []


class _Nothing:
    """A source with no events: a rebuild that stopped right after recreating the tables."""

    async def read_all(self, after: int = 0) -> AsyncIterator[Incoming]:
        nothing: list[Incoming] = []
        for ev in nothing:
            yield ev


async def test_a_reset_database_under_a_running_runner_is_refilled(bus: Bus, projector: Projector) -> None:
    recorder = JetStreamRecorder(bus)
    runner = ProjectionRunner(bus, projector, DURABLE, fetch_timeout=0.2, max_backoff=0.2)
    async with running(runner):
        p = await record(recorder, HISTORY[:15])
        await runner.wait_for(p[-1])
        await projector.rebuild(_Nothing())  # tables empty, position 0; the consumer is at 15
        more = await record(recorder, HISTORY[15:])  # 16 arrives first: a gap the runner must refuse
        await runner.wait_for(more[-1])
    assert await projector.count(t.events) == len(HISTORY)
    assert await projector.errors() == []
