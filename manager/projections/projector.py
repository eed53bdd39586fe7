"""The projector: folds stored events into the SQL read models, exactly once.

Each :meth:`Projector.apply` is one transaction that writes the rows *and*
moves ``projection_position``; events at or below the stored position are
skipped. A crash before commit loses the whole batch (it is redelivered), a
crash after commit only causes a redelivery that the position check skips,
so every event is applied exactly once. The position moves by compare-and-set,
so two projectors sharing a name can never both apply the same batch.

Speed: a batch folds each event once (the manager's ``apply_event``) but writes
each root's rows once, upserting one-row tables and leaving alone the tables
whose rows did not change. The folded roots stay cached between batches while
the stored position is the one this projector committed last (any other
position, set by another projector or a rebuild, drops the cache), and the
position itself is then moved by a single compare-and-set. The cyclic garbage
collector is paused while a batch is applied (the batch's objects are freed by
reference counting when it ends, instead of being promoted and rescanned by
full collections several times per batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from sqlalchemy import ColumnElement, String, Table, any_, delete, func, insert, literal, select, update
from sqlalchemy import Row as SqlRow
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, CursorResult, Dialect, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateSchema
from sqlalchemy.sql import Executable

from bus.envelope import utcnow
from bus.kinds import Aggregate
from manager.projections import tables as t
from manager.projections.engine import DEFAULT_URL, create_blocking_engine, create_engine, normalise_url
from manager.projections.errors import (
    InvalidEvent,
    ProjectionConflict,
    ProjectionError,
    ProjectionGap,
    ProjectionStoreError,
)
from manager.projections.fold import RootState, aggregate_of, fold_event, state_from_json, state_to_json
from manager.projections.rows import OWNED, Row, Rows, rows_for
from manager.store.recorder import StoredEvent

log = structlog.get_logger(__name__)

# Bound on bound parameters per IN list (SQLite's limit is far higher; PostgreSQL's is 32767).
_CHUNK = 500
_CONFLICT_RETRIES = 3
#: Folded roots kept in memory between batches (see :class:`_Cached`).
DEFAULT_CACHE_SIZE = 10_000
#: Events per transaction when replaying the stream: a root touched several times in one
#: batch has its rows written once, so replays go faster with batches of a few thousand.
REPLAY_BATCH = 10_000


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


@dataclass
class _Root:
    """A root being folded within one batch."""

    aggregate: Aggregate
    id: str
    state: RootState
    version: int
    updated_at: dt.datetime | None
    changed: bool = False
    written: Rows | None = None
    """Its relational rows as this projector last wrote them (None: unknown, rewrite them all)."""


@dataclass(frozen=True)
class _Cached:
    """A root's folded state, and the rows this projector wrote for it, as committed at ``version``.

    Valid while the stored position is the one the cache was committed at: only a
    projector moves the position, and the fold is deterministic, so the database then
    holds exactly these states and rows. The batch skips reading and re-validating the
    stored JSON, and leaves alone the tables whose rows did not change.
    """

    version: int
    state: RootState
    written: Rows | None


class _BlockingConnection:
    """A blocking SQLAlchemy connection behind the awaitable ``execute`` the apply path uses.

    Its ``execute`` never suspends, so a whole batch runs to completion in the worker
    thread without an event loop (see :meth:`Projector._apply_blocking`).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def dialect(self) -> Dialect:
        return self._conn.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[Any]:
        return self._conn.execute(statement, parameters)


#: What the apply path writes through: the async engine's connection, or the blocking one.
_Conn = AsyncConnection | _BlockingConnection


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """The one place where database errors become :class:`ProjectionStoreError`."""
    try:
        yield
    except ProjectionError:
        raise
    except (SQLAlchemyError, OSError) as exc:
        raise ProjectionStoreError(f"{what} failed: {exc}", details={"error": type(exc).__name__}) from exc


