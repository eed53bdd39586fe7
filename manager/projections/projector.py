"""The projector: folds stored events into the SQL read models, exactly once.

Each :meth:`Projector.apply` is one transaction that writes the rows *and*
moves ``projection_position``; events at or below the stored position are
skipped. A crash before commit loses the whole batch (it is redelivered), a
crash after commit only causes a redelivery that the position check skips,
so every event is applied exactly once. The position moves by compare-and-set,
so two projectors sharing a name can never both apply the same batch.

Speed: a batch folds each event once (the manager's ``apply_event``, on states
kept in JSON form) but writes each root's rows once, one statement per table
(:mod:`manager.projections.sql`: plain driver SQL, no per-row ORM work),
upserting one-row tables and leaving alone the tables whose rows did not
change. The folded roots stay cached between batches, as JSON states (whose
records are the fold's memo's own dicts, so a cached application costs a few
objects of its own) and row tuples (which the garbage collector does not track), while the stored position
is the one this projector committed last (any other position, set by another
projector or a rebuild, drops the cache), and the position itself is then moved
by a single compare-and-set. The cyclic garbage collector is paused while a
batch is applied (the batch's objects are freed by reference counting when it
ends, instead of being promoted and rescanned by full collections).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import structlog
from sqlalchemy import Row as SqlRow
from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.schema import CreateSchema

from bus.envelope import utcnow
from bus.kinds import Aggregate
from manager.domain import RecordMemo
from manager.projections import tables as t
from manager.projections.engine import DEFAULT_URL, create_engine, normalise_url, open_sqlite, sqlite_file
from manager.projections.errors import (
    InvalidEvent,
    ProjectionConflict,
    ProjectionError,
    ProjectionGap,
    ProjectionStoreError,
)
from manager.projections.fold import JsonState, aggregate_of, fold_json
from manager.projections.rows import OWNED, Row, rows_for
from manager.projections.sql import (
    AlchemySql,
    PgSql,
    Serialized,
    Sql,
    SqliteSql,
    Statements,
    Values,
    dumps_json,
    loads_json,
)
from manager.store.recorder import StoredEvent

log = structlog.get_logger(__name__)

# Most ids per load or delete statement.
_CHUNK = 500
_CONFLICT_RETRIES = 3
#: Folded roots kept in memory between batches (see :data:`_Cached`).
DEFAULT_CACHE_SIZE = 10_000
#: Events per transaction when replaying the stream: a root touched several times in one
#: batch has its rows written once, so replays go faster with batches of a few thousand.
REPLAY_BATCH = 20_000


@dataclass(frozen=True)
class UndecodableEvent:
    """A stream message that could not even be decoded into a :class:`StoredEvent`."""

    position: int
    subject: str
    error: str


#: What :meth:`Projector.apply` accepts.
Incoming = StoredEvent | UndecodableEvent


class EventSource(Protocol):
    """Anything that replays the stream in order: every recorder, or the runner's tolerant reader."""

    def read_all(self, after: int = 0) -> AsyncIterator[Incoming]: ...


@dataclass(frozen=True)
class ApplyResult:
    """What one :meth:`Projector.apply` did."""

    applied: int
    """Events newly projected (those recorded as errors included)."""
    skipped: int
    """Events at or below the stored position (already applied)."""
    errors: int
    """Events recorded in ``projection_errors`` instead of being folded."""
    position: int
    """Stored position after the commit."""
    committed_at: dt.datetime = field(default_factory=utcnow)
    """When the transaction committed."""


@dataclass(frozen=True)
class RebuildResult:
    """What :meth:`Projector.rebuild` (or :meth:`Projector.catch_up`) did."""

    count: int
    """Events replayed."""
    elapsed: float
    """Seconds taken."""
    position: int
    errors: int


@dataclass(frozen=True)
class AggregateView:
    """One row of ``aggregates``: a root's folded state as projected."""

    aggregate_type: str
    aggregate_id: str
    version: int
    deleted: bool
    state: dict[str, Any] | None
    updated_at: dt.datetime


