"""The sans-IO parts: saga summaries, rows from state, database URLs."""

from __future__ import annotations

import datetime as dt

import pytest

from bus.kinds import Aggregate
from manager.projections import InvalidEvent, UnsupportedDatabase
from manager.projections import tables as t
from manager.projections.engine import create_engine, normalise_url
from manager.projections.fold import fold_event, fold_saga, saga_status
from manager.projections.rows import OWNED, rows_for
from manager.store import StoredEvent

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _ev(event_type: str, data: dict[str, object], agg: str = "saga", agg_id: str = "m1") -> StoredEvent:
    return StoredEvent(1, agg, agg_id, event_type, dict(data), NOW, None, "m")


@pytest.mark.parametrize(
    ("suffix", "status"),
    [
        ("started", "running"),
        ("step_started", "running"),
        ("step_completed", "running"),
        ("step_failed", "running"),
        ("resumed", "running"),
        ("compensation_started", "compensating"),
        ("step_compensated", "compensating"),
        ("completed", "completed"),
        ("compensated", "compensated"),
        ("failed", "failed"),
        ("paused", "paused"),
        ("cancelled", "cancelled"),
    ],
)
def test_saga_status_is_the_event_suffix(suffix: str, status: str) -> None:
    assert saga_status(f"skyferry.v1.saga.{suffix}") == status


def test_a_saga_keeps_its_name_and_counts_events() -> None:
    s = fold_saga(None, _ev("skyferry.v1.saga.started", {"name": "migrate"}))
    s = fold_saga(s, _ev("skyferry.v1.saga.paused", {"name": 3}))  # not a name: keep the old one
    assert s == {
        "id": "m1",
        "name": "migrate",
        "status": "paused",
        "last_event_type": "skyferry.v1.saga.paused",
        "events": 2,
    }
    with pytest.raises(InvalidEvent):
        fold_saga(s, _ev("skyferry.v1.evt.saga.paused", {}))


def test_fold_errors_become_invalid_event() -> None:
    with pytest.raises(InvalidEvent):
        fold_event(Aggregate.OVERLAY, None, _ev("skyferry.v1.evt.overlay.created", {}, "overlay", "o1"))


def test_rows_cover_every_owned_table_and_nothing_once_deleted() -> None:
    state = {"id": "d1", "name": "DC", "vnas": [{"id": "v", "type": "vna", "state": "planned"}]}
    rows = rows_for(Aggregate.DOMAIN, state, 7, NOW)
    assert set(rows) == {table for table, _ in OWNED[Aggregate.DOMAIN]}
    assert rows[t.vnas] == [
        {"domain_id": "d1", "id": "v", "type": "vna", "state": "planned", "external_address": None, "api_uri": None}
    ]
    assert rows_for(Aggregate.DOMAIN, None, 8, NOW) == {}


def test_every_read_model_table_but_the_audit_ones_belongs_to_one_aggregate() -> None:
    owned = [table for tables in OWNED.values() for table, _ in tables]
    assert len(owned) == len(set(owned))
    assert set(owned) == set(t.READ_MODEL_TABLES) - {t.events, t.aggregates}


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_urls_get_the_async_driver(url: str, driver: str) -> None:
    assert normalise_url(url).drivername == driver


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_other_databases_are_refused(url: str) -> None:
    with pytest.raises(UnsupportedDatabase):
        normalise_url(url)


def test_a_schema_is_for_postgresql_only() -> None:
    with pytest.raises(UnsupportedDatabase):
        create_engine("sqlite:///:memory:", schema="x")
