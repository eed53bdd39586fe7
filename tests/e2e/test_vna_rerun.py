"""A VNA agent answers a re-run of a keyed command with the first answer (its kernel state is the record).

The saga coordinator re-sends a step with the same idempotency key whenever it cannot know
whether the first attempt took effect. For the agent, "it took effect" is visible in what it
runs: the same spec in place is success, a keyed removal of what is gone is success.
"""

from __future__ import annotations

from typing import Any

import pytest

from bus import subjects
from bus.client import request_raw
from bus.errors import AlreadyExists, NotFound
from tests.e2e.overlay_fixtures import Vnas, needs_root

pytestmark = [needs_root, pytest.mark.timeout(120)]


async def _send(vn: Vnas, verb: str, payload: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    body = {**payload, **({"idempotency_key": key} if key else {})}
    _, reply = await request_raw(vn.bus, subjects.agent("vna1", verb), body, timeout=10)
    return reply


async def test_keyed_reruns_get_the_first_answer_and_change_nothing(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn: Vnas = await vnas_for("lab-reference.yaml")
    agent = vn.agents["vna1"].agent
    lan = vn.lab.link("vna1", "lan1")
    switch = {"overlay_id": "ovr"}
    first_switch = await _send(vn, "switch_create", switch, "m:s1:action")
    assert await _send(vn, "switch_create", switch, "m:s1:action") == first_switch

    join = {"overlay_id": "ovr", "interface": lan}
    assert await _send(vn, "segment_join", join, "m:s2:action") == await _send(vn, "segment_join", join, "m:s2:action")
    assert agent.switches["ovr"].segments == {lan}

    peer = {"name": "vna2", "public_key": await vn.key("vna2")}
    tunnel = {
        "overlay_id": "ovr",
        "tunnel_id": "t1",
        "role": "server",
        "listen": f"{vn.lab.addr('vna1', 'wan').ip}:7400",
        "peer": peer,
    }
    first = await _send(vn, "tunnel_add", tunnel, "m:s3:action")
    again = await _send(vn, "tunnel_add", tunnel, "m:s3:action")
    assert {k: again[k] for k in ("tunnel_id", "overlay_id", "role", "mode")} == {
        k: first[k] for k in ("tunnel_id", "overlay_id", "role", "mode")
    }
    assert list(agent.tunnels) == ["t1"]
    # The same id with another spec is a real conflict, keyed or not.
    with pytest.raises(AlreadyExists):
        await _send(vn, "tunnel_add", {**tunnel, "listen": f"{vn.lab.addr('vna1', 'wan').ip}:7401"}, "m:s9:action")

    # Compensations, each re-run after its first run took effect.
    for verb, payload, key in [
        ("tunnel_remove", {"tunnel_id": "t1"}, "m:s3:compensation"),
        ("segment_leave", join, "m:s2:compensation"),
        ("switch_remove", switch, "m:s1:compensation"),
    ]:
        assert await _send(vn, verb, payload, key) == await _send(vn, verb, payload, key) == {"ok": True, "detail": ""}
    assert agent.tunnels == {} and agent.switches == {}
    # Without a key a removal of something absent is still reported, for the operator's sake.
    with pytest.raises(NotFound):
        await _send(vn, "tunnel_remove", {"tunnel_id": "t1"})
