"""Kernel VXLAN for trusted links: no encryption, no user-space data path.

A unicast point-to-point ``vxlan`` link (VNI, remote, local, UDP port) is
created and enslaved to the overlay's bridge; the kernel does the rest at
line rate. Kernel VXLAN does not split frames: the overlay MTU must be at
most the underlay path MTU minus 50 (IPv4) / 70 (IPv6) bytes, and the link
is created with that MTU (see :mod:`vna_agent.dataplane.mtu`). Frames larger
than the VXLAN link's MTU are dropped by the bridge, so size the underlay
(jumbo frames inside a data center) instead of relying on fragmentation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import SwitchError
from .mtu import vxlan_overhead
from .switch import Switch, collect

log = structlog.get_logger("vna_agent.dataplane.vxlan")

VXLAN_PORT = 4789


@dataclass(frozen=True, slots=True)
class VxlanSpec:
    """Parameters of one point-to-point VXLAN link."""

    name: str
    vni: int
    remote: str
    local: str
    port: int = VXLAN_PORT
    underlay_mtu: int = 1500
    device: str | None = None  # underlay interface to bind (optional)


class KernelVxlan:
    """Create/remove a VXLAN link on a :class:`Switch` and read its counters."""

    def __init__(self, spec: VxlanSpec, switch: Switch) -> None:
        self.spec = spec
        self.switch = switch

    @property
    def mtu(self) -> int:
        ipv6 = ipaddress.ip_address(self.spec.remote).version == 6
        return self.spec.underlay_mtu - vxlan_overhead(ipv6=ipv6)

    def _ipr(self) -> AsyncIPRoute:
        ns = self.switch.netns
        return AsyncIPRoute(netns=ns) if ns else AsyncIPRoute()

    async def create(self) -> None:
        """Create the link (replacing a stale one of the same name) and attach it."""
        s = self.spec
        v6 = ipaddress.ip_address(s.remote).version == 6
        kw: dict[str, Any] = {
            "ifname": s.name,
            "kind": "vxlan",
            "vxlan_id": s.vni,
            "vxlan_port": s.port,
            "vxlan_learning": 0,
        }
        if v6:
            kw["vxlan_group6"] = s.remote
            kw["vxlan_local6"] = s.local
        else:
            kw["vxlan_group"] = s.remote
            kw["vxlan_local"] = s.local
        try:
            async with self._ipr() as ipr:
                old = await ipr.link_lookup(ifname=s.name)
                if old:
                    await ipr.link("del", index=old[0])
                if s.device:
                    dev = await ipr.link_lookup(ifname=s.device)
                    if not dev:
                        raise SwitchError(f"no underlay device {s.device}")
                    kw["vxlan_link"] = dev[0]
                await ipr.link("add", **kw)
        except NetlinkError as exc:
            raise SwitchError(f"cannot create vxlan {s.name}: {exc}") from exc
        await self.switch.add_port(s.name, mtu=self.mtu)
        log.info("vxlan_created", name=s.name, vni=s.vni, remote=s.remote, local=s.local, port=s.port, mtu=self.mtu)

    async def delete(self) -> None:
        try:
            async with self._ipr() as ipr:
                found = await ipr.link_lookup(ifname=self.spec.name)
                if found:
                    await ipr.link("del", index=found[0])
        except NetlinkError as exc:
            raise SwitchError(f"cannot delete vxlan {self.spec.name}: {exc}") from exc

    async def counters(self) -> dict[str, int]:
        """Kernel link counters (packets/bytes/drops), empty if the link is gone."""
        async with self._ipr() as ipr:
            found = await ipr.link_lookup(ifname=self.spec.name)
            if not found:
                return {}
            links = await collect(await ipr.link("get", index=found[0]))
            st = links[0].get_attr("IFLA_STATS64") or {}
            keys = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped", "tx_errors")
            return {k: int(st.get(k, 0)) for k in keys}