#: A root's relational rows as written, per table of :data:`OWNED` (driver values, in key order).
Written = tuple[tuple[Values, ...], ...]


@dataclass
class _Root:
    """A root being folded within one batch."""

    aggregate: Aggregate
    id: str
    state: JsonState
    version: int
    text: str | None = None
    """``state`` as JSON text (set when its rows are written)."""
    changed: bool = False
    updated_at: dt.datetime | None = None
    written: Written | None = None
    """Its relational rows as this projector last wrote them (None: unknown, rewrite them all)."""


_Cached = tuple[int, JsonState, Written | None]
"""A root's version, folded state (JSON form) and the rows this projector wrote for it, as committed.

Valid while the stored position is the one the cache was committed at: only a
projector moves the position, and the fold is deterministic, so the database then
holds exactly these states and rows. The batch skips reading and parsing the stored
JSON, and leaves alone the tables whose rows did not change. States are never changed
in place (a fold makes new dicts), so a cached one is shared safely; their records
are the fold memo's dicts, which the next fold recognises without re-encoding them.
The row tuples hold strings and numbers only: the garbage collector untracks them.
"""


_Applied = tuple["ApplyResult", list[_Root] | None]


def _audit_values(ev: StoredEvent, st: Statements) -> Values:
    """The ``events`` row of one event, in column order."""
    return st.spec(t.events).convert(
        {
            "position": ev.position,
            "aggregate_type": ev.aggregate_type,
            "aggregate_id": ev.aggregate_id,
            "event_type": ev.event_type,
            "actor": ev.actor,
            "msg_id": ev.msg_id,
            "correlation_id": ev.correlation_id,
            "causation_id": ev.causation_id,
            "timestamp": _utc(ev.timestamp),
            "data": ev.data,
        }
    )


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """The one place where database errors become :class:`ProjectionStoreError`."""
    try:
        yield
    except ProjectionError:
        raise
    except (SQLAlchemyError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise ProjectionStoreError(f"{what} failed: {exc}", details={"error": type(exc).__name__}) from exc


class _GcPause:
    """Pauses the cyclic garbage collector while at least one batch is being applied.

    Folding a batch allocates many container objects that live until the batch
    ends; with the collector running they survive the young generations and
    trigger full collections of the whole heap several times per batch. Paused,
    they are freed by reference counting when the batch ends (what the cache keeps
    is strings and tuples, which the collector untracks). Process-wide but nested
    safely; never re-enables a collector that was disabled before.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.was_enabled = False

    @contextlib.contextmanager
    def __call__(self, active: bool = True) -> Iterator[None]:
        if not active:
            yield
            return
        if self.depth == 0:
            self.was_enabled = gc.isenabled()
            gc.disable()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.was_enabled:
                gc.enable()


gc_paused = _GcPause()
"""Pause the cyclic garbage collector for a batch (the runner holds it from fetch to ack)."""


def _fresh(events: Sequence[Incoming], after: int) -> list[Incoming]:
    """The events after ``after``, deduplicated, in position order."""
    return sorted({e.position: e for e in events if e.position > after}.values(), key=lambda e: e.position)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite keeps no offset: every stored timestamp is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _one_row_per_root(table: Table, col: Any) -> bool:
    """The table's primary key is the root's id: a root's row there can be upserted."""
    return [c.name for c in table.primary_key.columns] == [col.name]


_KEYS: dict[Table, tuple[str, ...]] = {}


def _in_key_order(table: Table, rows: list[Row]) -> list[Row]:
    """Rows sorted by primary key, so that a list moved around in the state compares equal."""
    if len(rows) < 2:
        return rows
    key = _KEYS.get(table)
    if key is None:
        key = _KEYS[table] = tuple(c.name for c in table.primary_key.columns)
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))


#: Per aggregate type, its tables holding (at most) one row per root.
_SINGLE: dict[Aggregate, frozenset[Table]] = {
    agg: frozenset(table for table, col in owned if _one_row_per_root(table, col)) for agg, owned in OWNED.items()
}


