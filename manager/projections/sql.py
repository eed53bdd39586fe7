"""The projector's write path in plain driver SQL: one statement per table and batch, no per-row ORM.

SQLAlchemy keeps the schema (:mod:`manager.projections.tables`) and every query;
applying a batch goes straight to the driver, which is where the projector spent
most of its time per event (compiling, per-row bind processing, JSON encoding):

* **SQLite** (a file): the blocking ``sqlite3`` module in the projector's worker
  thread, ``executemany`` per table, ``BEGIN IMMEDIATE`` so that two writers
  serialise; an in-memory database goes through the async engine's single
  connection with the same SQL (:class:`AlchemySql`).
* **PostgreSQL**: the asyncpg connection itself, one ``INSERT ... SELECT FROM
  unnest($1::type[], ...)`` per table (one round trip for any number of rows),
  ``= ANY($1::text[])`` for deletes and loads.

Values are converted once per table and column (SQLite: SQLAlchemy's own bind
processors for timestamps and booleans, so queries read back exactly what they
would have written), JSON is encoded by :func:`dumps_json`, and strings lose NUL
characters (PostgreSQL refuses them; SQLite does the same for one contract).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import orjson
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Integer, Table
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.projections import tables as t
from manager.projections.errors import ProjectionConflict

Row = dict[str, Any]
Values = tuple[Any, ...]

_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class Serialized(str):
    """JSON text already encoded (a JSON column's value passes through as it is)."""

    __slots__ = ()


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


def _plain_keys(value: Any) -> Any:
    """Keys that JSON can hold (msgpack maps may have bytes keys)."""
    if isinstance(value, dict):
        return {(k.hex() if isinstance(k, bytes) else str(k)): _plain_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_keys(v) for v in value]
    return value


def _slow_dumps(value: Any) -> str:
    try:
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps(_plain_keys(value), default=_json_default, separators=(",", ":"))


def dumps_json(value: Any) -> str:
    """Compact JSON text for a JSON column; never fails on an odd payload.

    orjson (about ten times faster than ``json`` on these documents), falling back to
    ``json`` for what orjson refuses (integers past 64 bits, odd keys); NUL characters
    become U+FFFD (PostgreSQL's JSONB refuses ``\\u0000``).
    """
    try:
        text = orjson.dumps(value, default=_json_default, option=_ORJSON_OPTS).decode()
    except TypeError:
        text = _slow_dumps(value)
    if "\\u0000" in text:
        text = _slow_dumps(_without_nul(value))
    return text


def loads_json(text: str | bytes) -> Any:
    """Inverse of :func:`dumps_json`."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # e.g. an integer past 64 bits written by the json fallback
        return json.loads(text)


def _clean(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if value.__class__ is str and "\x00" in value else value


def _json(value: Any) -> Any:
    return value if value is None or isinstance(value, Serialized) else dumps_json(value)


@dataclass(frozen=True)
class TableSpec:
    """What the write path needs of one table."""

    table: Table
    columns: tuple[str, ...]
    key: tuple[str, ...]
    convert: Callable[[Row], Values]
    """Row -> driver values in column order."""


def _converter(table: Table, dialect: str) -> Callable[[Row], Values]:
    """A function building one table's driver values from a row, compiled once per table."""
    sqlite_dialect = sqlite.dialect()
    env: dict[str, Any] = {}
    parts: list[str] = []
    for i, col in enumerate(table.columns):
        typ = col.type
        fn: Callable[[Any], Any] | None
        if isinstance(typ, JSON):
            fn = _json
        elif dialect == "sqlite" and isinstance(typ, DateTime | Boolean):
            fn = typ.dialect_impl(sqlite_dialect).bind_processor(sqlite_dialect)
        elif isinstance(typ, DateTime | Boolean | Integer):
            fn = None
        else:
            fn = _clean
        if fn is None:
            parts.append(f"row[{col.name!r}]")
        else:
            env[f"f{i}"] = fn
            parts.append(f"(None if (v{i} := row[{col.name!r}]) is None else f{i}(v{i}))")
    code = f"lambda row: ({', '.join(parts)},)"
    convert: Callable[[Row], Values] = eval(code, env)  # built from the table definition, not from data
    return convert


class Sql(Protocol):
    """One open transaction of the write path."""

    dialect: str
    st: Statements

    async def position(self, name: str, *, lock: bool) -> int | None: ...

    async def cas(self, name: str, expected: int, new: int, now: dt.datetime) -> bool: ...

    async def create_position(self, name: str, new: int, now: dt.datetime) -> None: ...

    async def insert(self, spec: TableSpec, rows: Sequence[Values]) -> None: ...

    async def upsert(self, spec: TableSpec, rows: Sequence[Values]) -> None: ...

    async def delete(self, spec: TableSpec, column: str, ids: Sequence[str]) -> None: ...

    async def load(self, aggregate_type: str, ids: Sequence[str]) -> list[tuple[str, int, str | None]]:
        """``(aggregate_id, version, state JSON text)`` of the stored roots among ``ids``."""
        ...


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Statements:
    """SQL text per table for one dialect (and PostgreSQL schema), built once."""

    def __init__(self, dialect: str, schema: str | None = None) -> None:
        self.dialect = dialect
        self.prefix = f"{_q(schema)}." if schema else ""
        self.specs: dict[Table, TableSpec] = {}
        self._insert: dict[Table, str] = {}
        self._upsert: dict[Table, str] = {}
        self._delete: dict[tuple[Table, str], str] = {}
        pp = self.name(t.projection_position)
        agg = self.name(t.aggregates)
        if dialect == "postgresql":
            self.position_sql = f"SELECT position FROM {pp} WHERE name = $1"
            self.cas_sql = f"UPDATE {pp} SET position = $1, updated_at = $2 WHERE name = $3 AND position = $4"
            self.create_sql = f"INSERT INTO {pp} (name, position, updated_at) VALUES ($1, $2, $3)"
            self.load_sql = (
                f"SELECT aggregate_id, version, state::text FROM {agg}"
                " WHERE aggregate_type = $1 AND aggregate_id = ANY($2::text[])"
            )
        else:
            self.position_sql = f"SELECT position FROM {pp} WHERE name = ?"
            self.cas_sql = f"UPDATE {pp} SET position = ?, updated_at = ? WHERE name = ? AND position = ?"
            self.create_sql = f"INSERT INTO {pp} (name, position, updated_at) VALUES (?, ?, ?)"
            self.load_sql = (
                f"SELECT aggregate_id, version, state FROM {agg}"
                " WHERE aggregate_type = ? AND aggregate_id IN (SELECT value FROM json_each(?))"
            )
        self._ts = t.projection_position.c.updated_at.type.dialect_impl(sqlite.dialect()).bind_processor(
            sqlite.dialect()
        )

    def name(self, table: Table) -> str:
        return self.prefix + _q(table.name)

    def timestamp(self, value: dt.datetime) -> Any:
        return value if self.dialect == "postgresql" or self._ts is None else self._ts(value)

    def spec(self, table: Table) -> TableSpec:
        found = self.specs.get(table)
        if found is None:
            found = self.specs[table] = TableSpec(
                table,
                tuple(c.name for c in table.columns),
                tuple(c.name for c in table.primary_key.columns),
                _converter(table, self.dialect),
            )
        return found

    def insert(self, spec: TableSpec) -> str:
        sql = self._insert.get(spec.table)
        if sql is None:
            sql = self._insert[spec.table] = self._insert_sql(spec)
        return sql

    def upsert(self, spec: TableSpec) -> str:
        sql = self._upsert.get(spec.table)
        if sql is None:
            rest = [c for c in spec.columns if c not in spec.key]
            action = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in rest) if rest else ""
            conflict = ", ".join(_q(c) for c in spec.key)
            tail = (
                f" ON CONFLICT ({conflict}) DO UPDATE SET {action}" if rest else f" ON CONFLICT ({conflict}) DO NOTHING"
            )
            sql = self._upsert[spec.table] = self._insert_sql(spec) + tail
        return sql

    def delete(self, spec: TableSpec, column: str) -> str:
        sql = self._delete.get((spec.table, column))
        if sql is None:
            where = "= ANY($1::text[])" if self.dialect == "postgresql" else "IN (SELECT value FROM json_each(?))"
            sql = self._delete[(spec.table, column)] = f"DELETE FROM {self.name(spec.table)} WHERE {_q(column)} {where}"
        return sql

    def _insert_sql(self, spec: TableSpec) -> str:
        cols = ", ".join(_q(c) for c in spec.columns)
        if self.dialect != "postgresql":
            marks = ", ".join("?" for _ in spec.columns)
            return f"INSERT INTO {self.name(spec.table)} ({cols}) VALUES ({marks})"
        arrays, picks = [], []
        for i, col in enumerate(spec.table.columns, start=1):
            pg = _pg_type(col.type)
            arrays.append(f"${i}::{pg}[]")
            picks.append(f"u.{_q(col.name)}::jsonb" if isinstance(col.type, JSON) else f"u.{_q(col.name)}")
        return (
            f"INSERT INTO {self.name(spec.table)} ({cols}) SELECT {', '.join(picks)}"
            f" FROM unnest({', '.join(arrays)}) AS u({cols})"
        )


