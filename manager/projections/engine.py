"""Async engines for the projections: SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from manager.projections.errors import UnsupportedDatabase

DEFAULT_URL = "sqlite+aiosqlite:///skyferry-projections.db"

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


def _json_default(value: Any) -> Any:
    # Event payloads come from msgpack: bytes and the odd non-JSON value must not fail a whole batch.
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    text = json.dumps(value, default=_json_default, separators=(",", ":"))
    if "\\u0000" in text:
        # PostgreSQL's JSONB refuses NUL characters; one odd payload must not block the stream.
        text = json.dumps(_without_nul(value), default=_json_default, separators=(",", ":"))
    return text


def normalise_url(url: str | URL) -> URL:
    """Pin the async driver: ``sqlite://`` -> aiosqlite, ``postgresql://`` -> asyncpg.

    Raises:
        UnsupportedDatabase: neither SQLite nor PostgreSQL, or not a URL at all.
    """
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise UnsupportedDatabase(f"not a database URL: {url!r}") from exc
    backend = u.get_backend_name()
    if backend not in _DRIVERS:
        raise UnsupportedDatabase(f"unsupported database {backend!r}: use sqlite or postgresql")
    return u.set(drivername=_DRIVERS[backend])


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_engine(url: str | URL, *, schema: str | None = None, echo: bool = False) -> AsyncEngine:
    """An async engine for ``url``; ``schema`` places every table in that PostgreSQL schema."""
    u = normalise_url(url)
    if schema is not None and u.get_backend_name() != "postgresql":
        raise UnsupportedDatabase("a schema can only be given for PostgreSQL")
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _dumps}
    if is_memory_sqlite(u):
        # One shared connection, else every pooled connection would see its own empty database.
        kwargs |= {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    elif u.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(u, **kwargs)
    if u.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


def create_blocking_engine(url: str | URL, *, echo: bool = False) -> Engine | None:
    """A blocking (pysqlite) engine on the same SQLite file, or None (PostgreSQL, in-memory SQLite).

    The projector applies a batch on it in one worker thread: one thread hand-off per batch
    instead of several per statement through aiosqlite.
    """
    u = normalise_url(url)
    if u.get_backend_name() != "sqlite" or is_memory_sqlite(u):
        return None
    engine = create_sync_engine(u.set(drivername="sqlite+pysqlite"), echo=echo, json_serializer=_dumps)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (CLI, dashboards) query while the runner writes; a busy timeout instead of
    # "database is locked" when two processes write at once.
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()
