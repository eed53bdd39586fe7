"""The reference's example: LAN 1 of two data centers joined to OVNET 10 over an encrypted tunnel."""

from __future__ import annotations

import asyncio

import pytest

from bus.errors import Unsupported
from bus.messages import Empty
from bus.vna import Ack, SegmentJoin, VnaStatus
from tests.e2e.overlay_fixtures import needs_root, tcp_transfer
from vna_agent.dataplane import fastpath

pytestmark = [needs_root, pytest.mark.root]


async def _ping_ok(vn, src: str, dst: str, tries: int = 20) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(tries):
        if (await asyncio.to_thread(vn.lab.ping, src, dst, count=1, timeout=0.5)).ok:
            return True
    return False


@pytest.mark.parametrize("mode", ["stream", "datagram"])
async def test_asw_reaches_wsw_across_data_centers(vnas_for, mode: str) -> None:  # type: ignore[no-untyped-def]
    vn = await vnas_for("lab-reference.yaml")
    lab = vn.lab
    assert lab.arp("asw", "eth0", "10.1.1.10") is None  # no overlay: not even ARP crosses
    for vna in ("vna1", "vna2"):
        await vn.join(vna, "ovnet10", "lan1")
    await vn.connect("ovnet10", server="vna2", client="vna1", mode=mode)
    assert await _ping_ok(vn, "asw", "10.1.1.10")
    # ARP found WSW's own MAC: it is on the same LAN as far as ASW can tell.
    assert lab.arp("asw", "eth0", "10.1.1.10") == lab.mac("wsw", "eth0")
    sent, received = await asyncio.to_thread(tcp_transfer, lab, "asw", "wsw", "10.1.1.10")
    assert sent == received
    status = await vn.cmd("vna1", "status", Empty(), VnaStatus)
    (tun,) = status.tunnels
    assert tun.bytes_out > 2_000_000 and tun.overlay_mtu and tun.overlay_mtu >= 1500
    assert tun.state == "up" and tun.last_handshake is not None and status.health == "ok"
    assert tun.fastpath == fastpath.available()  # the transfer went through the native thread when built
    macs = status.switches[0].macs
    assert macs.get(lab.mac("wsw", "eth0")) not in (None, lab.link("vna1", "lan1"))


async def test_vlan_join_is_refused_clearly_without_8021q(vnas_for) -> None:  # type: ignore[no-untyped-def]
    vn = await vnas_for("lab-reference.yaml")
    status = await vn.cmd("vna1", "status", Empty(), VnaStatus)
    if status.capabilities["vlan_8021q"]:
        pytest.skip("this kernel has 802.1q")
    await vn.join("vna1", "ovnet10", "lan1")
    with pytest.raises(Unsupported, match=r"802\.1q"):
        await vn.cmd(
            "vna1",
            "segment_join",
            SegmentJoin(overlay_id="ovnet10", interface=vn.lab.link("vna1", "lan1"), vlan_id=10),
            Ack,
        )


async def test_discovery_reports_lans_and_hosts(vnas_for) -> None:  # type: ignore[no-untyped-def]
    from bus.vna import Discovery

    vn = await vnas_for("lab-reference.yaml")
    for vna in ("vna1", "vna2"):
        await vn.join(vna, "ovnet10", "lan1")
    await vn.connect("ovnet10", server="vna2", client="vna1")
    assert await _ping_ok(vn, "asw", "10.1.1.10")
    found = await vn.cmd("vna1", "discover", Empty(), Discovery)
    by_if = {lan.interface: lan for lan in found.lans}
    assert any(s.startswith("198.51.100.10/") for s in by_if["wan"].subnets)
    assert vn.lab.link("vna1", "lan1") in by_if


async def test_kernel_vxlan_for_trusted_links(vnas_for) -> None:  # type: ignore[no-untyped-def]
    from bus.vna import TunnelAdd, TunnelStatus

    vn = await vnas_for("lab-reference.yaml")
    lab = vn.lab
    for vna in ("vna1", "vna2"):
        await vn.join(vna, "ovnet10", "lan1")
    a, b = str(lab.addr("vna1", "wan").ip), str(lab.addr("vna2", "wan").ip)
    for vna, local, remote in (("vna1", a, b), ("vna2", b, a)):
        await vn.cmd(
            vna,
            "tunnel_add",
            TunnelAdd(
                overlay_id="ovnet10",
                tunnel_id="vx",
                role="client",
                mode="vxlan",
                connect=f"{remote}:4789",
                local=local,
                vni=10,
            ),
            TunnelStatus,
        )
    assert await _ping_ok(vn, "asw", "10.1.1.10")
    status = await vn.cmd("vna1", "status", Empty(), VnaStatus)
    assert [t.mode for t in status.tunnels] == ["vxlan"]