def _plain(row: SqlRow[Any]) -> dict[str, Any]:
    return {k: _utc(v) if isinstance(v, dt.datetime) else v for k, v in row._mapping.items()}


def _run_to_end(step: Coroutine[Any, Any, _Applied]) -> _Applied:
    """Run a coroutine that never suspends (the blocking SQLite path) without an event loop."""
    try:
        step.send(None)
    except StopIteration as done:
        result: _Applied = done.value
        return result
    step.close()
    raise RuntimeError("applying a batch on the blocking connection suspended")


class Projector:
    """SQL read models of the event stream (SQLite by default, PostgreSQL by URL).

    Args:
        engine_url: ``sqlite+aiosqlite:///file.db``, ``sqlite+aiosqlite:///:memory:`` or
            ``postgresql+asyncpg://user@host/db`` (plain ``sqlite://`` / ``postgresql://`` work too).
        name: the projection's name in ``projection_position``.
        schema: PostgreSQL schema holding the tables (created by :meth:`create_schema`).
        cache_size: folded roots kept in memory between batches (0: none).
        pause_gc: pause the cyclic garbage collector while a batch is applied.
    """

    def __init__(
        self,
        engine_url: str | URL = DEFAULT_URL,
        *,
        name: str = "sql",
        schema: str | None = None,
        echo: bool = False,
        cache_size: int = DEFAULT_CACHE_SIZE,
        pause_gc: bool = True,
    ) -> None:
        self.url = normalise_url(engine_url)
        self.name = name
        self.schema = schema
        self.engine = create_engine(self.url, schema=schema, echo=echo)
        self._sqlite_path = sqlite_file(self.url)
        """SQLite file: batches are applied on a blocking connection in :attr:`_worker`."""
        self._worker: ThreadPoolExecutor | None = None
        self._sqlite: sqlite3.Connection | None = None
        """The worker thread's connection (opened there, kept between batches)."""
        self._pg: PoolProxiedConnection | None = None
        """PostgreSQL: the pooled connection whose asyncpg connection applies batches, kept between
        batches (no check-out, pre-ping and reset per batch); dropped on any error."""
        self.cache_size = cache_size
        self.pause_gc = pause_gc
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._cache_at: int | None = None
        """Stored position the cache is valid at (None: empty)."""
        self._memo = RecordMemo()
        """Validated records of the roots folded lately (a fold validates only what an event changed)."""
        self._committed: int | None = None
        """Stored position after this projector's last commit (None: read it)."""
        self._applying = asyncio.Lock()
        """One batch at a time per projector (the cache and the worker thread are not shared)."""
        self._log = log.bind(projection=name, db=self.url.render_as_string(hide_password=True))

    async def close(self) -> None:
        """Close every connection."""
        await self._drop_writer()
        await self.engine.dispose()
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await asyncio.get_running_loop().run_in_executor(worker, self._close_sqlite)
            worker.shutdown(wait=False)

    async def __aenter__(self) -> Projector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- schema -------------------------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create missing tables and the position row (idempotent)."""
        with _db_errors("create_schema"):
            async with self.engine.begin() as conn:
                if self.schema is not None:
                    await conn.execute(CreateSchema(self.schema, if_not_exists=True))
                await conn.run_sync(t.metadata.create_all)
                await self._ensure_position_row(conn)

    async def _ensure_position_row(self, conn: AsyncConnection) -> None:
        values = {"name": self.name, "position": 0, "updated_at": utcnow()}
        pp = t.projection_position
        stmt = (postgresql.insert(pp) if conn.dialect.name == "postgresql" else sqlite.insert(pp)).values(values)
        await conn.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))

    async def rebuild(self, source: EventSource, *, batch_size: int = REPLAY_BATCH) -> RebuildResult:
        """Drop and recreate every table, then replay the whole stream from position 0.

        Each batch commits on its own, so an interrupted rebuild resumes like any
        projection (:meth:`catch_up`). A runner that keeps going meanwhile is
        refused (gap) and restarts its consumer from the rebuilt position.
        """
        start = time.perf_counter()
        async with self._applying:
            self._forget()
            self._committed = None
            await self._drop_writer()  # its prepared statements name the tables about to be dropped
            with _db_errors("rebuild"):
                async with self.engine.begin() as conn:
                    await conn.run_sync(t.metadata.drop_all)
        await self.create_schema()
        result = await self.catch_up(source, batch_size=batch_size)
        elapsed = time.perf_counter() - start
        self._log.info(
            "projection_rebuilt", events=result.count, errors=result.errors, position=result.position, elapsed_s=elapsed
        )
        return dataclasses.replace(result, elapsed=elapsed)

    async def catch_up(self, source: EventSource, *, batch_size: int = REPLAY_BATCH) -> RebuildResult:
        """Apply everything ``source`` holds after the stored position (a one-shot runner).

        The next batch is read from ``source`` while the previous one is being applied.
        """
        start = time.perf_counter()
        count = errors = 0
        position = await self.position()
        pending: asyncio.Task[ApplyResult] | None = None
        batch: list[Incoming] = []

        async def settle() -> None:
            nonlocal count, errors, position, pending
            if pending is not None:
                task, pending = pending, None
                res = await task
                count, errors, position = count + res.applied + res.skipped, errors + res.errors, res.position

        try:
            async for ev in source.read_all(position):
                batch.append(ev)
                if len(batch) >= batch_size:
                    await settle()
                    # the source is the stream: its gaps are real
                    pending = asyncio.create_task(self.apply(batch, allow_gap=True))
                    batch = []
            await settle()
            if batch:
                pending = asyncio.create_task(self.apply(batch, allow_gap=True))
                await settle()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return RebuildResult(count=count, elapsed=time.perf_counter() - start, position=position, errors=errors)

    # --- applying -----------------------------------------------------------------------------------

    async def apply(self, events: Sequence[Incoming], *, allow_gap: bool = False) -> ApplyResult:
        """Project a batch in one transaction; events at or below the stored position are skipped.

        Args:
            events: stored events (or undecodable messages) in any order; duplicates are fine.
            allow_gap: accept a batch that starts after ``position + 1`` (messages deleted from the stream).

        Raises:
            ProjectionGap: the first new event is not ``position + 1`` and ``allow_gap`` is false.
            ProjectionConflict: another projector of the same name kept moving the position (after retries).
            ProjectionStoreError: the database failed; nothing was applied.
        """
        async with self._applying:
            return await self._apply_retrying(events, allow_gap)

    async def _apply_retrying(self, events: Sequence[Incoming], allow_gap: bool) -> ApplyResult:
        attempt = 1
        while True:
            try:
                with _db_errors("apply"), gc_paused(self.pause_gc):
                    try:
                        res, roots = await self._apply_once(events, allow_gap)
                    except BaseException:
                        self._committed = None  # the commit may have happened: read the position next time
                        await self._drop_writer()
                        raise
                    self._committed = res.position
                    if roots is not None:  # committed: only now may later batches rely on these states
                        self._remember(roots, res.position)
                        roots.clear()  # the executor's future may outlive the call: free the states now
                return dataclasses.replace(res, committed_at=utcnow())
            except ProjectionConflict:
                # Someone else applied meanwhile: re-reading the position turns their work into skips.
                if attempt >= _CONFLICT_RETRIES:
                    raise
                self._log.info("projection_conflict_retry", attempt=attempt)
                attempt += 1
            except ProjectionStoreError as exc:
                # A prepared statement outlived a schema change (a rebuild elsewhere): once more, afresh.
                if attempt >= _CONFLICT_RETRIES or not isinstance(exc.__cause__, asyncpg.InvalidCachedStatementError):
                    raise
                attempt += 1

    async def _apply_once(self, events: Sequence[Incoming], allow_gap: bool) -> _Applied:
        """One transaction on the backend's write connection."""
        if self._sqlite_path is not None:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"projector-{self.name}")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._worker, self._apply_sqlite, events, allow_gap)
        if self.url.get_backend_name() == "postgresql":
            if self._pg is None:
                self._pg = await self.engine.raw_connection()
                # Commits are not waited for on the WAL flush: a database crash loses the last
                # batches, position included (one transaction), and the runner applies them again.
                fresh: asyncpg.Connection = self._pg.driver_connection
                await fresh.execute("SET synchronous_commit = off")
            conn: asyncpg.Connection = self._pg.driver_connection
            async with conn.transaction():
                return await self._apply(PgSql(conn, self.schema), events, allow_gap)
        async with self.engine.begin() as aconn:  # in-memory SQLite: the engine's one connection
            return await self._apply(AlchemySql(aconn), events, allow_gap)

    def _apply_sqlite(self, events: Sequence[Incoming], allow_gap: bool) -> _Applied:
        """:meth:`_apply` in one ``BEGIN IMMEDIATE`` transaction (runs in the worker thread)."""
        conn = self._sqlite
        if conn is None:
            assert self._sqlite_path is not None
            conn = self._sqlite = open_sqlite(self._sqlite_path)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock first: two writers queue instead of deadlocking
            result = _run_to_end(self._apply(SqliteSql(conn), events, allow_gap))
            conn.execute("COMMIT")
        except BaseException:
            self._close_sqlite()  # rolls back whatever is open; the next batch reconnects
            raise
        return result

    def _close_sqlite(self) -> None:
        conn, self._sqlite = self._sqlite, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def _drop_writer(self) -> None:
        writer, self._pg = self._pg, None
        if writer is not None:
            with contextlib.suppress(Exception):  # it may be the broken one
                writer.invalidate()

    async def _apply(self, sql: Sql, events: Sequence[Incoming], allow_gap: bool) -> _Applied:
        known = self._committed
        if known is not None:
            # Fast path: the batch follows our last commit; one compare-and-set checks that
            # nobody moved the position since (else read it and start over).
            fresh = _fresh(events, known)
            if (
                fresh
                and fresh[0].position == known + 1
                and await sql.cas(self.name, known, fresh[-1].position, utcnow())
            ):
                return await self._project(sql, events, fresh, known)
        stored = await sql.position(self.name, lock=True)
        base = stored or 0
        fresh = _fresh(events, base)
        if not fresh:
            return ApplyResult(applied=0, skipped=len(events), errors=0, position=base), None
        if fresh[0].position != base + 1:
            if not allow_gap:
                raise ProjectionGap(
                    f"batch starts at {fresh[0].position}, projection is at {base}",
                    details={"position": base, "first": fresh[0].position},
                )
            self._log.warning("projection_gap", position=base, first=fresh[0].position)
        await self._advance(sql, stored, fresh[-1].position)
        return await self._project(sql, events, fresh, base)

    async def _project(
        self, sql: Sql, events: Sequence[Incoming], fresh: list[Incoming], base: int
    ) -> tuple[ApplyResult, list[_Root]]:
        """Write ``fresh`` (the events after ``base``, the position already moved past them)."""
        if base != self._cache_at:  # another projector or a rebuild moved the position: cache is stale
            self._forget()
        good = [e for e in fresh if isinstance(e, StoredEvent)]
        errors = [self._error_row(e, e.error) for e in fresh if isinstance(e, UndecodableEvent)]
        if good:
            await sql.insert(sql.st.spec(t.events), [_audit_values(e, sql.st) for e in good])
        roots = await self._load_roots(sql, good, errors)
        for ev in good:
            root = roots.get((ev.aggregate_type, ev.aggregate_id))
            if root is None:  # its aggregate type or stored state was refused: already in errors
                continue
            try:
                root.state = fold_json(root.aggregate, root.state, ev, self._memo)
            except InvalidEvent as exc:
                errors.append(self._error_row(ev, exc.message))
                continue
            root.version, root.updated_at, root.changed = ev.position, ev.timestamp, True
        await self._write_roots(sql, [r for r in roots.values() if r.changed])
        if errors:
            spec = sql.st.spec(t.projection_errors)
            await sql.insert(spec, [spec.convert(e) for e in errors])
            for e in errors:
                self._log.warning("projection_event_skipped", **{k: v for k, v in e.items() if k != "recorded_at"})
        new = fresh[-1].position
        result = ApplyResult(applied=len(fresh), skipped=len(events) - len(fresh), errors=len(errors), position=new)
        return result, list(roots.values())

    def _forget(self) -> None:
        self._cache.clear()
        self._cache_at = None

    def _remember(self, roots: Iterable[_Root], position: int) -> None:
        cache = self._cache
        for r in roots:
            key = (r.aggregate.value, r.id)
            cache[key] = (r.version, r.state, r.written)
            cache.move_to_end(key)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        self._cache_at = position

    async def _advance(self, sql: Sql, stored: int | None, new: int) -> None:
        """Compare-and-set the position: the guard that makes applying exactly-once."""
        now = utcnow()
        if stored is None:  # no row yet (create_schema inserts one): the primary key is the guard
            await sql.create_position(self.name, new, now)
            return
        if not await sql.cas(self.name, stored, new, now):
            raise ProjectionConflict(
                f"projection {self.name!r} moved past {stored} concurrently", details={"expected": stored}
            )

    async def _load_roots(
        self, sql: Sql, good: Sequence[StoredEvent], errors: list[Row]
    ) -> dict[tuple[str, str], _Root]:
        """Current state of every root the batch touches: from the cache, else from ``aggregates``."""
        wanted: dict[str, dict[str, list[StoredEvent]]] = {}
        for ev in good:
            wanted.setdefault(ev.aggregate_type, {}).setdefault(ev.aggregate_id, []).append(ev)
        roots: dict[tuple[str, str], _Root] = {}
        cache = self._cache
        for agg_type, by_id in wanted.items():
            try:
                agg = aggregate_of(agg_type)
            except InvalidEvent as exc:
                errors += [self._error_row(ev, exc.message) for evs in by_id.values() for ev in evs]
                continue
            missing: list[str] = []
            bad: set[str] = set()
            found: dict[str, _Cached] = {}
            for agg_id in by_id:
                hit = cache.get((agg_type, agg_id))
                if hit is None:
                    missing.append(agg_id)
                else:
                    found[agg_id] = hit
            for i in range(0, len(missing), _CHUNK):
                for agg_id, version, text in await sql.load(agg_type, missing[i : i + _CHUNK]):
                    try:
                        found[agg_id] = (version, None if text is None else loads_json(text), None)
                    except ValueError:
                        errors += [
                            self._error_row(ev, "stored state is not JSON; rebuild the projection")
                            for ev in by_id[agg_id]
                        ]
                        bad.add(agg_id)
            for agg_id in by_id:
                if agg_id in bad:
                    continue
                version, state, written = found.get(agg_id, (0, None, None))
                roots[(agg_type, agg_id)] = _Root(agg, agg_id, state, version, written=written)
        return roots

    async def _write_roots(self, sql: Sql, roots: list[_Root]) -> None:
        """Rewrite the rows of the changed roots.

        ``aggregates`` and one-row-per-root tables are upserted; other tables get the
        root's rows deleted and inserted. A table whose rows for a root are exactly
        what this projector wrote for its previous version (known from the cache) is
        left alone.
        """
        st = sql.st
        agg_spec = st.spec(t.aggregates)
        upserts: dict[Table, list[Values]] = {t.aggregates: []}
        inserts: dict[Table, list[Values]] = {}
        stale: dict[Table, tuple[str, list[str]]] = {}
        for r in roots:
            agg = r.aggregate
            assert r.updated_at is not None  # set by the event that changed it
            state = r.state
            r.text = None if state is None else dumps_json(state)
            at = _utc(r.updated_at)
            upserts[t.aggregates].append(
                agg_spec.convert(
                    {
                        "aggregate_type": agg.value,
                        "aggregate_id": r.id,
                        "version": r.version,
                        "deleted": state is None,
                        "state": None if r.text is None else Serialized(r.text),
                        "updated_at": at,
                    }
                )
            )
            owned = rows_for(agg, state, r.version, at)
            before = r.written
            single = _SINGLE[agg]
            written: list[tuple[Values, ...]] = []
            for i, (table, col) in enumerate(OWNED[agg]):
                spec = st.spec(table)
                rows = tuple(spec.convert(row) for row in _in_key_order(table, owned.get(table, [])))
                written.append(rows)
                if before is not None and before[i] == rows:
                    continue
                if rows and table in single:
                    upserts.setdefault(table, []).extend(rows)
                    continue
                stale.setdefault(table, (col.name, []))[1].append(r.id)
                inserts.setdefault(table, []).extend(rows)
            r.written = tuple(written)
        for table, (column, ids) in stale.items():
            for i in range(0, len(ids), _CHUNK):
                await sql.delete(st.spec(table), column, ids[i : i + _CHUNK])
        for table, values in upserts.items():
            if values:
                await sql.upsert(st.spec(table), values)
        for table, values in inserts.items():
            if values:
                await sql.insert(st.spec(table), values)

    def _error_row(self, ev: Incoming, error: str) -> Row:
        row: Row = {
            "projection": self.name,
            "position": ev.position,
            "subject": None,
            "aggregate_type": None,
            "aggregate_id": None,
            "event_type": None,
            "error": error,
            "recorded_at": utcnow(),
        }
        if isinstance(ev, UndecodableEvent):
            return row | {"subject": ev.subject}
        try:
            subject: str | None = ev.subject
        except ValueError:  # a token that is not subject-safe: keep the rest of the record
            subject = None
        return row | {
            "subject": subject,
            "aggregate_type": ev.aggregate_type,
            "aggregate_id": ev.aggregate_id,
            "event_type": ev.event_type,
        }

    async def _read_position(self, conn: AsyncConnection) -> int | None:
        pp = t.projection_position
        value = (await conn.execute(select(pp.c.position).where(pp.c.name == self.name))).scalar_one_or_none()
        return None if value is None else int(value)

    # --- queries ------------------------------------------------------------------------------------

    async def position(self) -> int:
        """Position of the last event projected (0 if none)."""
        with _db_errors("position"):
            async with self.engine.connect() as conn:
                return await self._read_position(conn) or 0

    async def get_state(self, aggregate: Aggregate | str, aggregate_id: str) -> AggregateView | None:
        """The projected state of one root (``deleted=True`` and ``state=None`` once deleted)."""
        a = t.aggregates
        q = select(a).where(a.c.aggregate_type == Aggregate(aggregate).value, a.c.aggregate_id == aggregate_id)
        rows = await self._query(q)
        if not rows:
            return None
        r = rows[0]
        return AggregateView(
            r["aggregate_type"], r["aggregate_id"], int(r["version"]), bool(r["deleted"]), r["state"], r["updated_at"]
        )

    async def list_applications(self, *, state: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``applications`` (optionally in one state), by id."""
        q = select(t.applications).order_by(t.applications.c.id)
        if state is not None:
            q = q.where(t.applications.c.state == state)
        return await self._query(q)

    async def list_sagas(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``sagas`` (optionally with one status), by id."""
        q = select(t.sagas).order_by(t.sagas.c.id)
        if status is not None:
            q = q.where(t.sagas.c.status == status)
        return await self._query(q)

    async def errors(self) -> list[dict[str, Any]]:
        """Events this projection skipped, by position."""
        pe = t.projection_errors
        return await self._query(select(pe).where(pe.c.projection == self.name).order_by(pe.c.position))

    async def count(self, table: Table) -> int:
        """Number of rows in one table."""
        with _db_errors("count"):
            async with self.engine.connect() as conn:
                return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())

    async def snapshot(self, tables: Iterable[Table] = t.READ_MODEL_TABLES) -> dict[str, list[dict[str, Any]]]:
        """Every row of the read-model tables, ordered by primary key (to compare two projections)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for table in tables:
            out[table.name] = await self._query(select(table).order_by(*table.primary_key.columns))
        return out

    async def _query(self, q: Any) -> list[dict[str, Any]]:
        with _db_errors("query"):
            async with self.engine.connect() as conn:
                return [_plain(row) for row in await conn.execute(q)]
