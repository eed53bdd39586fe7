"""The benchmark's path through a lab: two test hosts on one LAN name in two data centers, the
VNA joining that LAN in each site, and a routed NIC per host for the plain-underlay figure."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from deploy.lab import Lab, LabSpecError
from deploy.lab.spec import DatacenterSite

#: Name of the routed NIC the harness adds to each test host (peer of a port on the site's br-wan).
ROUTED_NIC = "rt0"


@dataclass(frozen=True)
class Side:
    """One end of the path: a site, its test host and the VNA that joins the host's LAN."""

    site: str
    host: str
    nic: str  # the host's NIC on the LAN
    lan_addr: IPv4Interface
    vna: str
    vna_wan: IPv4Interface
    wan_subnet: IPv4Network
    edge_wan: IPv4Address  # the edge router's address on the wan subnet
    routed: IPv4Interface  # the routed address the harness gives the host (plain path)

    @property
    def port_name(self) -> str:
        """Bridge-side name of the routed NIC's veth (in the site's switch namespace)."""
        return f"{self.host}-rt"[:15]


@dataclass(frozen=True)
class BenchPath:
    """Host ``a`` (iperf3 client, ping source) and host ``b`` (iperf3 server), the LAN between them."""

    a: Side
    b: Side
    lan: str
    lan_mtu: int
    underlay_mtu: int

    def describe(self) -> dict[str, str | int]:
        return {
            "lan": self.lan,
            "lan_mtu": self.lan_mtu,
            "underlay_mtu": self.underlay_mtu,
            "host_a": f"{self.a.host} {self.a.lan_addr} (routed {self.a.routed}) in {self.a.site}",
            "host_b": f"{self.b.host} {self.b.lan_addr} (routed {self.b.routed}) in {self.b.site}",
            "vna_a": f"{self.a.vna} {self.a.vna_wan}",
            "vna_b": f"{self.b.vna} {self.b.vna_wan}",
        }


def _free_address(subnet: IPv4Network, used: set[IPv4Address], start: int = 100) -> IPv4Address:
    hosts = list(subnet.hosts())
    for ip in hosts[start - 1 :] + hosts[: start - 1]:
        if ip not in used:
            return ip
    raise LabSpecError(f"no free address in {subnet}", details={"subnet": str(subnet)})


def _side(lab: Lab, site: DatacenterSite, lan: str) -> Side | None:
    vna = next((v for v in site.vnas if lan in v.lans), None)
    if vna is None:
        return None
    for server in site.servers:
        for nic in server.nics:
            if nic.lan == lan and nic.address is not None and nic.name:
                wan = lab.addr(vna.name, "wan")
                edge = lab.addr(f"{site.name}-edge", "wan")
                if wan is None or edge is None:
                    return None
                used = {edge.ip} | {a.ip for v in site.vnas if (a := lab.addr(v.name, "wan")) is not None}
                routed = _free_address(wan.network, used)
                return Side(
                    site=site.name,
                    host=server.name,
                    nic=nic.name,
                    lan_addr=nic.address,
                    vna=vna.name,
                    vna_wan=wan,
                    wan_subnet=wan.network,
                    edge_wan=edge.ip,
                    routed=IPv4Interface(f"{routed}/{wan.network.prefixlen}"),
                )
    return None


def find_path(lab: Lab, lan: str | None = None) -> BenchPath:
    """The first two data centers that both have LAN ``lan`` (default: any shared LAN name) with a
    server on it and a VNA joining it (``lab-bench.yaml``: hosta/vna1 in dc1, hostb/vna2 in dc2;
    ``lab-reference.yaml``: asw/vna1 in dc1, wsw/vna2 in dc2)."""
    dcs = [s for s in lab.spec.sites if isinstance(s, DatacenterSite)]
    names = [lan] if lan else [x.name for s in dcs for x in s.lans]
    for name in dict.fromkeys(names):
        sides = [side for s in dcs if (side := _side(lab, s, name)) is not None]
        if len(sides) >= 2:
            a, b = sides[0], sides[1]
            lan_mtu = min(x.mtu for s in dcs for x in s.lans if x.name == name and s.name in (a.site, b.site))
            return BenchPath(a=a, b=b, lan=name, lan_mtu=lan_mtu, underlay_mtu=lab.spec.underlay.mtu)
    raise LabSpecError(
        "the benchmark needs two data centers sharing a LAN name, each with a server on it and a VNA joining it",
        details={"lan": lan},
    )


def add_routed_nics(lab: Lab, path: BenchPath) -> None:
    """Give each test host a NIC on its site's wan subnet (MTU of the LAN) and a route to the other
    site's wan subnet through its edge router: the plain, routed, host-to-host underlay path."""
    for me, other in ((path.a, path.b), (path.b, path.a)):
        lab.add_veth_port(me.site, "wan", me.port_name, into=me.host, peer_name=ROUTED_NIC)
        lab.exec(me.host, ["ip", "link", "set", ROUTED_NIC, "mtu", str(path.lan_mtu), "up"], check=True)
        lab.exec(me.host, ["ip", "addr", "replace", str(me.routed), "dev", ROUTED_NIC], check=True)
        lab.exec(
            me.host,
            ["ip", "route", "replace", str(other.wan_subnet), "via", str(me.edge_wan), "dev", ROUTED_NIC],
            check=True,
        )


def remove_routed_nics(lab: Lab, path: BenchPath) -> None:
    """Undo :func:`add_routed_nics` (``Lab.down()`` removes them anyway)."""
    for me in (path.a, path.b):
        lab.remove_veth_port(me.site, "wan", me.port_name)
