"""Discovery, the event stream, signing for the plain nats CLI, the schema, and failing fast."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bus import signing
from bus.connection import Bus, BusConfig
from bus.server import free_port
from bus.subjects import Header
from manager.stack import StackInfo
from tests.manager.cli.conftest import Sf, clean_env, skyferry_command
from tests.manager.cli.helpers import as_json, failed, ok


def test_status_lists_the_manager(sf: Sf) -> None:
    found = as_json(sf("-o", "json", "status", "--wait", "0.3"))
    manager = [s for s in found["services"] if s["name"] == "manager"]
    assert manager and manager[0]["endpoints"] > 50 and manager[0]["version"]
    assert "Services" in ok(sf("status", "--wait", "0.2")).stdout


def test_events_tail_prints_the_events_written(sf: Sf) -> None:
    ov = f"ev-{uuid.uuid4().hex[:6]}"
    ok(sf("overlay", "create", "--id", ov, "--name", ov))
    ok(sf("overlay", "update", ov, "--set", "vni=77"))
    ok(sf("overlay", "delete", ov))
    result = ok(
        sf("-o", "json", "events", "tail", "--aggregate", "overlay", "--id", ov, "--from-start", "--count", "3")
    )
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event_type"].rsplit(".", 1)[-1] for e in events] == ["created", "updated", "deleted"]
    assert {e["actor"] for e in events} == {"admin"} and {e["subject"] for e in events} == {f"sf.evt.overlay.{ov}"}
    assert events[1]["data"]["record"]["vni"] == 77
    assert events[0]["position"] < events[1]["position"] < events[2]["position"]

    last = ok(sf("events", "tail", "--aggregate", "overlay", "--id", ov, "--last", "1", "--no-follow")).stdout
    assert "overlay.deleted" in last and "overlay.created" not in last
    whole = ok(sf("-o", "json", "events", "tail", "--last", "2", "--no-follow")).stdout.splitlines()
    assert len(whole) == 2 and json.loads(whole[-1])["subject"] == f"sf.evt.overlay.{ov}"
    failed(sf("events", "tail", "--no-follow"), 2, "bad_request")


def test_sign_headers_are_accepted_by_the_manager(sf: Sf, stack_home: Path) -> None:
    body = "{ }"
    args = shlex.split(ok(sf("sign", "sf.cmd.manager.whoami", "--json", body)).stdout)
    assert args[::2] == ["-H"] * (len(args) // 2)
    headers = dict(h.split(":", 1) for h in args[1::2])
    assert headers[Header.ACTOR] == "admin" and headers[Header.CONTENT_TYPE] == "application/json"

    info = StackInfo.load(stack_home)
    assert info is not None

    async def send() -> tuple[bytes, dict[str, str]]:
        # What `nats req sf.cmd.manager.whoami '{ }' -H ...` does: the same bytes, the same headers.
        bus = await Bus.connect(BusConfig(servers=[info.url], nkey_seed_file=info.key_file("cli")))
        try:
            first = await bus.nc.request("sf.cmd.manager.whoami", body.encode(), headers=headers, timeout=5)
            replay = await bus.nc.request("sf.cmd.manager.whoami", body.encode(), headers=headers, timeout=5)
        finally:
            await bus.close()
        return first.data, dict(replay.headers or {})

    reply, replayed = asyncio.run(send())
    assert json.loads(reply)["id"] == "admin"
    assert replayed.get(Header.ERROR) == "unauthenticated"  # a signature is good for one message

    line = ok(sf("sign", "sf.cmd.manager.whoami", "--command")).stdout
    assert line.startswith(f"nats req --server {info.url} --nkey ") and "-H 'Sf-Signature:" in line
    failed(sf("sign", "sf.cmd.manager.whoami", "--json", "{nope"), 2, "bad_request")


def test_schema_is_the_asyncapi_document(sf: Sf, tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    ok(sf("schema", "--out", str(out)))
    doc = json.loads(out.read_text())
    assert doc["asyncapi"].startswith("3.") and "manager_whoami" in doc["channels"]


def _saga_status(sf: Sf, saga_id: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (view := as_json(sf("-o", "json", "saga", "show", saga_id)))["status"] not in wanted:
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    return view  # type: ignore[no-any-return]


def test_saga_start_pause_resume_cancel(sf: Sf, tmp_path: Path) -> None:
    saga_id = f"s-{uuid.uuid4().hex[:6]}"
    plan = tmp_path / "plan.yaml"
    # Nobody serves the action, so the step keeps retrying: the saga stays running until cancelled.
    plan.write_text(
        f"saga_id: {saga_id}\nname: waits\nsteps:\n"
        "  - step_id: call\n    action: {subject: sf.cmd.nobody.here}\n"
        "    retry: {max_attempts: 1000, initial_backoff_s: 0.1, max_backoff_s: 0.2}\n"
    )
    assert as_json(sf("-o", "json", "saga", "start", str(plan)))["saga_id"] == saga_id
    _saga_status(sf, saga_id, {"running"})
    assert as_json(sf("-o", "json", "saga", "pause", saga_id, "--reason", "test"))["status"] == "paused"
    assert as_json(sf("-o", "json", "saga", "resume", saga_id))["status"] == "running"
    ok(sf("saga", "cancel", saga_id))
    view = _saga_status(sf, saga_id, {"compensated", "failed", "completed"})
    assert view["status"] == "compensated" and view["steps"][0]["step_id"] == "call"
    listed = as_json(sf("-o", "json", "saga", "list", "--status", "compensated"))["sagas"]
    assert saga_id in [x["saga_id"] for x in listed]
    assert "Steps" in ok(sf("saga", "show", saga_id)).stdout
    failed(sf("saga", "pause", saga_id), 4, "invalid_state")
    failed(sf("saga", "show", "no-such-saga"), 4, "not_found")


def test_wrong_server_fails_fast(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run(
        [*skyferry_command(), "--home", str(tmp_path), "--server", url, "overlay", "list"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    assert elapsed < 6, elapsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error[unavailable]: cannot reach the bus at " + url)
    assert proc.stdout == ""


def test_unknown_nats_key_is_refused_as_unauthenticated(sf: Sf, tmp_path: Path) -> None:
    key = tmp_path / "stranger.nk"
    key.write_text(signing.generate_user_seed())
    line = failed(sf("--nkey", str(key), "overlay", "list"), 3, "unauthenticated")
    assert "refused the connection credentials" in line
