"""A keyed command has its effect once, through any crash: the key travels inside the event.

Each test makes the first attempt's reply unusable in a different way (lost, the manager
restarted, a second instance with a stale cache) and checks that a re-run with the same key
returns the first result and leaves exactly one event.
"""

from __future__ import annotations

from typing import Any

import pytest

from bus import signing
from bus.client import Identity, request_raw
from bus.connection import Bus, BusConfig
from bus.errors import AlreadyExists, BadRequest
from bus.kinds import Aggregate
from bus.messages import event_type
from bus.server import EmbeddedNatsServer
from bus.subjects import command as cmd_subject
from manager.app import ManagerApp, ManagerConfig
from manager.store import JetStreamRecorder
from manager.store.repository import Keyed, Repository
from tests.manager_fixtures import Client

CREATE = cmd_subject("manager", "overlay_create")
DELETE = cmd_subject("manager", "overlay_delete")


async def _send(client: Client, subject: str, payload: dict[str, Any]) -> dict[str, Any]:
    _, reply = await request_raw(client.bus, subject, payload, identity=client.identity)
    return reply


async def _overlay_events(bus: Bus, overlay_id: str) -> list[str]:
    return [e.event_type for e in await JetStreamRecorder(bus).read("overlay", overlay_id)]


async def test_rerun_after_a_lost_reply_returns_the_first_result(admin: Client) -> None:
    payload = {"record": {"id": "ov1", "name": "once"}, "idempotency_key": "saga1:s1:action"}
    first = await _send(admin, CREATE, payload)
    again = await _send(admin, CREATE, payload)
    assert again == first
    assert await _overlay_events(admin.bus, "ov1") == [event_type("overlay", "created")]


async def test_rerun_after_a_manager_restart_finds_the_key_in_the_stream(
    nats_server: EmbeddedNatsServer, bus: Bus
) -> None:
    seed = signing.generate_user_seed()

    def config() -> ManagerConfig:
        return ManagerConfig(
            bus=BusConfig(servers=[nats_server.url], name="manager"), admin_public_key=signing.public_key_of(seed)
        )

    admin = Client(bus, Identity("admin", seed))
    create = {"record": {"id": "ov2", "name": "x"}, "idempotency_key": "saga2:s1:action"}
    delete = {"id": "ov2", "idempotency_key": "saga2:s1:compensation"}
    async with ManagerApp(config()):
        first_create = await _send(admin, CREATE, create)
        first_delete = await _send(admin, DELETE, delete)
    # A new process knows nothing but the stream: the re-runs of both steps are answered from it.
    async with ManagerApp(config()):
        assert await _send(admin, CREATE, create) == first_create
        assert await _send(admin, DELETE, delete) == first_delete
    assert await _overlay_events(bus, "ov2") == [event_type("overlay", "created"), event_type("overlay", "deleted")]


async def test_a_key_reused_for_another_command_is_refused(admin: Client) -> None:
    await _send(admin, CREATE, {"record": {"id": "ov3", "name": "a"}, "idempotency_key": "k3"})
    with pytest.raises(BadRequest) as info:  # IdempotencyKeyReused on the manager's side
        await request_raw(
            admin.bus, CREATE, {"record": {"id": "ov3", "name": "b"}, "idempotency_key": "k3"}, identity=admin.identity
        )
    assert "already used for a different command" in info.value.message and info.value.details["key"] == "k3"
    # Nothing was written for the refused command, and the record is the first one.
    assert await _overlay_events(admin.bus, "ov3") == [event_type("overlay", "created")]
    with pytest.raises(BadRequest):
        await request_raw(admin.bus, DELETE, {"id": "ov3", "idempotency_key": "k3"}, identity=admin.identity)
    assert await _overlay_events(admin.bus, "ov3") == [event_type("overlay", "created")]


async def test_an_unkeyed_command_is_a_new_command(admin: Client) -> None:
    await _send(admin, CREATE, {"record": {"id": "ov4", "name": "a"}, "idempotency_key": "k4"})
    with pytest.raises(AlreadyExists):
        await request_raw(admin.bus, CREATE, {"record": {"id": "ov4", "name": "a"}}, identity=admin.identity)


async def test_keyed_netmap_import_rerun_reports_the_first_writes(admin: Client) -> None:
    subject = cmd_subject("manager", "netmap_import")
    netmap = {"overlays": [{"id": "ova", "name": "a"}, {"id": "ovb", "name": "b"}], "domains": []}
    payload = {"map": netmap, "idempotency_key": "saga5:import:action"}
    first = await _send(admin, subject, payload)
    assert [w["id"] for w in first["written"]] == ["ova", "ovb"] and first["unchanged"] == []
    assert await _send(admin, subject, payload) == first
    for ov in ("ova", "ovb"):
        assert await _overlay_events(admin.bus, ov) == [event_type("overlay", "created")]


async def test_a_second_instance_with_a_stale_cache_finds_the_key(bus: Bus) -> None:
    """Instance A writes under a key and dies before replying; B, which never saw the event, gets the re-run."""
    recorder = JetStreamRecorder(bus)
    a, b = Repository(recorder), Repository(recorder)
    await b.load(Aggregate.OVERLAY, "ov6")  # B caches "ov6 does not exist"
    keyed = Keyed(key="saga6:s1:action", digest="d6", actor="saga-coordinator")
    decisions: list[str] = []

    def create(cur: Any) -> tuple[str, dict[str, Any]]:
        decisions.append("decided")
        if cur.state is not None:
            raise AlreadyExists("ov6 exists")
        return event_type("overlay", "created"), {"record": {"id": "ov6", "name": "x"}}

    first = await a.write(
        Aggregate.OVERLAY, "ov6", create, expected_version=None, actor="saga-coordinator", msg_id="m1", keyed=keyed
    )
    again = await b.write(
        Aggregate.OVERLAY, "ov6", create, expected_version=None, actor="saga-coordinator", msg_id="m2", keyed=keyed
    )
    assert decisions == ["decided", "decided"]  # B decided on its stale view once; the append refused it
    assert again.replayed and not first.replayed
    assert (again.position, again.event_type) == (first.position, first.event_type)
    assert await _overlay_events(bus, "ov6") == [event_type("overlay", "created")]
