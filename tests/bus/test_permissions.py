"""The ``saga`` role on a real nats-server: enough to coordinate, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from bus import codec, signing
from bus.client import Identity
from bus.connection import Bus, BusConfig, ensure_streams
from bus.kinds import KINDS
from bus.messages import event_type
from bus.models import UserAccount
from bus.permissions import NONCE_BUCKET, SAGA_LEASE_BUCKET, Role
from bus.server import EmbeddedNatsServer, NkeyUser, ServerConfig
from manager.auth import NONCE_BUCKET as MANAGER_NONCE_BUCKET
from manager.auth import KvNonceStore
from manager.saga import LEASE_BUCKET, SagaCoordinator, SagaStatus
from manager.saga.testing import TestParticipant, chain_plan, read_effects
from manager.saga.worker import UserDirectory
from manager.store import JetStreamRecorder, NewEvent


def test_bucket_names_are_the_managers() -> None:
    assert SAGA_LEASE_BUCKET == LEASE_BUCKET
    assert NONCE_BUCKET == MANAGER_NONCE_BUCKET


@pytest.fixture
async def secured() -> AsyncIterator[tuple[EmbeddedNatsServer, dict[Role, str]]]:
    seeds = {r: signing.generate_user_seed() for r in Role}
    server = EmbeddedNatsServer(ServerConfig(users=[NkeyUser(signing.public_key_of(s), r) for r, s in seeds.items()]))
    await server.start()
    try:
        async with await Bus.connect(BusConfig(servers=[server.url], nkey_seed=seeds[Role.MANAGER])) as manager:
            await ensure_streams(manager)
        yield server, seeds
    finally:
        await server.stop()


async def _connect(server: EmbeddedNatsServer, seeds: dict[Role, str], role: Role) -> Bus:
    return await Bus.connect(BusConfig(servers=[server.url], name=role.value, nkey_seed=seeds[role]))


async def test_saga_role_coordinates_a_saga(
    secured: tuple[EmbeddedNatsServer, dict[Role, str]], tmp_path: Path
) -> None:
    server, seeds = secured
    saga, component, manager = [await _connect(server, seeds, r) for r in (Role.SAGA, Role.COMPONENT, Role.MANAGER)]
    try:
        async with TestParticipant(component, log_path=tmp_path / "effects.sqlite"):
            coordinator = SagaCoordinator(
                saga,
                JetStreamRecorder(saga),
                Identity("saga-coordinator", signing.generate_user_seed()),
                instance_id="perm-1",
                lease_ttl_s=2.0,
            )
            await coordinator.start_saga(chain_plan("perm1", 3))
            state = await coordinator.run("perm1")  # events, leases (KV), reads, progress
        assert state.status is SagaStatus.COMPLETED
        assert [e.name for e in read_effects(tmp_path / "effects.sqlite")] == ["s1", "s2", "s3"]

        # What the worker authenticates saga commands with: users folded from the stream, shared nonces.
        directory = UserDirectory(saga)
        await directory.start()
        user = UserAccount(id="olga", public_key=signing.public_key_of(signing.generate_user_seed()))
        await JetStreamRecorder(manager).append(
            "user", "olga", NewEvent(event_type(KINDS["user"].name, "created"), {"record": user.model_dump()}), 0
        )
        async with asyncio.timeout(5):
            while directory.lookup("olga") is None:
                await asyncio.sleep(0.02)
        await directory.stop()
        nonces = await KvNonceStore.open(saga)
        assert await nonces.remember("m-1") and not await nonces.remember("m-1")
    finally:
        for bus in (saga, component, manager):
            await bus.close()


async def test_saga_role_cannot_write_other_aggregates_or_configure_streams(
    secured: tuple[EmbeddedNatsServer, dict[Role, str]],
) -> None:
    server, seeds = secured
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(servers=[server.url], nkeys_seed_str=seeds[Role.SAGA], error_cb=on_error)
    try:
        js = nc.jetstream()
        await js.publish("sf.evt.saga.ok", codec.encode({}), timeout=2)
        with pytest.raises(Exception):  # noqa: B017 - dropped by the server: no ack
            await js.publish("sf.evt.overlay.x", codec.encode({}), timeout=0.5)
        with pytest.raises(Exception):  # noqa: B017
            await js.add_stream(StreamConfig(name="SF_EVIL", subjects=["evil.>"]), timeout=0.5)
        await nc.subscribe("sf.cmd.manager.>")
        await nc.flush()
        async with asyncio.timeout(5):
            while not any("subscription" in e.lower() for e in errors):
                await asyncio.sleep(0.02)
    finally:
        await nc.close()
    async with await _connect(server, seeds, Role.MANAGER) as manager:
        assert await JetStreamRecorder(manager).read("overlay", "x") == []
        assert [e.aggregate_id for e in await JetStreamRecorder(manager).read("saga", "ok")] == ["ok"]
