"""A VNA agent SIGKILLed and restarted brings its switch, join and tunnel back by itself.

vna2's agent runs as its own process (``python -m vna_agent``, as its systemd unit runs it) in the
lab of the reference sample; vna1's runs in the test. After a SIGKILL the bridge is still in vna2's
namespace but its tunnel died with the process: ASW in dc1 no longer reaches WSW in dc2. The
restarted agent (same ``--state-dir``) re-applies its stored configuration without any command:
the same switch, join and tunnel (same identity key, same peer key), traffic flows again, and a
re-run of the first commands with their keys gets the first answers (docs/sagas.md, "Exactly once").
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from bus import subjects
from bus.client import request_raw
from bus.messages import Empty
from bus.vna import PeerKey, TunnelAdd, TunnelStatus, VnaStatus
from tests.e2e.overlay_fixtures import Vnas, needs_root
from tests.e2e.waiting import until
from vna_agent.agent import short_name

pytestmark = [needs_root, pytest.mark.root, pytest.mark.timeout(180)]
OVERLAY = "ovnet10"


def config_of(st: VnaStatus) -> dict[str, Any]:
    """What was configured, without counters or learned MACs."""
    return {
        "switches": [
            {
                "overlay_id": s.overlay_id,
                "bridge": s.bridge,
                "mtu": s.mtu,
                "ports": sorted((p.name, p.kind) for p in s.ports),
            }
            for s in st.switches
        ],
        "tunnels": [(t.tunnel_id, t.overlay_id, t.role, t.mode, t.peer) for t in st.tunnels],
    }


def bridges(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "type", "bridge"], capture_output=True, check=True)
    return sorted(link["ifname"] for link in json.loads(out.stdout))


async def pings(vn: Vnas, src: str, dst: str) -> bool:
    return (await asyncio.to_thread(vn.lab.ping, src, dst, count=1, timeout=0.5)).ok


async def keyed(vn: Vnas, vna: str, verb: str, payload: dict[str, Any], key: str) -> dict[str, Any]:
    _, reply = await request_raw(vn.bus, subjects.agent(vna, verb), {**payload, "idempotency_key": key}, timeout=10)
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize("killed_role", ["server", "client"])
async def test_a_killed_agent_restores_its_switch_join_and_tunnel(vnas_for, killed_role: str) -> None:  # type: ignore[no-untyped-def]
    vn: Vnas = await vnas_for("lab-reference.yaml", external={"vna2"})
    lab, agent = vn.lab, vn.procs["vna2"]

    async def status() -> VnaStatus:
        return await vn.cmd("vna2", "status", Empty(), VnaStatus)

    async def tunnel_up() -> VnaStatus | None:
        st = await status()
        return st if st.tunnels and all(t.state == "up" for t in st.tunnels) else None

    key2 = await until(lambda: vn.key("vna2"), "vna2's agent answers")
    server, client = ("vna2", "vna1") if killed_role == "server" else ("vna1", "vna2")
    lan2 = lab.link("vna2", "lan1")
    wan_if = lab.addr(server, "wan")
    assert wan_if is not None
    wan = f"{wan_if.ip}:7000"
    peer = client if server == "vna2" else server
    tunnel = {
        "overlay_id": OVERLAY,
        "tunnel_id": "t-dc1-dc2",
        "role": killed_role,
        "mode": "stream",
        ("listen" if killed_role == "server" else "connect"): wan,
        "peer": {"name": peer, "public_key": await vn.key(peer)},
    }
    # vna2 gets keyed commands, as a saga sends them; vna1 is set up plainly.
    first = {
        "switch_create": await keyed(vn, "vna2", "switch_create", {"overlay_id": OVERLAY}, "s:switch:action"),
        "segment_join": await keyed(
            vn, "vna2", "segment_join", {"overlay_id": OVERLAY, "interface": lan2}, "s:join:action"
        ),
        "tunnel_add": await keyed(vn, "vna2", "tunnel_add", tunnel, "s:tunnel:action"),
    }
    await vn.join("vna1", OVERLAY, "lan1")
    await _vna1_tunnel(vn, killed_role, wan, key2)
    await until(lambda: _true_or_none(pings(vn, "asw", "10.1.1.10")), "ASW reaches WSW over the tunnel")
    before = await until(tunnel_up, "vna2's tunnel is up")

    # SIGKILL: the bridge stays in the kernel, the tunnel (threads and TAP of the process) is gone.
    agent.kill()
    assert bridges(lab.ns("vna2")) == [short_name("sfo", OVERLAY)]
    assert not await pings(vn, "asw", "10.1.1.10")

    # The restarted agent has it all back without being told anything.
    agent.start()
    after = await until(tunnel_up, "the restarted agent's tunnel is up again")
    await until(lambda: _true_or_none(pings(vn, "asw", "10.1.1.10")), "ASW reaches WSW again")
    assert config_of(after) == config_of(before)
    assert after.health == "ok"
    assert await vn.key("vna2") == key2  # the same static identity
    assert bridges(lab.ns("vna2")) == [short_name("sfo", OVERLAY)]

    # Re-runs of the first commands with their keys (a saga that never saw the replies) get the
    # first answers and change nothing; keyed removals of what is gone succeed.
    switch_again = await keyed(vn, "vna2", "switch_create", {"overlay_id": OVERLAY}, "s:switch:action")
    assert _switch_config(switch_again) == _switch_config(first["switch_create"]) | {
        "ports": _switch_config(switch_again)["ports"]
    }
    assert {p for p in _switch_config(switch_again)["ports"] if p[1] == "segment"} == {(lan2, "segment")}
    assert (
        await keyed(vn, "vna2", "segment_join", {"overlay_id": OVERLAY, "interface": lan2}, "s:join:action")
        == first["segment_join"]
    )
    again = await keyed(vn, "vna2", "tunnel_add", tunnel, "s:tunnel:action")
    assert {k: again[k] for k in ("tunnel_id", "overlay_id", "role", "mode")} == {
        k: first["tunnel_add"][k] for k in ("tunnel_id", "overlay_id", "role", "mode")
    }
    assert config_of(await status()) == config_of(before)
    assert await asyncio.to_thread(agent.stop) == 0  # SIGTERM: a clean exit, not a kill after the timeout


async def test_a_corrupt_state_file_is_kept_aside_and_the_agent_starts_empty_and_says_so(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn: Vnas = await vnas_for("lab-reference.yaml", external={"vna2"})
    agent = vn.procs["vna2"]
    await until(lambda: vn.key("vna2"), "vna2's agent answers")
    await vn.join("vna2", OVERLAY, "lan1")
    agent.kill()
    state = Path(agent.argv[agent.argv.index("--state-dir") + 1]) / "state.json"
    state.write_bytes(state.read_bytes()[:40])  # a torn file (the agent never writes one; a disk might)

    agent.start()
    st = await until(lambda: vn.cmd("vna2", "status", Empty(), VnaStatus), "the restarted agent answers")
    assert st.health == "degraded" and st.switches == []
    (aside,) = state.parent.glob("state.json.corrupt-*")
    assert len(aside.read_bytes()) == 40
    assert not state.exists()
    lines = [ln for ln in agent.log.read_text().splitlines() if "event=state_file_corrupt" in ln]
    assert len(lines) == 1 and "level=error" in lines[0] and str(aside) in lines[0]
    await vn.join("vna2", OVERLAY, "lan1")  # configured again: a fresh file beside the kept one
    assert state.exists() and aside.exists()
    assert agent.proc is not None and agent.proc.poll() is None


def _switch_config(reply: dict[str, Any]) -> dict[str, Any]:
    ports = sorted((p["name"], p["kind"]) for p in reply["ports"])
    return {"overlay_id": reply["overlay_id"], "bridge": reply["bridge"], "mtu": reply["mtu"], "ports": ports}


async def _true_or_none(ok: Awaitable[bool]) -> bool | None:
    return True if await ok else None


async def _vna1_tunnel(vn: Vnas, killed_role: str, wan: str, key2: str) -> None:

    role = "client" if killed_role == "server" else "server"
    addr = {"connect": wan} if role == "client" else {"listen": wan}
    await vn.cmd(
        "vna1",
        "tunnel_add",
        TunnelAdd(
            overlay_id=OVERLAY,
            tunnel_id="t-dc1-dc2",
            role=role,
            mode="stream",
            peer=PeerKey(name="vna2", public_key=key2),
            **addr,
        ),
        TunnelStatus,
    )
