"""The projector: folds stored events into the SQL read models, exactly once.

Each :meth:`Projector.apply` is one transaction that writes the rows *and*
moves ``projection_position``; events at or below the stored position are
skipped. A crash before commit loses the whole batch (it is redelivered), a
crash after commit only causes a redelivery that the position check skips,
so every event is applied exactly once. The position moves by compare-and-set,
so two projectors sharing a name can never both apply the same batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from sqlalchemy import Row as SqlRow
from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateSchema

from bus.envelope import utcnow
from bus.kinds import Aggregate
from manager.projections import tables as t
from manager.projections.engine import DEFAULT_URL, create_engine, normalise_url
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
REPLAY_BATCH = 5_000


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
    """A root's folded state (and the rows this projector wrote for it) as committed at ``version``.

    The fold is deterministic, so a root whose ``aggregates.version`` still equals
    ``version`` has exactly this state: the batch then skips reading and re-validating
    the stored JSON, and leaves alone the tables whose rows did not change. Any other
    version (another projector, a rebuild) reloads the state and rewrites every row.
    """

    version: int
    state: RootState
    written: Rows | None


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """The one place where database errors become :class:`ProjectionStoreError`."""
    try:
        yield
    except ProjectionError:
        raise
    except (SQLAlchemyError, OSError) as exc:
        raise ProjectionStoreError(f"{what} failed: {exc}", details={"error": type(exc).__name__}) from exc


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite keeps no offset: every stored timestamp is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _no_nul(value: Any) -> Any:
    # PostgreSQL text refuses NUL characters, and model strings (names...) do not forbid them.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def _has_nul(row: Row) -> bool:
    return any(v.__class__ is str and "\x00" in v for v in row.values())


async def _insert(conn: AsyncConnection, table: Table, rows: list[Row]) -> None:
    """One executemany; strings cleaned so that no odd value can fail the batch."""
    clean = [{k: _no_nul(v) for k, v in r.items()} if _has_nul(r) else r for r in rows]
    await conn.execute(insert(table), clean)


def _plain(row: SqlRow[Any]) -> dict[str, Any]:
    return {k: _utc(v) if isinstance(v, dt.datetime) else v for k, v in row._mapping.items()}


class Projector:
    """SQL read models of the event stream (SQLite by default, PostgreSQL by URL).

    Args:
        engine_url: ``sqlite+aiosqlite:///file.db``, ``sqlite+aiosqlite:///:memory:`` or
            ``postgresql+asyncpg://user@host/db`` (plain ``sqlite://`` / ``postgresql://`` work too).
        name: the projection's name in ``projection_position``.
        schema: PostgreSQL schema holding the tables (created by :meth:`create_schema`).
    """

    def __init__(
        self,
        engine_url: str | URL = DEFAULT_URL,
        *,
        name: str = "sql",
        schema: str | None = None,
        echo: bool = False,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.url = normalise_url(engine_url)
        self.name = name
        self.schema = schema
        self.engine = create_engine(self.url, schema=schema, echo=echo)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._log = log.bind(projection=name, db=self.url.render_as_string(hide_password=True))

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

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
        self._cache.clear()
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
        attempt = 1
        while True:
            try:
                with _db_errors("apply"):
                    async with self.engine.begin() as conn:
                        res, roots = await self._apply(conn, events, allow_gap)
                self._remember(roots)  # committed: only now may later batches rely on these states
                return dataclasses.replace(res, committed_at=utcnow())
            except ProjectionConflict:
                # Someone else applied meanwhile: re-reading the position turns their work into skips.
                if attempt >= _CONFLICT_RETRIES:
                    raise
                self._log.info("projection_conflict_retry", attempt=attempt)
                attempt += 1

    async def _apply(
        self, conn: AsyncConnection, events: Sequence[Incoming], allow_gap: bool
    ) -> tuple[ApplyResult, Iterable[_Root]]:
        stored = await self._read_position(conn, lock=True)
        base = stored or 0
        fresh = sorted({e.position: e for e in events if e.position > base}.values(), key=lambda e: e.position)
        if not fresh:
            return ApplyResult(applied=0, skipped=len(events), errors=0, position=base), ()
        if fresh[0].position != base + 1:
            if not allow_gap:
                raise ProjectionGap(
                    f"batch starts at {fresh[0].position}, projection is at {base}",
                    details={"position": base, "first": fresh[0].position},
                )
            self._log.warning("projection_gap", position=base, first=fresh[0].position)
        new = fresh[-1].position
        await self._advance(conn, stored, new)
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
        result = ApplyResult(applied=len(fresh), skipped=len(events) - len(fresh), errors=len(errors), position=new)
        return result, roots.values()

    def _remember(self, roots: Iterable[_Root]) -> None:
        cache = self._cache
        for r in roots:
            key = (r.aggregate, r.id)  # a StrEnum: equal to (and hashed as) the aggregate type string
            cache[key] = _Cached(r.version, r.state, r.written)
            cache.move_to_end(key)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    async def _read_position(self, conn: AsyncConnection, *, lock: bool = False) -> int | None:
        pp = t.projection_position
        stmt = select(pp.c.position).where(pp.c.name == self.name)
        if lock:
            stmt = stmt.with_for_update()  # PostgreSQL: serialise projectors; SQLite ignores it
        value = (await conn.execute(stmt)).scalar_one_or_none()
        return None if value is None else int(value)

    async def _advance(self, conn: AsyncConnection, stored: int | None, new: int) -> None:
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
        self, conn: AsyncConnection, good: Sequence[StoredEvent], errors: list[Row]
    ) -> dict[tuple[str, str], _Root]:
        """Current state of every root the batch touches: cached if its version agrees, else from ``aggregates``."""
        wanted: dict[str, dict[str, list[StoredEvent]]] = {}
        for ev in good:
            wanted.setdefault(ev.aggregate_type, {}).setdefault(ev.aggregate_id, []).append(ev)
        roots: dict[tuple[str, str], _Root] = {}
        a = t.aggregates
        for agg_type, by_id in wanted.items():
            try:
                agg = aggregate_of(agg_type)
            except InvalidEvent as exc:
                errors += [self._error_row(ev, exc.message) for evs in by_id.values() for ev in evs]
                continue
            versions: dict[str, int] = {}
            for chunk in _chunks(list(by_id)):
                q = select(a.c.aggregate_id, a.c.version).where(
                    a.c.aggregate_type == agg_type, a.c.aggregate_id.in_(chunk)
                )
                versions |= {row.aggregate_id: int(row.version) for row in await conn.execute(q)}
            cached: dict[str, _Cached] = {}
            for agg_id, version in versions.items():
                hit = self._cache.get((agg_type, agg_id))
                if hit is not None and hit.version == version:
                    cached[agg_id] = hit
            stored: dict[str, SqlRow[Any]] = {}
            for chunk in _chunks([i for i in versions if i not in cached]):
                q = select(a.c.aggregate_id, a.c.version, a.c.state, a.c.updated_at).where(
                    a.c.aggregate_type == agg_type, a.c.aggregate_id.in_(chunk)
                )
                stored |= {row.aggregate_id: row for row in await conn.execute(q)}
            for agg_id, evs in by_id.items():
                hit = cached.get(agg_id)
                if hit is not None:
                    roots[(agg_type, agg_id)] = _Root(agg, agg_id, hit.state, hit.version, None, written=hit.written)
                    continue
                row = stored.get(agg_id)
                try:
                    state = state_from_json(agg, row.state if row else None)
                except InvalidEvent as exc:
                    errors += [self._error_row(ev, exc.message) for ev in evs]
                    continue
                roots[(agg_type, agg_id)] = _Root(
                    agg, agg_id, state, int(row.version) if row else 0, row.updated_at if row else None
                )
        return roots

    async def _write_roots(self, conn: AsyncConnection, roots: list[_Root]) -> None:
        """Rewrite the rows of the changed roots: delete what they owned, insert what they own now.

        A table whose rows for a root are exactly what this projector wrote for the root's
        previous version (known from the cache) is left alone.
        """
        by_agg: dict[Aggregate, list[_Root]] = {}
        for r in roots:
            by_agg.setdefault(r.aggregate, []).append(r)
        a = t.aggregates
        for agg, group in by_agg.items():
            inserts: dict[Table, list[Row]] = {a: []}
            stale: dict[Table, list[str]] = {}
            for r in group:
                assert r.updated_at is not None  # set by the event that changed it
                state = state_to_json(r.state)
                at = _utc(r.updated_at)
                inserts[a].append(
                    {
                        "aggregate_type": agg.value,
                        "aggregate_id": r.id,
                        "version": r.version,
                        "deleted": state is None,
                        "state": state,
                        "updated_at": at,
                    }
                )
                owned: Rows = rows_for(agg, state, r.version, at)
                before = r.written
                for table, _ in OWNED[agg]:
                    rows = owned.get(table, [])
                    if before is not None and before.get(table, []) == rows:
                        continue
                    stale.setdefault(table, []).append(r.id)
                    if rows:
                        inserts.setdefault(table, []).extend(rows)
                r.written = owned
            for chunk in _chunks([r.id for r in group]):
                await conn.execute(delete(a).where(a.c.aggregate_type == agg.value, a.c.aggregate_id.in_(chunk)))
            for table, col in OWNED[agg]:
                for chunk in _chunks(stale.get(table, [])):
                    await conn.execute(delete(table).where(col.in_(chunk)))
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
