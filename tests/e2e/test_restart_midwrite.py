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


async def _create_with_retry(admin: Client, i: int) -> str:
    """What a careful client does: retry transport errors; a create that already landed shows as exists."""
    retried = False
    for _ in range(100):
        try:
            await admin("overlay_create", OV.create(record=OverlayNetwork(id=f"ov{i}", name=f"o{i}")), WriteResult)
            return "created"
        except AlreadyExists:
            assert retried, "only a retry may find its own earlier write"
            return "landed-before-crash"
        except BusError:
            retried = True
            await asyncio.sleep(0.2)
    raise AssertionError("never succeeded")


async def test_server_killed_mid_writes(
    nats_server: EmbeddedNatsServer, manager: tuple[ManagerApp, str], admin: Client, tmp_path: Path
) -> None:
    async def crash_soon() -> None:
        await asyncio.sleep(0.05)
        nats_server.kill()
        await asyncio.sleep(0.5)
        await nats_server.start()

    results, _ = await asyncio.gather(asyncio.gather(*(_create_with_retry(admin, i) for i in range(N))), crash_soon())
    assert len(results) == N

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
