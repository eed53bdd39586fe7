"""Databases for the projection contract: a SQLite file, and a throw-away PostgreSQL schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from manager.projections import Projector

PG_URL = os.environ.get("SKYFERRY_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

#: Opens one more Projector on the same database (a "restarted process").
MakeProjector = Callable[[], Projector]


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[MakeProjector]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'projections.db'}"
    opened: list[Projector] = []

    def make() -> Projector:
        opened.append(Projector(url))
        return opened[-1]

    yield make
    for p in opened:
        await p.close()


@pytest.fixture
async def postgres_db() -> AsyncIterator[MakeProjector]:
    """A fresh schema in the local PostgreSQL, dropped afterwards; skips if the server is unreachable."""
    dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    try:
        admin = await asyncpg.connect(dsn, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc!r}")
    schema = f"sf_proj_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    opened: list[Projector] = []

    def make() -> Projector:
        opened.append(Projector(PG_URL, schema=schema))
        return opened[-1]

    try:
        yield make
    finally:
        for p in opened:
            await p.close()
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