class _GcPause:
    """Pauses the cyclic garbage collector while at least one batch is being applied.

    Folding a batch allocates many container objects that live until the batch
    ends; with the collector running they survive the young generations and
    trigger full collections of the whole heap several times per batch. Paused,
    they are freed by reference counting when the batch ends. Process-wide but
    nested safely; never re-enables a collector that was disabled before.
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


_gc_paused = _GcPause()


def _fresh(events: Sequence[Incoming], after: int) -> list[Incoming]:
    """The events after ``after``, deduplicated, in position order."""
    return sorted({e.position: e for e in events if e.position > after}.values(), key=lambda e: e.position)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _among(col: Any, ids: Sequence[str], dialect: str) -> ColumnElement[bool]:
    """``col IN ids``; on PostgreSQL ``col = ANY(:ids)``, one statement text (prepared once) for any count."""
    if dialect == "postgresql":
        return col == any_(literal(list(ids), postgresql.ARRAY(String)))  # type: ignore[no-any-return]
    return col.in_(ids)  # type: ignore[no-any-return]


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite keeps no offset: every stored timestamp is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _no_nul(value: Any) -> Any:
    # PostgreSQL text refuses NUL characters, and model strings (names...) do not forbid them.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def _has_nul(row: Row) -> bool:
    return any(v.__class__ is str and "\x00" in v for v in row.values())


def _clean(rows: list[Row]) -> list[Row]:
    """Strings cleaned so that no odd value can fail the batch."""
    return [{k: _no_nul(v) for k, v in r.items()} if _has_nul(r) else r for r in rows]


async def _insert(conn: _Conn, table: Table, rows: list[Row]) -> None:
    """One executemany."""
    await conn.execute(insert(table), _clean(rows))


_UPSERTS: dict[tuple[str, Table], Any] = {}


async def _upsert(conn: _Conn, table: Table, rows: list[Row]) -> None:
    """One executemany of ``INSERT ... ON CONFLICT (primary key) DO UPDATE``."""
    dialect = conn.dialect.name
    stmt = _UPSERTS.get((dialect, table))
    if stmt is None:
        ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        pk = [c.name for c in table.primary_key.columns]
        stmt = ins.on_conflict_do_update(
            index_elements=pk, set_={c.name: ins.excluded[c.name] for c in table.columns if c.name not in pk}
        )
        _UPSERTS[(dialect, table)] = stmt
    await conn.execute(stmt, _clean(rows))


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
        self._blocking = create_blocking_engine(self.url, echo=echo)
        """SQLite file: batches are applied on this engine in :attr:`_worker` (one thread hop per batch)."""
        self._worker: ThreadPoolExecutor | None = None
        self._writer: AsyncConnection | None = None
        """PostgreSQL: the connection batches are applied on, kept between batches (no pool
        check-out, pre-ping and reset per batch); dropped on any error."""
        self.cache_size = cache_size
        self.pause_gc = pause_gc
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._cache_at: int | None = None
        """Stored position the cache is valid at (None: empty)."""
        self._committed: int | None = None
        """Stored position after this projector's last commit (None: read it)."""
        self._applying = asyncio.Lock()
        """One batch at a time per projector (the cache and the worker thread are not shared)."""
        self._log = log.bind(projection=name, db=self.url.render_as_string(hide_password=True))

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._drop_writer()
        await self.engine.dispose()
        if self._worker is not None:
            blocking, worker, self._worker = self._blocking, self._worker, None
            if blocking is not None:  # its connections belong to the worker thread: dispose of them there
                await asyncio.get_running_loop().run_in_executor(worker, blocking.dispose)
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
        self._forget()
        self._committed = None
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
        """Apply everything ``source`` holds after the stored position (a one-shot runner)."""
        start = time.perf_counter()
        count = errors = 0
        position = await self.position()
        batch: list[Incoming] = []
        async for ev in source.read_all(position):
            batch.append(ev)
            if len(batch) >= batch_size:
                res = await self.apply(batch, allow_gap=True)  # the source is the stream: its gaps are real
                count, errors, position, batch = count + len(batch), errors + res.errors, res.position, []
        if batch:
            res = await self.apply(batch, allow_gap=True)
            count, errors, position = count + len(batch), errors + res.errors, res.position
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
                with _db_errors("apply"), _gc_paused(self.pause_gc):
                    try:
                        if self._blocking is not None:
                            if self._worker is None:
                                self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"projector-{self.name}")
                            loop = asyncio.get_running_loop()
                            res, roots = await loop.run_in_executor(
                                self._worker, self._apply_blocking, self._blocking, events, allow_gap
                            )
                        elif self.url.get_backend_name() == "postgresql":
                            if self._writer is None:
                                self._writer = await self.engine.connect()
                            async with self._writer.begin():
                                res, roots = await self._apply(self._writer, events, allow_gap)
                        else:
                            async with self.engine.begin() as conn:
                                res, roots = await self._apply(conn, events, allow_gap)
                    except BaseException:
                        self._committed = None  # the commit may have happened: read the position next time
                        await self._drop_writer()
                        raise
                    self._committed = res.position
                    if roots is not None:  # committed: only now may later batches rely on these states
                        self._remember(roots, res.position)
                return dataclasses.replace(res, committed_at=utcnow())
            except ProjectionConflict:
                # Someone else applied meanwhile: re-reading the position turns their work into skips.
                if attempt >= _CONFLICT_RETRIES:
                    raise
                self._log.info("projection_conflict_retry", attempt=attempt)
                attempt += 1

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # it may be the broken one
                await writer.close()

    def _apply_blocking(
        self, engine: Engine, events: Sequence[Incoming], allow_gap: bool
    ) -> tuple[ApplyResult, Iterable[_Root] | None]:
        """:meth:`_apply` in one transaction of the blocking engine (runs in the worker thread)."""
        with engine.begin() as conn:
            step = self._apply(_BlockingConnection(conn), events, allow_gap)
            try:
                step.send(None)
            except StopIteration as done:
                result: tuple[ApplyResult, Iterable[_Root] | None] = done.value
                return result
            step.close()
            raise RuntimeError("applying a batch on the blocking engine suspended")

    async def _apply(
        self, conn: _Conn, events: Sequence[Incoming], allow_gap: bool
    ) -> tuple[ApplyResult, Iterable[_Root] | None]:
        known = self._committed
        if known is not None:
            # Fast path: the batch follows our last commit; one compare-and-set checks that
            # nobody moved the position since (else read it and start over).
            fresh = _fresh(events, known)
            if fresh and fresh[0].position == known + 1 and await self._cas(conn, known, fresh[-1].position):
                return await self._project(conn, events, fresh, known)
        stored = await self._read_position(conn, lock=True)
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
        await self._advance(conn, stored, fresh[-1].position)
        return await self._project(conn, events, fresh, base)

    async def _project(
        self, conn: _Conn, events: Sequence[Incoming], fresh: list[Incoming], base: int
    ) -> tuple[ApplyResult, Iterable[_Root]]:
        """Write ``fresh`` (the events after ``base``, the position already moved past them)."""
        if base != self._cache_at:  # another projector or a rebuild moved the position: cache is stale
            self._forget()
        good = [e for e in fresh if isinstance(e, StoredEvent)]
        errors = [self._error_row(e, e.error) for e in fresh if isinstance(e, UndecodableEvent)]
        if good:
            await _insert(conn, t.events, [self._audit_row(e) for e in good])
        roots = await self._load_roots(conn, good, errors)
        for ev in good:
            root = roots.get((ev.aggregate_type, ev.aggregate_id))
            if root is None:  # its aggregate type or stored state was refused: already in errors
                continue
            try:
                root.state = fold_event(root.aggregate, root.state, ev)
            except InvalidEvent as exc:
                errors.append(self._error_row(ev, exc.message))
                continue
            root.version, root.updated_at, root.changed = ev.position, ev.timestamp, True
        await self._write_roots(conn, [r for r in roots.values() if r.changed])
        if errors:
            await _insert(conn, t.projection_errors, errors)
            for e in errors:
                self._log.warning("projection_event_skipped", **{k: v for k, v in e.items() if k != "recorded_at"})
        new = fresh[-1].position
        result = ApplyResult(applied=len(fresh), skipped=len(events) - len(fresh), errors=len(errors), position=new)
        return result, roots.values()

    def _forget(self) -> None:
        self._cache.clear()
        self._cache_at = None

    def _remember(self, roots: Iterable[_Root], position: int) -> None:
        cache = self._cache
        for r in roots:
            key = (r.aggregate, r.id)  # a StrEnum: equal to (and hashed as) the aggregate type string
            cache[key] = _Cached(r.version, r.state, r.written)
            cache.move_to_end(key)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        self._cache_at = position

    async def _read_position(self, conn: _Conn, *, lock: bool = False) -> int | None:
        pp = t.projection_position
        stmt = select(pp.c.position).where(pp.c.name == self.name)
        if lock:
            stmt = stmt.with_for_update()  # PostgreSQL: serialise projectors; SQLite ignores it
        value = (await conn.execute(stmt)).scalar_one_or_none()
        return None if value is None else int(value)

    async def _cas(self, conn: _Conn, expected: int, new: int) -> bool:
        """Move the position from ``expected`` to ``new``; False if it is not at ``expected``."""
        pp = t.projection_position
        res = await conn.execute(
            update(pp)
            .where(pp.c.name == self.name, pp.c.position == expected)
            .values(position=new, updated_at=utcnow())
        )
        return bool(res.rowcount == 1)

    async def _advance(self, conn: _Conn, stored: int | None, new: int) -> None:
        """Compare-and-set the position: the guard that makes applying exactly-once."""
        pp = t.projection_position
        now = utcnow()
        if stored is None:  # no row yet (create_schema inserts one): the primary key is the guard
            try:
                await conn.execute(insert(pp).values(name=self.name, position=new, updated_at=now))
            except IntegrityError as exc:
                raise ProjectionConflict(f"projection {self.name!r} was started concurrently") from exc
            return
        res = await conn.execute(
            update(pp).where(pp.c.name == self.name, pp.c.position == stored).values(position=new, updated_at=now)
        )
        if res.rowcount != 1:
            raise ProjectionConflict(
                f"projection {self.name!r} moved past {stored} concurrently", details={"expected": stored}
            )

    async def _load_roots(
        self, conn: _Conn, good: Sequence[StoredEvent], errors: list[Row]
    ) -> dict[tuple[str, str], _Root]:
        """Current state of every root the batch touches: from the cache, else from ``aggregates``."""
        wanted: dict[str, dict[str, list[StoredEvent]]] = {}
        for ev in good:
            wanted.setdefault(ev.aggregate_type, {}).setdefault(ev.aggregate_id, []).append(ev)
        roots: dict[tuple[str, str], _Root] = {}
        a = t.aggregates
        cache = self._cache
        for agg_type, by_id in wanted.items():
            try:
                agg = aggregate_of(agg_type)
            except InvalidEvent as exc:
                errors += [self._error_row(ev, exc.message) for evs in by_id.values() for ev in evs]
                continue
            missing: list[str] = []
            for agg_id in by_id:
                hit = cache.get((agg_type, agg_id))
                if hit is None:
                    missing.append(agg_id)
                else:
                    roots[(agg_type, agg_id)] = _Root(agg, agg_id, hit.state, hit.version, None, written=hit.written)
            stored: dict[str, SqlRow[Any]] = {}
            for chunk in _chunks(missing):
                q = select(a.c.aggregate_id, a.c.version, a.c.state, a.c.updated_at).where(
                    a.c.aggregate_type == agg_type, _among(a.c.aggregate_id, chunk, conn.dialect.name)
                )
                stored |= {row.aggregate_id: row for row in await conn.execute(q)}
            for agg_id in missing:
                row = stored.get(agg_id)
                try:
                    state = state_from_json(agg, row.state if row else None)
                except InvalidEvent as exc:
                    errors += [self._error_row(ev, exc.message) for ev in by_id[agg_id]]
                    continue
                roots[(agg_type, agg_id)] = _Root(
                    agg, agg_id, state, int(row.version) if row else 0, row.updated_at if row else None
                )
        return roots

    async def _write_roots(self, conn: _Conn, roots: list[_Root]) -> None:
        """Rewrite the rows of the changed roots.

        ``aggregates`` and one-row-per-root tables are upserted; other tables get the
        root's rows deleted and inserted. A table whose rows for a root are exactly
        what this projector wrote for its previous version (known from the cache) is
        left alone.
        """
        a = t.aggregates
        upserts: dict[Table, list[Row]] = {a: []}
        inserts: dict[Table, list[Row]] = {}
        stale: dict[Table, tuple[Any, list[str]]] = {}
        for r in roots:
            agg = r.aggregate
            assert r.updated_at is not None  # set by the event that changed it
            state = state_to_json(r.state)
            at = _utc(r.updated_at)
            upserts[a].append(
                {
                    "aggregate_type": agg.value,
                    "aggregate_id": r.id,
                    "version": r.version,
                    "deleted": state is None,
                    "state": state,
                    "updated_at": at,
                }
            )
            owned: Rows = {
                table: _in_key_order(table, rows) for table, rows in rows_for(agg, state, r.version, at).items()
            }
            before = r.written
            single = _SINGLE[agg]
            for table, col in OWNED[agg]:
                rows = owned.get(table, [])
                if before is not None and before.get(table, []) == rows:
                    continue
                if rows and table in single:
                    upserts.setdefault(table, []).extend(rows)
                    continue
                stale.setdefault(table, (col, []))[1].append(r.id)
                inserts.setdefault(table, []).extend(rows)
            r.written = owned
        for table, (col, ids) in stale.items():
            for chunk in _chunks(ids):
                await conn.execute(delete(table).where(_among(col, chunk, conn.dialect.name)))
        for table, rows in upserts.items():
            if rows:
                await _upsert(conn, table, rows)
        for table, rows in inserts.items():
            if rows:
                await _insert(conn, table, rows)

    def _audit_row(self, ev: StoredEvent) -> Row:
        return {
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

    def _error_row(self, ev: Incoming, error: str) -> Row:
        # Every row has every key: an executemany takes its columns from the first row.
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
