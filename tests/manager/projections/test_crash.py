"""Exactly-once through crashes: a projector process SIGKILLed at any point of a batch.

A child process applies the stream batch by batch and is killed at one of three
points of a chosen batch: just after the position moved (compare-and-set done, no
rows yet), after every row of the batch is written (not yet committed), and right
after the commit (before the caller heard of it). A fresh process then carries on
from the stored position. In the end the read model must equal a projection built
in one go: nothing applied twice, nothing skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bench.bench_events import event_for, make_targets
from manager.projections import Projector
from manager.projections import tables as t
from manager.store import StoredEvent
from tests.manager.projections.conftest import PG_URL

EVENTS = 240
BATCH = 25
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def history() -> list[StoredEvent]:
    """A deterministic stream: overlays and applications, created then updated."""
    targets = make_targets(12, 0.25)
    out: list[StoredEvent] = []
    while len(out) < EVENTS:
        for tg in targets:
            ev = event_for(tg, tg.written, "crash")
            tg.written += 1
            pos = len(out) + 1
            ts = T0 + dt.timedelta(milliseconds=pos)
            out.append(StoredEvent(pos, tg.kind, tg.id, ev.event_type, ev.data, ts, ev.actor, ev.msg_id))
    return out[:EVENTS]


def _report(marker: str, what: dict[str, Any]) -> None:
    Path(marker).write_text(json.dumps(what))


def _child(url: str, schema: str | None, stage: str | None, kill_batch: int, marker: str) -> None:
    """Apply the stream from the stored position; at ``stage`` of batch ``kill_batch``, report and hang."""
    asyncio.run(_child_main(url, schema, stage, kill_batch, marker))


async def _child_main(url: str, schema: str | None, stage: str | None, kill_batch: int, marker: str) -> None:
    events = history()
    projector = Projector(url, schema=schema)
    batch = {"n": 0, "before": 0, "through": 0}

    def hang(point: str) -> None:
        if point == stage and batch["n"] == kill_batch:
            _report(marker, {"stage": point, **batch})
            time.sleep(120)  # the parent kills the process here

    real_load, real_write, real_remember = Projector._load_roots, Projector._write_roots, Projector._remember

    async def load_roots(self: Projector, *args: Any) -> Any:
        hang("positioned")  # the events copy and the position's compare-and-set are done, no roots yet
        return await real_load(self, *args)

    async def write_roots(self: Projector, *args: Any) -> None:
        await real_write(self, *args)
        hang("rows")  # every row of the batch written, not committed

    def remember(self: Projector, *args: Any) -> None:
        real_remember(self, *args)
        hang("committed")  # committed; apply() has not returned

    Projector._load_roots = load_roots  # type: ignore[method-assign]
    Projector._write_roots = write_roots  # type: ignore[method-assign]
    Projector._remember = remember  # type: ignore[method-assign]
    await projector.create_schema()
    position = await projector.position()
    while position < len(events):
        batch.update(before=position, through=min(position + BATCH, len(events)))
        res = await projector.apply(events[position : position + BATCH])
        position = res.position
        batch["n"] += 1
    await projector.close()
    _report(marker, {"stage": "done", **batch})


def _run(url: str, schema: str | None, stage: str | None, kill_batch: int, marker: Path) -> dict[str, Any]:
    """One child process; SIGKILL it when it reports ``stage``. Returns what it reported."""
    marker.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_child, args=(url, schema, stage, kill_batch, str(marker)))
    proc.start()
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert proc.is_alive() or marker.exists(), f"child exited with {proc.exitcode}"
        assert time.monotonic() < deadline, "child never reached its kill point"
        time.sleep(0.02)
    report: dict[str, Any] = json.loads(marker.read_text())
    if stage is not None and proc.pid is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    if stage is not None:
        assert proc.exitcode == -signal.SIGKILL
    return report


async def _check_crashes(url: str, schema: str | None, tmp_path: Path) -> None:
    marker = tmp_path / "marker.json"
    # Kill in a process's first batch (position read under lock) and in a later one (fast-path CAS).
    plan = [(stage, n) for n in (0, 2) for stage in ("positioned", "rows", "committed")]
    async with Projector(url, schema=schema) as probe:
        for stage, kill_batch in plan:
            report = _run(url, schema, stage, kill_batch, marker)
            assert report["stage"] == stage
            stored = await probe.position()
            # Killed before the commit: the batch left nothing, position included; after it: all of it.
            expected = report["through"] if stage == "committed" else report["before"]
            assert stored == expected, (stage, kill_batch, report)
            assert await probe.count(t.events) == expected
        assert _run(url, schema, None, -1, marker)["stage"] == "done"
        assert await probe.position() == EVENTS
        got = await probe.snapshot()
        assert await probe.errors() == []

    async with Projector(f"sqlite+aiosqlite:///{tmp_path / 'clean.db'}") as clean:
        await clean.create_schema()
        await clean.apply(history())
        want = await clean.snapshot()
    assert [r["position"] for r in got["events"]] == list(range(1, EVENTS + 1))  # each once, none missing
    assert got == want


async def test_sqlite_survives_a_kill_at_any_point(tmp_path: Path) -> None:
    await _check_crashes(f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}", None, tmp_path)


@pytest.mark.postgres
async def test_postgres_survives_a_kill_at_any_point(tmp_path: Path) -> None:
    import uuid

    import asyncpg

    dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    try:
        admin = await asyncpg.connect(dsn, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc!r}")
    schema = f"sf_crash_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        await _check_crashes(PG_URL, schema, tmp_path)
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
