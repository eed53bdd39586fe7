"""VnaAgent keeps and re-applies its configuration (state.json), on real bridges in a scratch namespace (root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.vna import PeerKey, SegmentJoin, TunnelAdd
from vna_agent.agent import VnaAgent, short_name
from vna_agent.dataplane import StaticKeyPair

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
    pytest.mark.root,
    pytest.mark.timeout(60),
]


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def master_of(ns: str, ifname: str) -> str | None:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], check=True, capture_output=True, text=True)
    master = json.loads(out.stdout)[0].get("master")
    return str(master) if master is not None else None


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"sfs{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        ip(name, "link", "add", "seg0", "type", "veth", "peer", "name", "seg0p")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def tunnel(port: int) -> TunnelAdd:
    peer = PeerKey(name="vnb", public_key=StaticKeyPair.generate().public.b64())
    return TunnelAdd(overlay_id="ov", tunnel_id="t1", role="server", listen=f"127.0.0.1:{port}", peer=peer)


async def test_a_new_agent_on_the_same_state_dir_re_applies_what_was_accepted(ns: str, tmp_path: Path) -> None:
    a = VnaAgent("vna", tmp_path, netns=ns)
    a.start()
    await a.switch_create("ov", 1400)
    await a.segment_join(SegmentJoin(overlay_id="ov", interface="seg0"))
    spec = tunnel(17400)
    await a.tunnel_add(spec)
    stored = json.loads((tmp_path / "state.json").read_text())  # written before the calls returned
    assert list(stored["switches"]) == ["ov"] and list(stored["tunnels"]) == ["t1"]
    assert [j["port"] for j in stored["joins"]] == ["seg0"]
    identity = a.identity.public.b64()
    await a.close()  # a clean stop: the data plane goes, the file stays
    assert json.loads((tmp_path / "state.json").read_text()) == stored

    b = VnaAgent("vna", tmp_path, netns=ns)
    b.start()
    try:
        assert await b.restore() == []
        assert b.identity.public.b64() == identity
        assert b.switches["ov"].mtu == 1400 and b.switches["ov"].segments == {"seg0"}
        assert master_of(ns, "seg0") == short_name("sfo", "ov")
        assert b.tunnels["t1"].spec == spec  # with the same peer key
        assert master_of(ns, b.tunnels["t1"].port) == short_name("sfo", "ov")
        assert b.unapplied() == []
        await b.tunnel_remove("t1")
        await b.segment_leave("ov", "seg0")
        stored = json.loads((tmp_path / "state.json").read_text())
        assert stored["tunnels"] == {} and stored["joins"] == [] and list(stored["switches"]) == ["ov"]
        await b.switch_remove("ov")
        assert json.loads((tmp_path / "state.json").read_text())["switches"] == {}
    finally:
        await b.close()


async def test_what_cannot_be_re_applied_is_reported_kept_and_can_be_removed(ns: str, tmp_path: Path) -> None:
    a = VnaAgent("vna", tmp_path, netns=ns)
    a.start()
    await a.switch_create("ov", 1500)
    await a.segment_join(SegmentJoin(overlay_id="ov", interface="seg0"))
    await a.close()
    ip(ns, "link", "del", "seg0")  # the segment's interface is gone when the agent comes back

    b = VnaAgent("vna", tmp_path, netns=ns)
    b.start()
    try:
        failures = await b.restore()
        assert [(f.kind, f.ident) for f in failures] == [("join", "ov/seg0")]
        assert b.unapplied() == ["join ov/seg0"]
        assert (await b.status()).health == "degraded"
        assert b.desired.join("ov", "seg0") is not None  # kept: a re-run of the join applies it again
        await b.segment_leave("ov", "seg0")  # a removal forgets it
        assert b.unapplied() == [] and (await b.status()).health == "ok"
        assert json.loads((tmp_path / "state.json").read_text())["joins"] == []
    finally:
        await b.close()
