"""Identity is proven, not claimed; every write is authorised; bad input gets typed errors."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from bus import codec, signing, subjects
from bus.client import Identity, command, request_raw
from bus.connection import Bus
from bus.envelope import Envelope
from bus.errors import BadRequest, ErrorCode, Forbidden, Unauthenticated, UnknownCommand, ValidationFailed
from bus.messages import MESSAGES, WriteResult
from bus.models import OverlayNetwork
from bus.models.common import AccessControlEntry
from bus.subjects import ContentType, Header
from manager.app import ManagerApp
from tests.manager_fixtures import Client, MakeUser

OV = MESSAGES["overlay"]
SUBJECT = subjects.command("manager", "overlay_create")


def _overlay(i: str = "ov1", **kw: object) -> OverlayNetwork:
    return OverlayNetwork(id=i, name=f"overlay {i}", **kw)  # type: ignore[arg-type]


async def _count_events(manager: tuple[ManagerApp, str]) -> int:
    app, _ = manager
    assert app.repo is not None
    return await app.repo.recorder.last_position()


async def test_unsigned_command_is_refused(bus: Bus, admin: Client, manager: tuple[ManagerApp, str]) -> None:
    before = await _count_events(manager)
    with pytest.raises(Unauthenticated, match="not signed"):
        await command(
            bus,
            "manager",
            "overlay_create",
            OV.create(record=_overlay()),
            WriteResult,
            identity=Identity("admin", None),
        )
    assert await _count_events(manager) == before


async def test_forged_signature_is_refused(bus: Bus, admin: Client, manager: tuple[ManagerApp, str]) -> None:
    before = await _count_events(manager)
    mallory_seed = signing.generate_user_seed()
    with pytest.raises(Unauthenticated, match="bad signature"):
        await command(
            bus,
            "manager",
            "overlay_create",
            OV.create(record=_overlay()),
            WriteResult,
            identity=Identity("admin", mallory_seed),
        )
    assert await _count_events(manager) == before


async def test_unknown_actor_is_refused(bus: Bus, admin: Client) -> None:
    with pytest.raises(Unauthenticated, match="unknown actor"):
        await command(
            bus, "manager", "whoami", {}, WriteResult, identity=Identity("ghost", signing.generate_user_seed())
        )


async def test_replayed_and_tampered_messages_are_refused(
    bus: Bus, admin: Client, manager: tuple[ManagerApp, str]
) -> None:
    _, seed = manager
    body = codec.encode(OV.create(record=_overlay("r1")))
    env = signing.sign(seed, SUBJECT, Envelope(schema_name="x", actor="admin"), body)
    ok = await bus.nc.request(SUBJECT, body, headers=env.to_headers(), timeout=5)
    assert Header.ERROR.value not in (ok.headers or {})
    again = await bus.nc.request(SUBJECT, body, headers=env.to_headers(), timeout=5)
    assert codec.decode(again.data)["code"] == ErrorCode.UNAUTHENTICATED
    assert "replayed" in codec.decode(again.data)["message"]
    # Same signature, other payload: the body hash no longer matches.
    other = codec.encode(OV.create(record=_overlay("r2")))
    env2 = signing.sign(seed, SUBJECT, Envelope(schema_name="x", actor="admin"), body)
    tampered = await bus.nc.request(SUBJECT, other, headers=env2.to_headers(), timeout=5)
    assert codec.decode(tampered.data)["code"] == ErrorCode.UNAUTHENTICATED
    # Moved to another subject: refused too.
    env3 = signing.sign(seed, SUBJECT, Envelope(schema_name="x", actor="admin"), body)
    moved = await bus.nc.request(
        subjects.command("manager", "overlay_update"), body, headers=env3.to_headers(), timeout=5
    )
    assert codec.decode(moved.data)["code"] == ErrorCode.UNAUTHENTICATED
    assert await _count_events(manager) == 2  # the admin bootstrap + r1


async def test_stale_timestamp_is_refused(bus: Bus, admin: Client, manager: tuple[ManagerApp, str]) -> None:
    _, seed = manager
    body = codec.encode({})
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    env = signing.sign(
        seed, subjects.command("manager", "whoami"), Envelope(schema_name="x", actor="admin", timestamp=old), body
    )
    msg = await bus.nc.request(subjects.command("manager", "whoami"), body, headers=env.to_headers(), timeout=5)
    assert "replay window" in codec.decode(msg.data)["message"]


async def test_missing_authorisation_is_forbidden(make_user: MakeUser, manager: tuple[ManagerApp, str]) -> None:
    reader = await make_user("reader", {"network-read"})
    before = await _count_events(manager)
    with pytest.raises(Forbidden, match="network-write"):
        await reader("overlay_create", OV.create(record=_overlay()), WriteResult)
    assert await _count_events(manager) == before
    with pytest.raises(Forbidden):
        await reader("user_list", MESSAGES["user"].list(), MESSAGES["user"].list_result)


async def test_record_acl_limits_writers_and_readers(admin: Client, make_user: MakeUser) -> None:
    acl = [AccessControlEntry(principal="group:netops", rights={"read", "write"})]
    await admin("overlay_create", OV.create(record=_overlay("guarded", access_controls=acl)), WriteResult)
    await admin("overlay_create", OV.create(record=_overlay("open")), WriteResult)
    ops = await make_user("olga", {"network-write"}, groups=["netops"])
    dev = await make_user("dan", {"network-write"}, groups=["dev"])
    await ops(
        "overlay_update", OV.update(record=_overlay("guarded", access_controls=acl, description="x")), WriteResult
    )
    with pytest.raises(Forbidden, match="access controls"):
        await dev("overlay_update", OV.update(record=_overlay("guarded", access_controls=acl)), WriteResult)
    with pytest.raises(Forbidden):
        await ops("overlay_delete", OV.delete(id="guarded"), WriteResult)  # no delete right in the ACL
    seen = await dev("overlay_list", OV.list(), OV.list_result)
    assert [i.record.id for i in seen.items] == ["open"]
    with pytest.raises(Forbidden):
        await dev("overlay_get", OV.get(id="guarded"), OV.view)


async def test_disabled_user_is_forbidden(admin: Client, make_user: MakeUser) -> None:
    u = await make_user("gone", {"network-read"})
    rec = (await admin("user_get", MESSAGES["user"].get(id="gone"), MESSAGES["user"].view)).record
    await admin("user_update", MESSAGES["user"].update(record=rec.model_copy(update={"disabled": True})), WriteResult)
    with pytest.raises(Forbidden, match="disabled"):
        await u("overlay_list", OV.list(), OV.list_result)


async def test_malformed_payloads_get_typed_errors(bus: Bus, admin: Client, manager: tuple[ManagerApp, str]) -> None:
    _, seed = manager
    for garbage in (b"\xc1\xff\x00", b"\x93\x01\x02"):  # invalid msgpack; a list instead of a map
        env = signing.sign(seed, SUBJECT, Envelope(schema_name="x", actor="admin"), garbage)
        msg = await bus.nc.request(SUBJECT, garbage, headers=env.to_headers(), timeout=5)
        assert msg.headers and msg.headers[Header.ERROR.value] == ErrorCode.MALFORMED
    bad_json = b'{"record": '
    env = signing.sign(seed, SUBJECT, Envelope(schema_name="x", actor="admin", content_type=ContentType.JSON), bad_json)
    msg = await bus.nc.request(SUBJECT, bad_json, headers=env.to_headers(), timeout=5)
    assert json.loads(msg.data)["code"] == "malformed"
    with pytest.raises(BadRequest):
        hdr = {Header.CONTENT_TYPE.value: "text/xml"}
        m = await bus.nc.request(SUBJECT, b"<x/>", headers=hdr, timeout=5)
        from bus.errors import ErrorReply, error_from_reply

        raise error_from_reply(ErrorReply.model_validate(codec.decode(m.data)))


async def test_schema_violation_and_unknown_command(admin: Client) -> None:
    with pytest.raises(ValidationFailed) as exc:
        await admin("overlay_create", {"record": {"id": "bad id!", "name": ""}}, WriteResult)
    locs = {e["loc"] for e in exc.value.details["errors"]}
    assert "record.id" in locs and "record.name" in locs
    with pytest.raises(UnknownCommand):
        await admin("launch_missiles", {}, WriteResult)


async def test_json_commands_from_a_plain_nats_client(bus: Bus, manager: tuple[ManagerApp, str]) -> None:
    _, seed = manager
    env, data = await request_raw(
        bus,
        SUBJECT,
        {"record": {"id": "js1", "name": "from json"}},
        identity=Identity("admin", seed),
        content_type=ContentType.JSON,
    )
    assert env.content_type is ContentType.JSON and data["id"] == "js1"


async def test_plain_secrets_are_refused_key_refs_kept(admin: Client, manager: tuple[ManagerApp, str]) -> None:
    from bus.models import NetworkDomain

    dom = MESSAGES["domain"]
    await admin("domain_create", dom.create(record=NetworkDomain(id="dc1", name="dc")), WriteResult)
    before = await _count_events(manager)
    vna = {"id": "v1", "type": "vna", "state": "running", "credentials": {"username": "u", "secret": "hunter2"}}
    with pytest.raises(ValidationFailed, match="key_ref") as exc:
        await admin("vna_create", {"parent_id": "dc1", "record": vna}, WriteResult)
    assert exc.value.details["errors"][0]["loc"] == "record.credentials"
    assert await _count_events(manager) == before
    vna["credentials"] = {"username": "u", "key_ref": "vault:dc1/v1"}
    await admin("vna_create", {"parent_id": "dc1", "record": vna}, WriteResult)
    got = await admin("vna_get", {"parent_id": "dc1", "id": "v1"}, MESSAGES["vna"].view)
    assert got.record.credentials.key_ref == "vault:dc1/v1"
