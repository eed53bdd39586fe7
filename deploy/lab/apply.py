"""Make the kernel match a :class:`~deploy.lab.topology.Topology`: compare, then change only what differs.

Every ``ensure_*`` returns how many changes it made, so a second ``up()``
reports 0 and touches nothing.
"""

from __future__ import annotations

from typing import Any

import structlog

from deploy.lab import netops
from deploy.lab.errors import NetlinkFailure
from deploy.lab.naming import Names, derived_mac
from deploy.lab.topology import Attachment, BridgePlan, HostPlan, NicPlan, Role, RoutePlan, Topology, VlanPlan

log = structlog.get_logger("deploy.lab")


def host_sysctls(host: HostPlan, ipv6: bool) -> dict[str, str]:
    """Sysctls of a fresh namespace: no IPv6 noise unless asked, forwarding on routers."""
    values: dict[str, str] = {}
    if not ipv6:
        values["net.ipv6.conf.all.disable_ipv6"] = "1"
        values["net.ipv6.conf.default.disable_ipv6"] = "1"
    else:
        values["net.ipv6.conf.default.accept_dad"] = "0"
        values["net.ipv6.conf.default.accept_ra"] = "0"
    if host.forward:
        values["net.ipv4.ip_forward"] = "1"
    return values


class Applier:
    """Holds one netlink socket per namespace while a topology is applied."""

    def __init__(self, names: Names, topo: Topology, *, ipv6: bool = False) -> None:
        self.names = names
        self.topo = topo
        self.ipv6 = ipv6
        self._links: dict[str, netops.NsLinks] = {}

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for links in self._links.values():
            links.close()
        self._links.clear()

    def links(self, host: str) -> netops.NsLinks:
        """The netlink socket of a host's namespace (opened once)."""
        ns = self.topo.host(host).ns
        if ns not in self._links:
            self._links[ns] = netops.NsLinks(ns)
        return self._links[ns]

    def ns_links(self, ns: str) -> netops.NsLinks:
        """The netlink socket of a lab namespace given by name."""
        if ns not in self._links:
            self._links[ns] = netops.NsLinks(ns)
        return self._links[ns]

    # -- namespaces --------------------------------------------------------------------------------------------

    def ensure_host(self, host: HostPlan) -> int:
        if not netops.create_ns(host.ns):
            return 0
        try:
            netops.sysctl(host.ns, host_sysctls(host, self.ipv6))
            self.links(host.host).set("lo", state="up")
        except Exception:
            self._links.pop(host.ns, None)
            netops.remove_ns(host.ns)  # so that the next up() starts this namespace afresh
            raise
        log.debug("lab.ns.created", ns=host.ns, role=str(host.role))
        return 1

    # -- bridges -----------------------------------------------------------------------------------------------

    def ensure_bridge(self, br: BridgePlan) -> int:
        links = self.links(br.host)
        changes = 0
        info = links.info(br.ifname)
        if info is None:
            links.add_bridge(br.ifname, mtu=br.mtu, vlan_filtering=br.vlan_filtering)
            links.set(br.ifname, address=derived_mac(br.host, br.ifname))
            changes += 1
            info = links.info(br.ifname)
        assert info is not None
        if not info["up"]:
            links.set(br.ifname, state="up")
            changes += 1
        if br.address is not None:
            changes += int(links.ensure_address(br.ifname, br.address))
        return changes

    # -- NICs (veth pairs) -------------------------------------------------------------------------------------

    def switch_hosts(self) -> list[str]:
        return [h.host for h in self.topo.hosts.values() if h.role in (Role.SWITCH, Role.INTERNET)]

    def candidates(self, nic: NicPlan) -> list[str]:
        """Switch hosts that may hold ``nic``'s port: its planned one first; any switch if the NIC can move.

        Only movable NICs (servers, VNA LAN legs) have lab-wide unique port names; edge ports are
        named after their LAN and only unique inside their switch namespace.
        """
        first = (nic.attach or nic.home).sw_host
        if not nic.movable:
            return [first]
        return [first, *(h for h in self.switch_hosts() if h != first)]

    def find_port(self, nic: NicPlan) -> str | None:
        """The switch host whose namespace holds ``nic``'s port now."""
        for host in self.candidates(nic):
            if self.links(host).index(nic.port) is not None:
                return host
        return None

    def ensure_nic(self, nic: NicPlan) -> int:
        changes = 0
        links = self.links(nic.host)
        if links.index(nic.ifname) is None:
            for sw in self.candidates(nic):  # a stale port must not block the name
                self.links(sw).delete(nic.port)
            where = (nic.attach or nic.home).sw_host
            self.links(where).add_veth(
                nic.port, nic.port_mac, nic.ifname, self.topo.host(nic.host).ns, nic.mac, nic.mtu
            )
            log.debug("lab.nic.created", host=nic.host, nic=nic.ifname, port=nic.port, switch=where)
            changes += 1
        info = links.info(nic.ifname)
        assert info is not None
        if not info["up"]:
            links.set(nic.ifname, state="up")
            changes += 1
        if nic.address is not None:
            changes += int(links.ensure_address(nic.ifname, nic.address))
        return changes + self.ensure_port(nic)

    def ensure_port(self, nic: NicPlan) -> int:
        """Put the switch-side end where the plan says: on its bridge, or detached and down (unplugged)."""
        where = self.find_port(nic)
        if where is None:
            raise NetlinkFailure(
                f"{nic.host}/{nic.ifname} exists but its port {nic.port} is on no lab switch",
                details={"host": nic.host, "nic": nic.ifname, "port": nic.port},
            )
        changes = 0
        att = nic.attach
        if att is not None and where != att.sw_host:
            self.links(where).move(nic.port, self.topo.host(att.sw_host).ns)
            log.debug("lab.port.moved", port=nic.port, src=where, dst=att.sw_host)
            where = att.sw_host
            changes += 1
        links = self.links(where)
        info = links.info(nic.port)
        assert info is not None
        if att is None:
            if info["master"] is not None or info["up"]:
                links.set(nic.port, master=0, state="down")
                changes += 1
            return changes
        if info["master"] != att.bridge:
            links.set(nic.port, master=links.need(att.bridge))
            self.port_vlans(where, nic.port, att)
            changes += 1
        if not info["up"]:
            links.set(nic.port, state="up")
            changes += 1
        return changes

    def port_vlans(self, sw_host: str, port: str, att: Attachment) -> None:
        ns = self.topo.host(sw_host).ns
        if att.pvid is not None:
            netops.bridge_access_vlan(ns, port, att.pvid)
        elif att.tagged:
            netops.bridge_trunk_vlans(ns, port, att.tagged)

    # -- VLAN sub-interfaces and routes ------------------------------------------------------------------------

    def ensure_vlan(self, vlan: VlanPlan) -> int:
        links = self.links(vlan.host)
        changes = 0
        if links.index(vlan.ifname) is None:
            links.add_vlan(vlan.ifname, vlan.parent, vlan.vlan_id, vlan.mtu)
            changes += 1
        info = links.info(vlan.ifname)
        if info is not None and not info["up"]:
            links.set(vlan.ifname, state="up")
            changes += 1
        return changes

    def ensure_route(self, route: RoutePlan) -> int:
        return int(self.links(route.host).ensure_route(route.dst, route.gateway))

    # -- all ---------------------------------------------------------------------------------------------------

    def apply(self) -> int:
        """Create and configure everything; returns the number of changes."""
        changes = sum(self.ensure_host(h) for h in self.topo.hosts.values())
        changes += sum(self.ensure_bridge(b) for b in self.topo.bridges)
        changes += sum(self.ensure_nic(n) for n in self.topo.nics.values())
        changes += sum(self.ensure_vlan(v) for v in self.topo.vlans)
        changes += sum(self.ensure_route(r) for r in self.topo.routes)
        return changes

    def link_state(self, host: str, ifname: str) -> dict[str, Any] | None:
        """Live state of one link (``None`` when absent)."""
        return self.links(host).info(ifname)
