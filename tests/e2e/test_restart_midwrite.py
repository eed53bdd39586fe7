"""A NATS server crash in the middle of writes: retries, no duplicates, projections consistent."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bus.errors import AlreadyExists, BusError
from bus.messages import MESSAGES, WriteResult
from bus.models import OverlayNetwork
from bus.server import EmbeddedNatsServer
from manager.app import ManagerApp
from manager.projections import Projector
from manager.projections.tables import overlays as overlays_table
from manager.store import JetStreamRecorder
from tests.manager_fixtures import Client

OV = MESSAGES["overlay"]
N = 40


OUTCOMES = {"created", "created-on-retry", "landed-before-crash"}


async def _create_with_retry(admin: Client, i: int, done: list[str]) -> str:
    """What a careful client does: retry transport errors; a create that already landed shows as exists."""
    retried = False
    for _ in range(100):
        try:
            await admin("overlay_create", OV.create(record=OverlayNetwork(id=f"ov{i}", name=f"o{i}")), WriteResult)
            done.append("created-on-retry" if retried else "created")
            return done[-1]
        except AlreadyExists:
            assert retried, "only a retry may find its own earlier write"
            done.append("landed-before-crash")
            return done[-1]
        except BusError:
            retried = True
            await asyncio.sleep(0.2)
    raise AssertionError("never succeeded")


async def test_server_killed_mid_writes(
    nats_server: EmbeddedNatsServer, manager: tuple[ManagerApp, str], admin: Client, tmp_path: Path
) -> None:
    done: list[str] = []

    async def crash_mid_writes() -> int:
        # Kill once the first writes are through, so the others are in flight when the server dies.
        while len(done) < 3:
            await asyncio.sleep(0.001)
        nats_server.kill()
        in_flight = N - len(done)
        await asyncio.sleep(0.5)
        await nats_server.start()
        return in_flight

    results, in_flight = await asyncio.gather(
        asyncio.gather(*(_create_with_retry(admin, i, done) for i in range(N))), crash_mid_writes()
    )
    assert in_flight > 0, "the crash must land while writes are outstanding"
    # Each write ended one of the expected ways (the manager's own append retry usually hides the
    # crash from the client); below: every overlay exists and was written exactly once.
    assert set(results) <= OUTCOMES and len(done) == N

    listed = await admin("overlay_list", OV.list(), OV.list_result)
    assert sorted(i.record.id for i in listed.items) == sorted(f"ov{i}" for i in range(N))
    app, _ = manager
    assert app.bus is not None
    recorder = JetStreamRecorder(app.bus)
    events = [e async for e in recorder.read_all()]
    created = [e.aggregate_id for e in events if e.event_type.endswith("overlay.created")]
    assert sorted(created) == sorted(f"ov{i}" for i in range(N)), "each overlay written exactly once"

    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'rm.sqlite'}") as proj:
        await proj.rebuild(recorder)
        assert await proj.count(overlays_table) == N
        assert await proj.position() == events[-1].position
