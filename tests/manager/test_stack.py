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
        await cli.nc.flush()
        await agent.nc.publish("sf.status.vna.v1", b"\x80")
        assert (await status.next_msg(timeout=2)).subject == "sf.status.vna.v1"
        await asyncio.sleep(0.2)
        from manager.store import JetStreamRecorder

        events = [e async for e in JetStreamRecorder(cli).read_all()]
        assert [e.aggregate_id for e in events if e.aggregate_type == "overlay"] == ["ov1"]
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


async def test_stack_runs_authenticated_sagas(tmp_path: Path) -> None:
    from bus.errors import Forbidden, Unauthenticated
    from bus.messages import MESSAGES as M
    from bus.models import UserAccount
    from manager.saga.service import SagaRef, SagaView, StartSaga
    from manager.saga.testing import TestParticipant, chain_plan

    async with Stack(tmp_path / "sg") as stack:
        admin_seed = (stack.keys_dir / f"{ADMIN_ID}.nk").read_text().strip()
        admin = Identity(ADMIN_ID, admin_seed)
        cli = await Bus.connect(stack.bus_config(Role.CLI, "cli"))
        comp = await Bus.connect(stack.bus_config(Role.COMPONENT, "participant"))
        async with TestParticipant(comp, log_path=tmp_path / "effects.sqlite"):
            plan = chain_plan("sg1", 3)
            with pytest.raises(Unauthenticated):
                await command(cli, "saga", "start", StartSaga(plan=plan), SagaView)
            from bus import signing

            seed = signing.generate_user_seed()
            viewer = UserAccount(id="viewer", public_key=signing.public_key_of(seed), authorisations={"network-read"})
            await command(cli, "manager", "user_create", M["user"].create(record=viewer), WriteResult, identity=admin)
            with pytest.raises(Forbidden):
                await command(cli, "saga", "start", StartSaga(plan=plan), SagaView, identity=Identity("viewer", seed))
            await command(cli, "saga", "start", StartSaga(plan=plan), SagaView, identity=admin)
            for _ in range(100):
                view = await command(cli, "saga", "show", SagaRef(saga_id="sg1"), SagaView, identity=admin)
                if view.status == "completed":
                    break
                await asyncio.sleep(0.1)
            assert view.status == "completed"
        await comp.close()
        await cli.close()
