"""The plan: every namespace, bridge, NIC (veth pair), VLAN interface and route of a lab, as data.

:func:`plan` turns a validated :class:`~deploy.lab.spec.LabSpec` (plus the
lab's current re-plugs) into a :class:`Topology`. It is pure: no netlink, no
root, so it is unit-tested on its own and :mod:`deploy.lab.builder` only
compares it with the kernel and applies the difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from deploy.lab import naming as n
from deploy.lab.errors import LabNotFound, LabSpecError
from deploy.lab.spec import (
    INTERNET_HOST,
    CloudSite,
    DatacenterSite,
    LabSpec,
    LanMode,
    routed_subnet,
)

#: Re-plugs: (host, NIC) -> (site, LAN) it is plugged into now, or ``None`` when unplugged.
Overrides = Mapping[tuple[str, str], tuple[str, str] | None]


class Role(StrEnum):
    """What a lab namespace is."""

    INTERNET = "internet"
    EDGE = "edge"
    SWITCH = "switch"
    SERVER = "server"
    VNA = "vna"


@dataclass(frozen=True)
class HostPlan:
    """One namespace."""

    host: str
    ns: str
    role: Role
    site: str | None
    forward: bool = False


@dataclass(frozen=True)
class BridgePlan:
    """A bridge inside a switch (or the internet) namespace."""

    host: str
    ifname: str
    mtu: int
    site: str | None
    lans: tuple[str, ...]
    vlan_filtering: bool = False
    address: IPv4Interface | None = None


@dataclass(frozen=True)
class Attachment:
    """Where a NIC's switch-side port is plugged: a bridge, with the access VLAN or trunked VLANs."""

    site: str | None
    lan: str | None
    sw_host: str
    bridge: str
    pvid: int | None = None
    tagged: tuple[int, ...] = ()


@dataclass(frozen=True)
class NicPlan:
    """A veth pair: ``ifname`` inside ``host``, ``port`` on a bridge of ``attach.sw_host``."""

    host: str
    ifname: str
    mac: str
    mtu: int
    address: IPv4Interface | None
    port: str
    port_mac: str
    home: Attachment
    attach: Attachment | None
    movable: bool = False


@dataclass(frozen=True)
class VlanPlan:
    """An 802.1q sub-interface (VLAN trunk mode only)."""

    host: str
    ifname: str
    parent: str
    vlan_id: int
    mtu: int


@dataclass(frozen=True)
class RoutePlan:
    """A static route."""

    host: str
    dst: IPv4Network
    gateway: IPv4Address


@dataclass(frozen=True)
class Topology:
    """Everything a lab consists of."""

    lan_mode: LanMode
    hosts: dict[str, HostPlan]
    bridges: tuple[BridgePlan, ...]
    nics: dict[tuple[str, str], NicPlan]
    vlans: tuple[VlanPlan, ...] = ()
    routes: tuple[RoutePlan, ...] = ()
    lan_bridges: dict[tuple[str, str], Attachment] = field(default_factory=dict)

    def host(self, host: str) -> HostPlan:
        """The plan of a host id (raises :class:`LabNotFound`)."""
        try:
            return self.hosts[host]
        except KeyError:
            raise LabNotFound(f"no host {host!r} in this lab", details={"host": host}) from None

    def nic(self, host: str, ifname: str) -> NicPlan:
        """The plan of a NIC (raises :class:`LabNotFound`)."""
        self.host(host)
        try:
            return self.nics[(host, ifname)]
        except KeyError:
            raise LabNotFound(f"host {host!r} has no NIC {ifname!r}", details={"host": host, "nic": ifname}) from None

    def nics_of(self, host: str) -> list[NicPlan]:
        """The NICs of a host, in plan order."""
        return [p for (h, _), p in self.nics.items() if h == host]

    def lan(self, site: str, lan: str) -> Attachment:
        """How to plug into ``lan`` of ``site`` (raises :class:`LabNotFound`)."""
        try:
            return self.lan_bridges[(site, lan)]
        except KeyError:
            raise LabNotFound(f"site {site!r} has no LAN {lan!r}", details={"site": site, "lan": lan}) from None

    def ports(self) -> Iterator[tuple[str, str]]:
        """(switch host, port) of every NIC, wherever it is plugged now."""
        for p in self.nics.values():
            yield ((p.attach or p.home).sw_host, p.port)


