"""Shared fixtures: a real nats-server per test on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bus.connection import Bus, BusConfig, ensure_streams
from bus.server import EmbeddedNatsServer

pytest_plugins = ["tests.manager_fixtures"]


@pytest.fixture
async def nats_server() -> AsyncIterator[EmbeddedNatsServer]:
    """A fresh nats-server with JetStream in a temporary store directory."""
    server = EmbeddedNatsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedNatsServer) -> AsyncIterator[Bus]:
    """A connection to :func:`nats_server` with the Skyferry streams created."""
    conn = await Bus.connect(BusConfig(servers=[nats_server.url], name="test"))
    await ensure_streams(conn)
    try:
        yield conn
    finally:
        await conn.close()
