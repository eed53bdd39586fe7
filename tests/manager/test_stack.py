"""The embedded stack: role credentials enforced by the server, restart keeps the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import pytest

from bus.client import Identity, command
from bus.connection import Bus
from bus.errors import BusUnavailable
from bus.messages import MESSAGES, Empty, WhoAmI, WriteResult
from bus.models import OverlayNetwork
from bus.permissions import Role
from manager.stack import ADMIN_ID, Stack


async def test_stack_roles_and_restart(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "state")
    await stack.start()
    try:
        admin_seed = (stack.keys_dir / f"{ADMIN_ID}.nk").read_text().strip()
        cli = await Bus.connect(stack.bus_config(Role.CLI, "cli"))
        me = await command(cli, "manager", "whoami", Empty(), WhoAmI, identity=Identity(ADMIN_ID, admin_seed))
        assert me.id == ADMIN_ID
        ov = MESSAGES["overlay"].create(record=OverlayNetwork(id="ov1", name="one"))
        await command(cli, "manager", "overlay_create", ov, WriteResult, identity=Identity(ADMIN_ID, admin_seed))

        # An agent's credentials cannot append to the event stream.
        agent = await Bus.connect(stack.bus_config(Role.AGENT, "agent"))
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await agent.nc.request("sf.evt.overlay.evil", b"\x80", timeout=1)
        await agent.nc.publish("sf.evt.overlay.evil2", b"\x80")
        await agent.nc.flush()
        # ...while what agents are for still works.
        status = await cli.nc.subscribe("sf.status.>")
        await agent.nc.publish("sf.status.vna.v1", b"\x80")
        assert (await status.next_msg(timeout=2)).subject == "sf.status.vna.v1"
        await asyncio.sleep(0.2)
        info = await cli.js.stream_info("SF_EVENTS")
        assert info.state.messages == 2  # admin bootstrap + ov1
        await agent.close()
        await cli.close()
    finally:
        await stack.stop()

    # Restart from the same state directory: same port, same keys, same events.
    again = Stack(tmp_path / "state")
    await again.start()
    try:
        admin_seed = (again.keys_dir / f"{ADMIN_ID}.nk").read_text().strip()
        cli = await Bus.connect(again.bus_config(Role.CLI, "cli"))
        got = await command(
            cli,
            "manager",
            "overlay_get",
            MESSAGES["overlay"].get(id="ov1"),
            MESSAGES["overlay"].view,
            identity=Identity(ADMIN_ID, admin_seed),
        )
        assert got.record.name == "one"
        await cli.close()
    finally:
        await again.stop()


async def test_unknown_nkey_cannot_connect(tmp_path: Path) -> None:
    from bus import signing
    from bus.connection import BusConfig

    async with Stack(tmp_path / "s") as stack:
        assert stack.info is not None
        cfg = BusConfig(servers=[stack.info.url], nkey_seed=signing.generate_user_seed(), max_reconnect_attempts=1)
        with pytest.raises(BusUnavailable):
            await Bus.connect(cfg)


async def test_stack_projects_into_sqlite(tmp_path: Path) -> None:
    from manager.projections.tables import overlays

    async with Stack(tmp_path / "p") as stack:
        admin_seed = (stack.keys_dir / f"{ADMIN_ID}.nk").read_text().strip()
        cli = await Bus.connect(stack.bus_config(Role.CLI, "cli"))
        ov = MESSAGES["overlay"].create(record=OverlayNetwork(id="ov9", name="nine"))
        w = await command(cli, "manager", "overlay_create", ov, WriteResult, identity=Identity(ADMIN_ID, admin_seed))
        await cli.close()
        assert stack.manager is not None and stack.manager.projection_runner is not None
        await stack.manager.projection_runner.wait_for(w.version, timeout=5)
        assert stack.manager.projector is not None
        assert await stack.manager.projector.count(overlays) == 1
