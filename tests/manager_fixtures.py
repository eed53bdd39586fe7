"""A running manager (real nats-server, real JetStream) and signed clients for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from bus import signing
from bus.client import Identity, command
from bus.connection import Bus, BusConfig
from bus.messages import MESSAGES, WriteResult
from bus.models import UserAccount
from bus.server import EmbeddedNatsServer
from manager.app import ManagerApp, ManagerConfig

R = TypeVar("R", bound=BaseModel)


@dataclass
class Client:
    """Calls manager commands as one identity."""

    bus: Bus
    identity: Identity

    async def __call__(self, verb: str, payload: BaseModel | dict[str, Any], response: type[R]) -> R:
        return await command(self.bus, "manager", verb, payload, response, identity=self.identity)


@pytest.fixture
async def manager(nats_server: EmbeddedNatsServer) -> AsyncIterator[tuple[ManagerApp, str]]:
    """A manager with an admin user; yields the app and the admin's seed."""
    seed = signing.generate_user_seed()
    app = ManagerApp(
        ManagerConfig(
            bus=BusConfig(servers=[nats_server.url], name="manager"),
            admin_public_key=signing.public_key_of(seed),
            heartbeat_s=0.2,
        )
    )
    await app.start()
    try:
        yield app, seed
    finally:
        await app.stop()


@pytest.fixture
def admin(bus: Bus, manager: tuple[ManagerApp, str]) -> Client:
    return Client(bus, Identity("admin", manager[1]))


MakeUser = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_user(bus: Bus, admin: Client) -> MakeUser:
    """Create a user through the manager and return a client acting as them."""

    async def make(user_id: str, authorisations: set[str], groups: list[str] | None = None) -> Client:
        seed = signing.generate_user_seed()
        user = UserAccount(
            id=user_id, public_key=signing.public_key_of(seed), authorisations=authorisations, groups=groups or []
        )
        await admin("user_create", MESSAGES["user"].create(record=user), WriteResult)
        return Client(bus, Identity(user_id, seed))

    return make
