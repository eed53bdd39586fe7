"""Overlay behaviour in the lab: cloud tunnel client, wrong keys, flows, moves, loops, isolation."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from bus import codec
from bus.messages import Empty
from bus.vna import Ack, Conflict, FlowStats, PeerKey, TunnelAdd, TunnelRef, TunnelStatus, VnaStatus
from tests.e2e.overlay_fixtures import Vnas, needs_root

pytestmark = [needs_root, pytest.mark.root]


async def _ping_ok(vn: Vnas, src: str, dst: str, tries: int = 20) -> bool:
    for _ in range(tries):
        if (await asyncio.to_thread(vn.lab.ping, src, dst, count=1, timeout=0.5)).ok:
            return True
    return False


async def _reference(vnas_for, mode: str = "stream") -> Vnas:  # type: ignore[no-untyped-def]
    vn: Vnas = await vnas_for("lab-reference.yaml")
    for vna in ("vna1", "vna2"):
        await vn.join(vna, "ovnet10", "lan1")
    await vn.connect("ovnet10", server="vna2", client="vna1", mode=mode)
    assert await _ping_ok(vn, "asw", "10.1.1.10")
    return vn


async def test_wsw_in_a_cloud_on_the_tunnel_client(vnas_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vn = await _reference(vnas_for)
    lab = vn.lab
    await asyncio.to_thread(lab.unplug, "wsw")  # WSW left dc2 ...
    cfg = tmp_path / "client.json"  # ... and runs in cloud1 as WSWC, on a tunnel client
    vna2_wan = lab.addr("vna2", "wan").ip
    cfg.write_text(
        json.dumps(
            {
                "interface": "sfov0",
                "mac": lab.mac("wsw", "eth0"),
                "address": "10.1.1.10/24",
                "mode": "stream",
                "server": f"{vna2_wan}:7100",
                "server_public_key": await vn.key("vna2"),
                "identity_key_file": str(tmp_path / "client.key"),
            }
        )
    )
    argv = [sys.executable, "-m", "vna_agent.client", "--config", str(cfg)]
    client_key = lab.exec("wswc", [*argv, "--show-public-key"], check=True, timeout=20).stdout.strip()
    await vn.cmd(
        "vna2",
        "tunnel_add",
        TunnelAdd(
            overlay_id="ovnet10",
            tunnel_id="wswc",
            role="server",
            listen=f"{vna2_wan}:7100",
            peer=PeerKey(name="wswc", public_key=client_key),
        ),
        TunnelStatus,
    )
    proc = lab.spawn("wswc", argv, stderr=open(tmp_path / "client.log", "w"))  # noqa: SIM115
    try:
        ok = await _ping_ok(vn, "asw", "10.1.1.10", tries=40)
        assert ok, (tmp_path / "client.log").read_text()[-3000:]
        assert lab.arp("asw", "eth0", "10.1.1.10") == lab.mac("wsw", "eth0")  # same MAC, same IP
    finally:
        proc.terminate()
        proc.wait(5)


async def test_peer_with_the_wrong_key_is_refused(vnas_for) -> None:  # type: ignore[no-untyped-def]
    from vna_agent.dataplane import StaticKeyPair

    vn: Vnas = await vnas_for("lab-reference.yaml")
    for vna in ("vna1", "vna2"):
        await vn.join(vna, "ovnet10", "lan1")
    addr = f"{vn.lab.addr('vna2', 'wan').ip}:7000"
    stranger = StaticKeyPair.generate().public.b64()  # vna2 expects someone else
    await vn.cmd(
        "vna2",
        "tunnel_add",
        TunnelAdd(
            overlay_id="ovnet10", tunnel_id="t", role="server", listen=addr, peer=PeerKey(name="x", public_key=stranger)
        ),
        TunnelStatus,
    )
    await vn.cmd(
        "vna1",
        "tunnel_add",
        TunnelAdd(
            overlay_id="ovnet10",
            tunnel_id="t",
            role="client",
            connect=addr,
            peer=PeerKey(name="vna2", public_key=await vn.key("vna2")),
        ),
        TunnelStatus,
    )
    assert not await _ping_ok(vn, "asw", "10.1.1.10", tries=3)
    server = await vn.cmd("vna2", "status", Empty(), VnaStatus)
    assert server.tunnels[0].records_in == 0 and server.tunnels[0].bytes_out == 0


async def test_flow_statistics_match_the_traffic(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn = await _reference(vnas_for)
    sub = await vn.bus.nc.subscribe("sf.flow.ovnet10.vna1")
    svc = vn.agents["vna1"]
    await svc.publish_flows_once()  # drain what the set-up sent
    await sub.next_msg(timeout=2)
    result = await asyncio.to_thread(vn.lab.ping, "asw", "10.1.1.10", count=10, timeout=1.0)
    assert result.received == 10
    await svc.publish_flows_once()
    stats = FlowStats.model_validate(codec.decode((await sub.next_msg(timeout=2)).data))
    by_ip = {(f.src_ip, f.dst_ip): f for f in stats.flows}
    out, back = by_ip[("10.1.1.20", "10.1.1.10")], by_ip[("10.1.1.10", "10.1.1.20")]
    assert out.packets == 10 and back.packets == 10
    assert out.src_mac == vn.lab.mac("asw", "eth0") and out.dst_mac == vn.lab.mac("wsw", "eth0")
    frame = out.bytes // 10  # every echo request and reply has the same size
    assert out.bytes == back.bytes == 10 * frame and frame >= 14 + 20 + 8
    assert stats.tunnels and stats.tunnels[0].records_out >= 10


async def test_moved_server_is_reachable_within_a_second_of_its_garp(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn = await _reference(vnas_for)
    lab = vn.lab
    alerts = await vn.bus.nc.subscribe("sf.alert.ovnet10.vna1")
    await asyncio.to_thread(lab.plug, "wsw", "dc1", "lan1")  # WSW moved from dc2 into dc1
    t0 = time.monotonic()
    await asyncio.to_thread(lab.arp, "wsw", "eth0", "10.1.1.10", count=1, timeout=0.05)  # gratuitous ARP
    reached = None
    while time.monotonic() - t0 < 3:
        if (await asyncio.to_thread(lab.ping, "asw", "10.1.1.10", count=1, timeout=0.1)).ok:
            reached = time.monotonic() - t0
            break
    assert reached is not None and reached < 1.0, reached
    moved = Conflict.model_validate(codec.decode((await alerts.next_msg(timeout=3)).data))
    assert moved.kind == "mac-moved" and moved.mac == lab.mac("wsw", "eth0")
    assert moved.ports[-1] == lab.link("vna1", "lan1")


async def test_bridged_loop_between_sites_is_detected(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn = await _reference(vnas_for)
    alerts = await vn.bus.nc.subscribe("sf.alert.ovnet10.>")
    # A second path between the same two switches: every broadcast now circles forever.
    await vn.connect("ovnet10", server="vna2", client="vna1", port=7001, tunnel="second")
    try:
        await asyncio.to_thread(vn.lab.arp, "asw", "eth0", "10.1.1.99", count=1, timeout=0.05)
        deadline = time.monotonic() + 5
        kinds: set[str] = set()
        while time.monotonic() < deadline and "loop" not in kinds:
            try:
                msg = await alerts.next_msg(timeout=deadline - time.monotonic())
            except Exception:
                break
            kinds.add(Conflict.model_validate(codec.decode(msg.data)).kind)
        assert "loop" in kinds
    finally:
        for vna in ("vna1", "vna2"):
            await vn.cmd(vna, "tunnel_remove", TunnelRef(tunnel_id="second"), Ack)


async def test_three_sites_two_overlapping_overlays_stay_isolated(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn: Vnas = await vnas_for("lab-star.yaml")
    lab = vn.lab
    port = 7200
    for overlay in ("ova", "ovb"):
        for vna in ("vnahub", "vnas1", "vnas2"):
            await vn.join(vna, overlay, overlay)
        for spoke in ("vnas1", "vnas2"):
            await vn.connect(overlay, server="vnahub", client=spoke, port=port, tunnel=f"{overlay}-{spoke}")
            port += 1
    # Same addresses on both overlays; each server only ever finds its own overlay's peer.
    assert await _ping_ok(vn, "s1a", "10.9.0.31") and await _ping_ok(vn, "s1b", "10.9.0.31")
    assert lab.arp("s1a", "eth0", "10.9.0.31") == lab.mac("s2a", "eth0")
    assert lab.arp("s1b", "eth0", "10.9.0.31") == lab.mac("s2b", "eth0")
    assert lab.arp("s2b", "eth0", "10.9.0.12") is None  # huba2 exists only on ova
    assert await _ping_ok(vn, "s2a", "10.9.0.12")
