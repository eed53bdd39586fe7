"""One contract, every database: SQLite and PostgreSQL project the same stream into the same rows."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from typing import Any

import pytest

from bus.kinds import Aggregate
from bus.messages import event_type
from manager.projections import (
    ProjectionGap,
    ProjectionStoreError,
    Projector,
    UndecodableEvent,
)
from manager.projections import tables as t
from manager.store import MemoryRecorder, NewEvent, StoredEvent
from manager.store.repository import fold
from tests.manager.projections.conftest import MakeProjector
from tests.manager.projections.samples import HISTORY, overlay, record


async def _history() -> tuple[MemoryRecorder, list[StoredEvent]]:
    recorder = MemoryRecorder()
    await record(recorder, HISTORY)
    return recorder, [e async for e in recorder.read_all()]


def _rows(snap: dict[str, list[dict[str, Any]]], table: str, *drop: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in drop} for r in snap[table]]


class ProjectorContract:
    """Subclasses provide ``db``: a factory of projectors sharing one fresh database."""

    @pytest.fixture
    async def projector(self, db: MakeProjector) -> Projector:
        p = db()
        await p.create_schema()
        return p

    async def test_builds_the_expected_rows(self, projector: Projector) -> None:
        _, events = await _history()
        res = await projector.apply(events)
        assert (res.applied, res.skipped, res.errors, res.position) == (len(events), 0, 0, len(events))
        assert await projector.position() == len(events)
        snap = await projector.snapshot()

        assert _rows(snap, "overlays") == [
            {
                "id": "ovnet10",
                "name": "OVNET ten",
                "description": "",
                "vni": 10,
                "optimisation_policy": "min-latency",
                "version": 4,
            },
            {
                "id": "ovnet11",
                "name": "OVNET 11",
                "description": "",
                "vni": 11,
                "optimisation_policy": "balanced",
                "version": 2,
            },
        ]
        assert _rows(snap, "network_domains", "description") == [
            {"id": "dc1", "name": "Primary data center", "version": 13}
        ]
        assert _rows(snap, "vnas") == [
            {
                "domain_id": "dc1",
                "id": "vna1",
                "type": "vna",
                "state": "running",
                "external_address": "192.0.2.1",
                "api_uri": None,
            }
        ]
        assert _rows(snap, "resource_domains", "api_uri") == [
            {"domain_id": "dc1", "id": "rd1", "name": "Lab", "vendor": "lab", "kind": "private-dc"}
        ]
        assert _rows(snap, "local_overlay_networks") == [
            {
                "domain_id": "dc1",
                "overlay_id": "ovnet10",
                "vlan_ids": [10, 20],
                "provide_tunnel_server": True,
                "tunnel_mode": "stream",
                "trusted": False,
            }
        ]
        assert _rows(snap, "applications") == [
            {
                "id": "web",
                "name": "Web shop",
                "state": "shutting-down",
                "status_level": "warning",
                "status_detail": "maintenance",
                "parent_id": None,
                "version": 18,
            }
        ]
        assert [
            (n["id"], n["name"], n["server_id"], n["deploy_priority"], n["capture_priority"]) for n in snap["nodes"]
        ] == [
            ("db1", "Database server", "srv2", 100, 5),
            ("web1", "Web 1", "srv1", 10, 100),
        ]
        assert [
            (i["node_id"], i["name"], i["address"], i["prefix_len"], i["mac"]) for i in snap["node_interfaces"]
        ] == [
            ("db1", "eth0", "10.1.1.20", 24, None),
            ("web1", "eth0", "10.1.1.10", 24, None),
            ("web1", "eth1", None, None, "52:54:00:00:01:10"),
        ]
        assert [(p["id"], p["prime_node"], p["min_nodes"], p["max_nodes"]) for p in snap["node_pools"]] == [
            ("pool1", "web1", 1, 4)
        ]
        assert [
            (n["id"], n["production_overlay_id"], n["fence_overlay_id"], n["subnet"])
            for n in snap["application_networks"]
        ] == [
            ("dmz", "ovnet11", "ovnet10", None),
            ("lan1", "ovnet10", None, "10.1.1.0/24"),
        ]
        assert _rows(snap, "databases") == [
            {"app_id": "web", "id": "orders", "node_id": "db1", "migrate_mode": "sync", "target_location": None}
        ]
        assert _rows(snap, "users") == [
            {
                "id": "alice",
                "display_name": "Alice A.",
                "groups": ["ops"],
                "authorisations": ["network-read"],
                "disabled": True,
                "version": 22,
            }
        ]
        assert _rows(snap, "sagas", "updated_at") == [
            {
                "id": "mig1",
                "name": "migrate-web",
                "status": "completed",
                "last_event_type": "skyferry.v1.saga.completed",
                "version": 26,
            },
            {
                "id": "mig2",
                "name": "migrate-db",
                "status": "compensating",
                "last_event_type": "skyferry.v1.saga.step_compensated",
                "version": 28,
            },
        ]
        assert snap["sagas"][0]["updated_at"] == events[25].timestamp
        assert [r["position"] for r in snap["events"]] == list(range(1, len(events) + 1))
        assert snap["events"][0]["actor"] == "admin" and snap["events"][0]["correlation_id"] == "c-0"
        assert snap["events"][15]["data"]["map"]["application"]["id"] == "web"
        deleted = {(r["aggregate_type"], r["aggregate_id"]) for r in snap["aggregates"] if r["deleted"]}
        assert deleted == {("overlay", "ovnet12"), ("domain", "dc2"), ("app", "tmp")}
        assert await projector.errors() == []

    async def test_aggregate_state_equals_the_managers_fold(self, projector: Projector) -> None:
        recorder, events = await _history()
        for i in range(0, len(events), 5):  # incrementally, state carried over in `aggregates`
            await projector.apply(events[i : i + 5])
        for agg, agg_id in {(e.aggregate_type, e.aggregate_id) for e in events if e.aggregate_type != "saga"}:
            loaded = fold(Aggregate(agg), agg_id, await recorder.read(agg, agg_id))
            view = await projector.get_state(agg, agg_id)
            assert view is not None
            assert view.version == loaded.version
            assert view.deleted is (loaded.state is None)
            assert view.state == (loaded.state.model_dump(mode="json") if loaded.state else None)
        assert await projector.get_state(Aggregate.APP, "nope") is None
        assert [a["id"] for a in await projector.list_applications()] == ["web"]
        assert await projector.list_applications(state="running") == []
        assert [s["id"] for s in await projector.list_sagas(status="completed")] == ["mig1"]

    async def test_reapplying_is_a_no_op(self, projector: Projector) -> None:
        _, events = await _history()
        await projector.apply(events[:20])
        before = await projector.snapshot()
        res = await projector.apply(events[:20])
        assert (res.applied, res.skipped, res.position) == (0, 20, 20)
        assert await projector.snapshot() == before
        res = await projector.apply(events[10:] + events[15:25])  # overlapping, duplicated, out of order
        assert (res.applied, res.position) == (len(events) - 20, len(events))
        assert await projector.count(t.events) == len(events)

    async def test_rebuild_gives_the_incremental_rows(self, projector: Projector) -> None:
        recorder, events = await _history()
        for i in range(0, len(events), 3):
            await projector.apply(events[i : i + 3])
        incremental = await projector.snapshot()
        result = await projector.rebuild(recorder, batch_size=7)
        assert (result.count, result.position, result.errors) == (len(events), len(events), 0)
        assert result.elapsed > 0
        assert await projector.snapshot() == incremental
        assert await projector.position() == len(events)

    async def test_a_new_process_continues_from_the_stored_position(self, db: MakeProjector) -> None:
        recorder, events = await _history()
        first = db()
        await first.create_schema()
        await first.apply(events[:11])
        await first.close()  # the process ends; nothing is held in memory

        second = db()
        await second.create_schema()  # idempotent: keeps tables and position
        assert await second.position() == 11
        res = await second.apply(events)  # the whole stream is redelivered
        assert (res.applied, res.skipped) == (len(events) - 11, 11)
        rebuilt = db()
        await rebuilt.rebuild(recorder)
        assert await rebuilt.snapshot() == await second.snapshot()

    async def test_catch_up_applies_only_what_is_new(self, projector: Projector) -> None:
        recorder, events = await _history()
        await projector.apply(events[:10])
        result = await projector.catch_up(recorder, batch_size=4)
        assert (result.count, result.position) == (len(events) - 10, len(events))
        assert (await projector.catch_up(recorder)).count == 0

    async def test_a_batch_failing_midway_leaves_nothing(
        self, projector: Projector, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, events = await _history()
        await projector.apply(events[:5])
        before = await projector.snapshot()
        real = Projector._write_roots

        async def crash(self: Projector, conn: Any, roots: Any) -> None:
            await real(self, conn, roots)
            raise ConnectionResetError("killed mid-transaction")

        monkeypatch.setattr(Projector, "_write_roots", crash)
        with pytest.raises(ProjectionStoreError):
            await projector.apply(events)
        monkeypatch.undo()
        assert await projector.position() == 5
        assert await projector.snapshot() == before
        assert (await projector.apply(events)).applied == len(events) - 5

    async def test_invalid_events_are_recorded_and_skipped(self, projector: Projector) -> None:
        recorder = MemoryRecorder()
        good = overlay("ov1", "Good")
        await record(
            recorder,
            [
                ("overlay", "ov1", event_type("overlay", "created"), good),
                ("image", "img1", "skyferry.v1.evt.image.created", {"record": {}}),  # unknown aggregate
                ("domain", "dc9", event_type("vna", "created"), {"record": {"id": "v1"}}),  # no such root
                ("overlay", "ov2", event_type("overlay", "created"), {"record": {"id": "ov2"}}),  # no name
                ("overlay", "ov1", event_type("node", "created"), {"record": {}}),  # wrong aggregate
                ("saga", "s1", "skyferry.v1.evt.saga.created", {}),  # not a saga event type
            ],
        )
        events = [e async for e in recorder.read_all()]
        bad_bytes = UndecodableEvent(position=7, subject="sf.evt.overlay.x", error="malformed msgpack")
        await recorder.append(
            "overlay", "ov3", NewEvent(event_type("overlay", "created"), overlay("ov3", "After")), None
        )
        after = [dataclasses.replace(e, position=8) async for e in recorder.read_all(after=6)]

        res = await projector.apply([*events, bad_bytes, *after])
        assert (res.applied, res.errors, res.position) == (8, 6, 8)
        errors = await projector.errors()
        assert [e["position"] for e in errors] == [2, 3, 4, 5, 6, 7]
        assert "unknown aggregate type" in errors[0]["error"]
        assert errors[5]["subject"] == "sf.evt.overlay.x" and errors[5]["event_type"] is None
        assert [o["id"] for o in (await projector.snapshot([t.overlays]))["overlays"]] == ["ov1", "ov3"]
        assert await projector.count(t.events) == 7  # the undecodable one has nothing to copy
        view = await projector.get_state("overlay", "ov1")
        assert view is not None and view.version == 1  # the misdirected node event changed nothing

    async def test_a_gap_is_refused_unless_allowed(self, projector: Projector) -> None:
        _, events = await _history()
        with pytest.raises(ProjectionGap):
            await projector.apply(events[3:6])
        assert await projector.position() == 0
        # Events 1-3 deleted from the stream: the runner knows and allows it.
        res = await projector.apply(events[3:4], allow_gap=True)
        assert res.position == 4

    async def test_two_projectors_racing_apply_once(self, db: MakeProjector) -> None:
        _, events = await _history()
        a, b = db(), db()
        await a.create_schema()
        results = await asyncio.gather(a.apply(events), b.apply(events))
        assert sorted(r.applied for r in results) == [0, len(events)]  # the loser re-read and skipped
        assert await a.count(t.events) == len(events)
        assert await b.position() == len(events)

    async def test_odd_payloads_do_not_fail_a_batch(self, projector: Projector) -> None:
        recorder = MemoryRecorder()
        odd = {"name": "nul\x00name", "blob": b"\x01\xff", "nested": {"k\x00": ["\x00"]}}
        await record(recorder, [("saga", "odd", "skyferry.v1.saga.started", odd)])
        (ev,) = [e async for e in recorder.read_all()]
        assert ev.data["blob"] == b"\x01\xff"  # msgpack keeps bytes
        await projector.apply([ev])
        (row,) = (await projector.snapshot([t.events]))["events"]
        assert row["data"] == {"name": "nul\ufffdname", "blob": "01ff", "nested": {"k\ufffd": ["\ufffd"]}}
        (saga,) = await projector.list_sagas()
        assert saga["name"] == "nul\ufffdname"


class TestSqlite(ProjectorContract):
    @pytest.fixture
    def db(self, sqlite_db: MakeProjector) -> MakeProjector:
        return sqlite_db


@pytest.mark.postgres
class TestPostgres(ProjectorContract):
    @pytest.fixture
    def db(self, postgres_db: MakeProjector) -> MakeProjector:
        return postgres_db


async def test_memory_sqlite_shares_one_database() -> None:
    async with Projector("sqlite:///:memory:") as p:
        await p.create_schema()
        _, events = await _history()
        await p.apply(events)
        assert await p.count(t.applications) == 1
        view = await p.get_state("app", "web")
        assert view is not None and view.updated_at.tzinfo is dt.UTC
