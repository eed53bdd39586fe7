"""Async engines for the projections: SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL."""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from manager.projections.errors import UnsupportedDatabase
from manager.projections.sql import dumps_json

DEFAULT_URL = "sqlite+aiosqlite:///skyferry-projections.db"

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


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
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": dumps_json}
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


def sqlite_file(url: str | URL) -> str | None:
    """The database file of a SQLite URL, or None (PostgreSQL, in-memory SQLite).

    The projector applies batches on a blocking ``sqlite3`` connection to this file in one
    worker thread: one thread hand-off per batch instead of several per statement through
    aiosqlite.
    """
    u = normalise_url(url)
    if u.get_backend_name() != "sqlite" or is_memory_sqlite(u):
        return None
    return str(u.database)


def open_sqlite(path: str) -> sqlite3.Connection:
    """A blocking connection for the write path: autocommit mode (transactions are explicit), WAL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    _sqlite_pragmas(conn, None)
    return conn


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (CLI, dashboards) query while the runner writes; a busy timeout instead of
    # "database is locked" when two processes write at once. synchronous=NORMAL: a commit is not
    # fsynced (the WAL is, at checkpoints), so a power loss can take the last commits back, never
    # corrupt the file; the read model is rebuilt from the stream, and the position rolls back
    # with the rows (one transaction), so the runner re-applies exactly what was lost.
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()
