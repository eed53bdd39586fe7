"""The manager's command surface against a real bus: CRUD, queries, state, import/export."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bus.errors import AlreadyExists, ConcurrencyConflict, InvalidState, NotFound, ValidationFailed
from bus.mapio import load_application_map, load_network_map
from bus.messages import (
    MESSAGES,
    AppExport,
    AppImport,
    AppMapView,
    AppSetState,
    Empty,
    NetMapImport,
    NetMapImportResult,
    NetMapView,
    SchemaDocument,
    WhoAmI,
    WriteResult,
)
from bus.models import VNA, NetworkDomain, OverlayNetwork
from bus.models.application import ApplicationState
from tests.manager_fixtures import Client

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"
OV, DOM, VNA_K, APP = MESSAGES["overlay"], MESSAGES["domain"], MESSAGES["vna"], MESSAGES["app"]


async def test_whoami_and_schema(admin: Client) -> None:
    me = await admin("whoami", Empty(), WhoAmI)
    assert me.id == "admin" and "admin" in me.authorisations
    doc = await admin("schema", Empty(), SchemaDocument)
    channels = doc.document["channels"]
    assert channels["manager_overlay_create"]["address"] == "sf.cmd.manager.overlay_create"
    assert any(k.startswith("event_") for k in channels)
    assert "OverlayNetwork" in doc.document["components"]["schemas"]


async def test_create_get_list_update_delete_overlay(admin: Client) -> None:
    ov = OverlayNetwork(id="ov1", name="Overlay one", vni=100)
    w = await admin("overlay_create", OV.create(record=ov), WriteResult)
    assert (w.kind, w.id, w.event_type) == ("overlay", "ov1", "skyferry.v1.evt.overlay.created")
    got = await admin("overlay_get", OV.get(id="ov1"), OV.view)
    assert got.record == ov and got.version == w.version
    listed = await admin("overlay_list", OV.list(), OV.list_result)
    assert [i.record.id for i in listed.items] == ["ov1"]
    w2 = await admin(
        "overlay_update",
        OV.update(record=ov.model_copy(update={"name": "Renamed"}), expected_version=w.version),
        WriteResult,
    )
    assert w2.version > w.version
    # As-of read: the state at the first write still has the old name.
    old = await admin("overlay_get", OV.get(id="ov1", as_of_position=w.version), OV.view)
    assert old.record.name == "Overlay one"
    await admin("overlay_delete", OV.delete(id="ov1"), WriteResult)
    with pytest.raises(NotFound):
        await admin("overlay_get", OV.get(id="ov1"), OV.view)


async def test_children_live_in_their_domain(admin: Client) -> None:
    await admin("overlay_create", OV.create(record=OverlayNetwork(id="ov1", name="o")), WriteResult)
    await admin("domain_create", DOM.create(record=NetworkDomain(id="dc1", name="DC 1")), WriteResult)
    vna = VNA(id="vna1", type="vna", state="running", external_address="192.0.2.1")
    await admin("vna_create", VNA_K.create(parent_id="dc1", record=vna), WriteResult)
    with pytest.raises(AlreadyExists):
        await admin("vna_create", VNA_K.create(parent_id="dc1", record=vna), WriteResult)
    lon = MESSAGES["local_overlay"]
    await admin(
        "local_overlay_create", lon.create(parent_id="dc1", record={"overlay_id": "ov1", "vlan_ids": [10]}), WriteResult
    )
    with pytest.raises(ValidationFailed):  # unknown overlay
        await admin("local_overlay_create", lon.create(parent_id="dc1", record={"overlay_id": "nope"}), WriteResult)
    with pytest.raises(ValidationFailed):  # overlay still joined somewhere
        await admin("overlay_delete", OV.delete(id="ov1"), WriteResult)
    dom = await admin("domain_get", DOM.get(id="dc1"), DOM.view)
    assert [v.id for v in dom.record.vnas] == ["vna1"]
    # Updating the domain record keeps its children.
    await admin("domain_update", DOM.update(record=NetworkDomain(id="dc1", name="Renamed")), WriteResult)
    vnas = await admin("vna_list", VNA_K.list(parent_id="dc1"), VNA_K.list_result)
    assert [i.record.id for i in vnas.items] == ["vna1"]
    with pytest.raises(NotFound):
        await admin("vna_create", VNA_K.create(parent_id="nodomain", record=vna), WriteResult)


async def test_expected_version_conflict_exactly_one_wins(admin: Client) -> None:
    w = await admin("overlay_create", OV.create(record=OverlayNetwork(id="ov1", name="o")), WriteResult)

    async def rename(n: int) -> str:
        rec = OverlayNetwork(id="ov1", name=f"name-{n}")
        try:
            await admin("overlay_update", OV.update(record=rec, expected_version=w.version), WriteResult)
            return "won"
        except ConcurrencyConflict:
            return "conflict"

    results = await asyncio.gather(*(rename(i) for i in range(6)))
    assert results.count("won") == 1 and results.count("conflict") == 5


async def test_concurrent_creates_of_one_id(admin: Client) -> None:
    async def create(n: int) -> str:
        try:
            await admin("overlay_create", OV.create(record=OverlayNetwork(id="same", name=f"n{n}")), WriteResult)
            return "won"
        except AlreadyExists:
            return "exists"

    results = await asyncio.gather(*(create(i) for i in range(5)))
    assert results.count("won") == 1 and results.count("exists") == 4


async def test_network_map_import_export_idempotent(admin: Client) -> None:
    nm = load_network_map((SAMPLES / "network-map.yaml").read_text(), "yaml")
    r1 = await admin("netmap_import", NetMapImport(map=nm), NetMapImportResult)
    assert len(r1.written) == len(nm.overlays) + len(nm.domains)
    r2 = await admin("netmap_import", NetMapImport(map=nm), NetMapImportResult)
    assert r2.written == [] and len(r2.unchanged) == len(r1.written)
    out = await admin("netmap_export", Empty(), NetMapView)
    assert out.map.model_dump(mode="json") == nm.model_dump(mode="json")


async def test_application_import_export_and_state_machine(admin: Client) -> None:
    nm = load_network_map((SAMPLES / "network-map.yaml").read_text(), "yaml")
    await admin("netmap_import", NetMapImport(map=nm), NetMapImportResult)
    am = load_application_map((SAMPLES / "app-3tier.yaml").read_text(), "yaml")
    app_id = am.application.id
    w = await admin("app_import", AppImport(map=am), WriteResult)
    with pytest.raises(AlreadyExists):
        await admin("app_import", AppImport(map=am), WriteResult)
    out = await admin("app_export", AppExport(id=app_id), AppMapView)
    assert out.map == am and out.version == w.version
    state = am.application.state
    bad = ApplicationState.SCALING if state != ApplicationState.RUNNING else ApplicationState.TEMPLATE
    with pytest.raises(InvalidState):
        await admin("app_set_state", AppSetState(id=app_id, state=bad), WriteResult)
    with pytest.raises(InvalidState):  # state changes never sneak in through update
        rec = am.application.model_copy(update={"state": bad})
        await admin("app_update", APP.update(record=rec), WriteResult)
    node = am.nodes[0]
    await admin("node_delete", MESSAGES["node"].delete(parent_id=app_id, id=node.id), WriteResult)
    after = await admin("app_export", AppExport(id=app_id), AppMapView)
    assert node.id not in {n.id for n in after.map.nodes}
    before = await admin("app_export", AppExport(id=app_id, as_of_position=w.version), AppMapView)
    assert node.id in {n.id for n in before.map.nodes}


async def test_idempotency_key_runs_a_command_once(admin: Client, manager: tuple) -> None:  # type: ignore[type-arg]
    from bus.client import request_raw
    from bus.subjects import command as cmd_subject

    payload = {"record": {"id": "idem", "name": "once"}, "idempotency_key": "saga1:s1:action"}
    _, first = await request_raw(admin.bus, cmd_subject("manager", "overlay_create"), payload, identity=admin.identity)
    # A re-run (new message id, same key) gets the stored reply instead of AlreadyExists.
    _, again = await request_raw(admin.bus, cmd_subject("manager", "overlay_create"), payload, identity=admin.identity)
    assert first == again and first["id"] == "idem"
    app = manager[0]
    events = [e async for e in app.repo.recorder.read_all(aggregate_type="overlay")]
    assert len(events) == 1
    with pytest.raises(AlreadyExists):  # without the key it is a new command
        await admin("overlay_create", OV.create(record=OverlayNetwork(id="idem", name="x")), WriteResult)