def _pg_type(typ: Any) -> str:
    if isinstance(typ, JSON):
        return "text"
    if isinstance(typ, BigInteger):
        return "int8"
    if isinstance(typ, Integer):
        return "int4"
    if isinstance(typ, Boolean):
        return "bool"
    if isinstance(typ, DateTime):
        return "timestamptz"
    return "text"


_STATEMENTS: dict[tuple[str, str | None], Statements] = {}


def statements(dialect: str, schema: str | None = None) -> Statements:
    """The (cached) statements of one dialect and schema."""
    key = (dialect, schema)
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = Statements(dialect, schema)
    return found


class SqliteSql:
    """A transaction on a blocking ``sqlite3`` connection; its methods never suspend."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.st = statements("sqlite")

    async def position(self, name: str, *, lock: bool) -> int | None:
        row = self.conn.execute(self.st.position_sql, (name,)).fetchone()  # BEGIN IMMEDIATE holds the lock
        return None if row is None else int(row[0])

    async def cas(self, name: str, expected: int, new: int, now: dt.datetime) -> bool:
        cur = self.conn.execute(self.st.cas_sql, (new, self.st.timestamp(now), name, expected))
        return cur.rowcount == 1

    async def create_position(self, name: str, new: int, now: dt.datetime) -> None:
        try:
            self.conn.execute(self.st.create_sql, (name, new, self.st.timestamp(now)))
        except sqlite3.IntegrityError as exc:
            raise ProjectionConflict(f"projection {name!r} was started concurrently") from exc

    async def insert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        self.conn.executemany(self.st.insert(spec), rows)

    async def upsert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        self.conn.executemany(self.st.upsert(spec), rows)

    async def delete(self, spec: TableSpec, column: str, ids: Sequence[str]) -> None:
        self.conn.execute(self.st.delete(spec, column), (json.dumps(list(ids)),))

    async def load(self, aggregate_type: str, ids: Sequence[str]) -> list[tuple[str, int, str | None]]:
        cur = self.conn.execute(self.st.load_sql, (aggregate_type, json.dumps(list(ids))))
        return [(r[0], int(r[1]), r[2]) for r in cur.fetchall()]


class AlchemySql:
    """The same SQL through an async SQLAlchemy connection (in-memory SQLite: one shared connection)."""

    dialect = "sqlite"

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.st = statements("sqlite")

    async def position(self, name: str, *, lock: bool) -> int | None:
        row = (await self.conn.exec_driver_sql(self.st.position_sql, (name,))).first()
        return None if row is None else int(row[0])

    async def cas(self, name: str, expected: int, new: int, now: dt.datetime) -> bool:
        res = await self.conn.exec_driver_sql(self.st.cas_sql, (new, self.st.timestamp(now), name, expected))
        return bool(res.rowcount == 1)

    async def create_position(self, name: str, new: int, now: dt.datetime) -> None:
        from sqlalchemy.exc import IntegrityError

        try:
            await self.conn.exec_driver_sql(self.st.create_sql, (name, new, self.st.timestamp(now)))
        except IntegrityError as exc:
            raise ProjectionConflict(f"projection {name!r} was started concurrently") from exc

    async def insert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        await self.conn.exec_driver_sql(self.st.insert(spec), list(rows))

    async def upsert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        await self.conn.exec_driver_sql(self.st.upsert(spec), list(rows))

    async def delete(self, spec: TableSpec, column: str, ids: Sequence[str]) -> None:
        await self.conn.exec_driver_sql(self.st.delete(spec, column), (json.dumps(list(ids)),))

    async def load(self, aggregate_type: str, ids: Sequence[str]) -> list[tuple[str, int, str | None]]:
        res = await self.conn.exec_driver_sql(self.st.load_sql, (aggregate_type, json.dumps(list(ids))))
        return [(r[0], int(r[1]), r[2]) for r in map(tuple, res.fetchall())]


class PgSql:
    """A transaction on an asyncpg connection: one statement per table, columns as arrays."""

    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection, schema: str | None) -> None:
        self.conn = conn
        self.st = statements("postgresql", schema)

    async def position(self, name: str, *, lock: bool) -> int | None:
        sql = self.st.position_sql + (" FOR UPDATE" if lock else "")  # serialises projectors sharing a name
        value = await self.conn.fetchval(sql, name)
        return None if value is None else int(value)

    async def cas(self, name: str, expected: int, new: int, now: dt.datetime) -> bool:
        status = await self.conn.execute(self.st.cas_sql, new, now, name, expected)
        return bool(status == "UPDATE 1")

    async def create_position(self, name: str, new: int, now: dt.datetime) -> None:
        try:
            await self.conn.execute(self.st.create_sql, name, new, now)
        except asyncpg.UniqueViolationError as exc:
            raise ProjectionConflict(f"projection {name!r} was started concurrently") from exc

    async def insert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        await self.conn.execute(self.st.insert(spec), *_columns(spec, rows))

    async def upsert(self, spec: TableSpec, rows: Sequence[Values]) -> None:
        await self.conn.execute(self.st.upsert(spec), *_columns(spec, rows))

    async def delete(self, spec: TableSpec, column: str, ids: Sequence[str]) -> None:
        await self.conn.execute(self.st.delete(spec, column), list(ids))

    async def load(self, aggregate_type: str, ids: Sequence[str]) -> list[tuple[str, int, str | None]]:
        rows = await self.conn.fetch(self.st.load_sql, aggregate_type, list(ids))
        return [(r[0], int(r[1]), r[2]) for r in rows]


def _columns(spec: TableSpec, rows: Sequence[Values]) -> list[list[Any]]:
    """Rows as one list per column (unnest's arrays)."""
    if not rows:
        return [[] for _ in spec.columns]
    return [list(col) for col in zip(*rows, strict=True)]