class _Alloc:
    """Deterministic address allocation in a subnet, skipping addresses already taken."""

    def __init__(self, subnet: IPv4Network, taken: set[IPv4Address], start: int) -> None:
        self.subnet = subnet
        self.taken = set(taken)
        self.hosts = list(subnet.hosts())
        self.start = start

    def take(self, fixed: IPv4Interface | IPv4Address | None = None) -> IPv4Interface:
        if fixed is not None:
            ip = fixed.ip if isinstance(fixed, IPv4Interface) else fixed
        else:
            free = [h for h in self.hosts[self.start :] if h not in self.taken]
            if not free:
                raise LabSpecError(f"no free address left in {self.subnet}", details={"subnet": str(self.subnet)})
            ip = free[0]
        self.taken.add(ip)
        return IPv4Interface(f"{ip}/{self.subnet.prefixlen}")


def resolve_lan_mode(requested: LanMode, vlan_trunk_supported: bool) -> LanMode:
    """The LAN mode to build: ``auto`` picks a VLAN trunk where the kernel has one."""
    if requested is LanMode.AUTO:
        return LanMode.VLAN_TRUNK if vlan_trunk_supported else LanMode.BRIDGE_PER_LAN
    return requested


class _Planner:
    def __init__(self, spec: LabSpec, names: n.Names, lan_mode: LanMode) -> None:
        self.spec = spec
        self.names = names
        self.trunk = lan_mode is LanMode.VLAN_TRUNK
        self.topo = Topology(lan_mode=lan_mode, hosts={}, bridges=(), nics={})
        self.bridges: list[BridgePlan] = []
        self.vlans: list[VlanPlan] = []
        self.routes: list[RoutePlan] = []
        self.underlay_ip: dict[str, IPv4Address] = {}

    # -- helpers -----------------------------------------------------------------------------------------------

    def add_host(self, host: str, role: Role, site: str | None, forward: bool = False) -> None:
        self.topo.hosts[host] = HostPlan(host=host, ns=self.names.ns(host), role=role, site=site, forward=forward)

    def add_nic(
        self,
        host: str,
        ifname: str,
        port: str,
        home: Attachment,
        *,
        mtu: int,
        address: IPv4Interface | None = None,
        mac: str | None = None,
        movable: bool = False,
    ) -> None:
        n.check_ifname(ifname)
        n.check_ifname(port)
        self.topo.nics[(host, ifname)] = NicPlan(
            host=host,
            ifname=ifname,
            mac=mac or n.derived_mac(host, ifname),
            mtu=mtu,
            address=address,
            port=port,
            port_mac=n.derived_mac(home.sw_host, port),
            home=home,
            attach=home,
            movable=movable,
        )

    # -- sites -------------------------------------------------------------------------------------------------

    def underlay(self) -> None:
        u = self.spec.underlay
        fixed = {s.edge.underlay_address for s in self.spec.sites if s.edge.underlay_address is not None}
        alloc = _Alloc(u.subnet, fixed, start=10)
        self.add_host(INTERNET_HOST, Role.INTERNET, None)
        own = u.address or next(iter(u.subnet.hosts()))
        alloc.taken.add(own)
        self.bridges.append(
            BridgePlan(
                INTERNET_HOST, n.UNDERLAY_BRIDGE, u.mtu, None, (), address=IPv4Interface(f"{own}/{u.subnet.prefixlen}")
            )
        )
        for site in self.spec.sites:
            self.underlay_ip[site.name] = alloc.take(site.edge.underlay_address).ip

    def edge(self, site: DatacenterSite | CloudSite) -> None:
        edge = n.edge_host(site.name)
        self.add_host(edge, Role.EDGE, site.name, forward=True)
        self.add_host(n.switch_host(site.name), Role.SWITCH, site.name)
        u = self.spec.underlay
        uplink = Attachment(None, None, INTERNET_HOST, n.UNDERLAY_BRIDGE)
        address = IPv4Interface(f"{self.underlay_ip[site.name]}/{u.subnet.prefixlen}")
        self.add_nic(edge, n.EDGE_UPLINK, site.name, uplink, mtu=u.mtu, address=address)
        for other in self.spec.sites:
            if other.name != site.name:
                self.routes.append(RoutePlan(edge, routed_subnet(other), self.underlay_ip[other.name]))
        # the internet host reaches every routed subnet, like an end user would
        self.routes.append(RoutePlan(INTERNET_HOST, routed_subnet(site), self.underlay_ip[site.name]))

    def plain_lan(self, site: str, lan: str, mtu: int, gateway: IPv4Interface | None) -> Attachment:
        """A LAN built as its own bridge (data-center wan, cloud vpc, every LAN in bridge-per-LAN mode)."""
        sw = n.switch_host(site)
        att = Attachment(site, lan, sw, n.lan_bridge(lan))
        self.bridges.append(BridgePlan(sw, n.lan_bridge(lan), mtu, site, (lan,)))
        self.topo.lan_bridges[(site, lan)] = att
        if gateway is not None:
            self.add_nic(n.edge_host(site), lan, n.edge_port(lan), att, mtu=mtu, address=gateway)
        return att

    def datacenter(self, site: DatacenterSite) -> None:
        self.edge(site)
        wan = routed_subnet(site)
        u = self.spec.underlay
        alloc = _Alloc(wan, {v.wan_address.ip for v in site.vnas if v.wan_address is not None}, start=9)
        edge_wan = alloc.take(next(wan.hosts()))
        wan_att = self.plain_lan(site.name, n.WAN_LAN, u.mtu, edge_wan)
        sw = n.switch_host(site.name)
        if self.trunk:
            missing = [lan.name for lan in site.lans if lan.vlan is None]
            if missing:
                raise LabSpecError(f"vlan-trunk mode needs a vlan id on every LAN; {site.name} lacks {missing}")
            mtu = max((lan.mtu for lan in site.lans), default=1500)
            self.bridges.append(
                BridgePlan(sw, n.TRUNK_BRIDGE, mtu, site.name, tuple(x.name for x in site.lans), vlan_filtering=True)
            )
        for lan in site.lans:
            gw = IPv4Interface(f"{lan.gateway}/{lan.subnet.prefixlen}") if lan.gateway else None
            if not self.trunk:
                self.plain_lan(site.name, lan.name, lan.mtu, gw)
                continue
            att = Attachment(site.name, lan.name, sw, n.TRUNK_BRIDGE, pvid=lan.vlan)
            self.topo.lan_bridges[(site.name, lan.name)] = att
            if gw is not None:
                self.add_nic(n.edge_host(site.name), lan.name, n.edge_port(lan.name), att, mtu=lan.mtu, address=gw)
        lans = {lan.name: lan for lan in site.lans}
        for server in site.servers:
            self.add_host(server.name, Role.SERVER, site.name)
            for i, nic in enumerate(server.nics):
                assert nic.name is not None  # set by ServerSpec validation
                att = self.topo.lan_bridges[(site.name, nic.lan)]
                port = n.host_port(server.name, i)
                mtu = lans[nic.lan].mtu
                self.add_nic(server.name, nic.name, port, att, mtu=mtu, address=nic.address, mac=nic.mac, movable=True)
            if server.gateway is not None:
                self.routes.append(RoutePlan(server.name, IPv4Network("0.0.0.0/0"), server.gateway))
        for vna in site.vnas:
            self.add_host(vna.name, Role.VNA, site.name)
            addr = alloc.take(vna.wan_address)
            self.add_nic(vna.name, n.VNA_WAN, n.host_port(vna.name, 0), wan_att, mtu=u.mtu, address=addr)
            self.routes.append(RoutePlan(vna.name, IPv4Network("0.0.0.0/0"), edge_wan.ip))
            if self.trunk and vna.lans:
                vids = tuple(sorted(lans[x].vlan or 0 for x in vna.lans))
                mtu = max(lans[x].mtu for x in vna.lans)
                trunk = Attachment(site.name, None, sw, n.TRUNK_BRIDGE, tagged=vids)
                self.add_nic(vna.name, n.VNA_TRUNK, n.host_port(vna.name, 1), trunk, mtu=mtu)
                for x in vna.lans:
                    self.vlans.append(VlanPlan(vna.name, x, n.VNA_TRUNK, lans[x].vlan or 0, lans[x].mtu))
                continue
            for i, x in enumerate(vna.lans, start=1):
                att = self.topo.lan_bridges[(site.name, x)]
                self.add_nic(vna.name, x, n.host_port(vna.name, i), att, mtu=lans[x].mtu, movable=True)

    def cloud(self, site: CloudSite) -> None:
        self.edge(site)
        u = self.spec.underlay
        fixed = {x.address.ip for x in site.servers if x.address is not None}
        fixed |= {x.address.ip for x in site.vnas if x.address is not None}
        alloc = _Alloc(site.subnet, fixed, start=9)
        gw = alloc.take(next(site.subnet.hosts()))
        att = self.plain_lan(site.name, n.CLOUD_LAN, u.mtu, gw)
        default = IPv4Network("0.0.0.0/0")
        for server in site.servers:
            self.add_host(server.name, Role.SERVER, site.name)
            addr = alloc.take(server.address)
            port = n.host_port(server.name, 0)
            self.add_nic(server.name, server.nic, port, att, mtu=u.mtu, address=addr, mac=server.mac, movable=True)
            self.routes.append(RoutePlan(server.name, default, gw.ip))
        for vna in site.vnas:
            self.add_host(vna.name, Role.VNA, site.name)
            addr = alloc.take(vna.address)
            self.add_nic(vna.name, n.VNA_WAN, n.host_port(vna.name, 0), att, mtu=u.mtu, address=addr)
            self.routes.append(RoutePlan(vna.name, default, gw.ip))

    def apply_overrides(self, overrides: Overrides) -> None:
        for (host, ifname), target in overrides.items():
            nic = self.topo.nic(host, ifname)
            if not nic.movable:
                raise LabSpecError(f"{host}/{ifname} cannot be re-plugged", details={"host": host, "nic": ifname})
            attach = self.topo.lan(*target) if target is not None else None
            self.topo.nics[(host, ifname)] = NicPlan(**{**nic.__dict__, "attach": attach})

    def build(self, overrides: Overrides) -> Topology:
        self.underlay()
        for site in self.spec.sites:
            if isinstance(site, DatacenterSite):
                self.datacenter(site)
            else:
                self.cloud(site)
        self.apply_overrides(overrides)
        return Topology(
            lan_mode=self.topo.lan_mode,
            hosts=self.topo.hosts,
            bridges=tuple(self.bridges),
            nics=self.topo.nics,
            vlans=tuple(self.vlans),
            routes=tuple(self.routes),
            lan_bridges=self.topo.lan_bridges,
        )


def plan(spec: LabSpec, names: n.Names, lan_mode: LanMode, overrides: Overrides | None = None) -> Topology:
    """The full topology of ``spec`` under ``names``, with NICs re-plugged as ``overrides`` say.

    ``lan_mode`` must already be resolved (not ``auto``): see :func:`resolve_lan_mode`.
    """
    if lan_mode is LanMode.AUTO:
        raise LabSpecError("resolve the LAN mode before planning")
    return _Planner(spec, names, lan_mode).build(overrides or {})
