"""The lab description (YAML): an underlay "internet", data centers and public clouds.

A spec is validated when it is built: names fit the interface-name budget,
every reference resolves, addresses sit in their subnets and do not collide.
Addresses left out are assigned later, deterministically, by
:mod:`deploy.lab.topology`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from deploy.lab.errors import LabSpecError

SITE_RE = r"^[a-z][a-z0-9-]{0,9}$"
HOST_RE = r"^[a-z][a-z0-9-]{0,9}$"
LAN_RE = r"^[a-z][a-z0-9-]{0,7}$"
NIC_RE = r"^[a-z][a-z0-9_.-]{0,14}$"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

#: LAN names the lab uses itself: the data-center edge subnet, the cloud subnet, the VNA trunk.
RESERVED_LANS = frozenset({"wan", "vpc", "trunk", "inet0", "lo"})
#: Host ids the lab uses itself (besides ``<site>-edge`` and ``<site>-sw``).
INTERNET_HOST = "internet"
MAX_NICS = 8

SiteName = Annotated[str, Field(pattern=SITE_RE, description="Site name, at most 10 chars: [a-z][a-z0-9-]*.")]
HostName = Annotated[str, Field(pattern=HOST_RE, description="Server/VNA name, unique in the lab, at most 10 chars.")]
LanName = Annotated[str, Field(pattern=LAN_RE, description="LAN name, unique in its site, at most 8 chars.")]
NicName = Annotated[str, Field(pattern=NIC_RE, description="Interface name inside the server, e.g. eth0.")]


class LanMode(StrEnum):
    """How LANs (VLANs) of a site are built."""

    BRIDGE_PER_LAN = "bridge-per-lan"
    """One Linux bridge per LAN; works on every kernel; VLAN ids are metadata."""
    VLAN_TRUNK = "vlan-trunk"
    """One VLAN-filtering bridge per site, access ports with the LAN's PVID; needs 802.1q + vlan_filtering."""
    AUTO = "auto"
    """VLAN trunk where the kernel has it, else one bridge per LAN."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _mac(value: str) -> str:
    mac = value.strip().lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise ValueError(f"not a MAC address: {value!r}")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"multicast MAC not allowed on a NIC: {value!r}")
    return mac


MacAddress = Annotated[str, AfterValidator(_mac)]


def fit_subnet(address: IPv4Interface, subnet: IPv4Network) -> IPv4Interface:
    """Give a bare address (``/32``) the subnet's prefix length; check it lies in the subnet."""
    if address.ip not in subnet:
        raise ValueError(f"{address.ip} is not in {subnet}")
    if address.network.prefixlen == 32 and subnet.prefixlen != 32:
        return IPv4Interface(f"{address.ip}/{subnet.prefixlen}")
    if address.network != subnet:
        raise ValueError(f"{address} does not match the subnet {subnet}")
    if address.ip in (subnet.network_address, subnet.broadcast_address):
        raise ValueError(f"{address.ip} is the network or broadcast address of {subnet}")
    return address


class UnderlaySpec(_Model):
    """The shared "internet": one bridge in its own namespace."""

    subnet: IPv4Network = Field(default=IPv4Network("100.64.0.0/24"), description="Underlay subnet.")
    address: IPv4Address | None = Field(
        default=None, description="Address of the internet host itself on the bridge (default: first host)."
    )
    mtu: int = Field(default=1500, ge=1280, le=9000, description="MTU of every underlay and edge link.")


class EdgeSpec(_Model):
    """A site's edge router."""

    underlay_address: IPv4Address | None = Field(
        default=None, description="Its address on the underlay (default: the 11th, 12th, ... host by site order)."
    )


class LanSpec(_Model):
    """A LAN (or VLAN) of a data center."""

    name: LanName
    subnet: IPv4Network = Field(description="The LAN's subnet.")
    vlan: int | None = Field(default=None, ge=1, le=4094, description="802.1q VLAN id of this LAN, if any.")
    gateway: IPv4Address | None = Field(
        default=None, description="If set, the edge router gets a leg on this LAN with this address."
    )
    mtu: int = Field(default=1500, ge=1280, le=9000)

    @model_validator(mode="after")
    def _gateway_in_subnet(self) -> LanSpec:
        if self.gateway is not None:
            fit_subnet(IPv4Interface(self.gateway), self.subnet)
        return self


class NicSpec(_Model):
    """A server NIC plugged into a LAN of its site."""

    name: NicName | None = Field(default=None, description="Interface name (default eth<index>).")
    lan: LanName = Field(description="LAN of the same site.")
    address: IPv4Interface | None = Field(default=None, description="Address/prefix; none leaves the NIC unnumbered.")
    mac: MacAddress | None = Field(default=None, description="MAC (default derived from server and NIC name).")


class ServerSpec(_Model):
    """A data-center server: a namespace plus a root directory holding its image."""

    name: HostName
    nics: list[NicSpec] = Field(min_length=1, max_length=MAX_NICS)
    gateway: IPv4Address | None = Field(default=None, description="Default gateway, on one of its NIC subnets.")
    services: list[str] = Field(default_factory=list, description="Services its image runs (written to its root).")

    @model_validator(mode="after")
    def _nic_names(self) -> ServerSpec:
        for i, nic in enumerate(self.nics):
            if nic.name is None:
                nic.name = f"eth{i}"
        names = [n.name for n in self.nics]
        if len(set(names)) != len(names) or "lo" in names:
            raise ValueError(f"server {self.name}: NIC names must be unique and not 'lo': {names}")
        return self


class VnaSpec(_Model):
    """A virtual network appliance in a data center: a ``wan`` leg and one leg per joined LAN."""

    name: HostName
    lans: list[LanName] = Field(default_factory=list, max_length=MAX_NICS - 1, description="LANs it joins.")
    wan_address: IPv4Interface | None = Field(default=None, description="Address on the site's wan subnet.")


class DatacenterSite(_Model):
    """A private data center: LANs in a switch namespace, servers, VNAs, an edge router."""

    kind: Literal["datacenter"] = "datacenter"
    name: SiteName
    description: str = ""
    edge: EdgeSpec = Field(default_factory=EdgeSpec)
    wan_subnet: IPv4Network | None = Field(
        default=None,
        description="Routed subnet behind the edge router where VNA wan legs sit (default 198.18.<site index>.0/24).",
    )
    lans: list[LanSpec] = Field(default_factory=list)
    servers: list[ServerSpec] = Field(default_factory=list)
    vnas: list[VnaSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> DatacenterSite:
        lans = {lan.name: lan for lan in self.lans}
        if len(lans) != len(self.lans):
            raise ValueError(f"site {self.name}: duplicate LAN names")
        bad = RESERVED_LANS & lans.keys()
        if bad:
            raise ValueError(f"site {self.name}: reserved LAN names {sorted(bad)}")
        used: dict[str, set[IPv4Address]] = {
            name: {lan.gateway} if lan.gateway else set() for name, lan in lans.items()
        }
        for server in self.servers:
            for nic in server.nics:
                if nic.lan not in lans:
                    raise ValueError(f"server {server.name}: unknown LAN {nic.lan!r} in site {self.name}")
                if nic.address is not None:
                    nic.address = fit_subnet(nic.address, lans[nic.lan].subnet)
                    if nic.address.ip in used[nic.lan]:
                        raise ValueError(f"server {server.name}: address {nic.address.ip} already used on {nic.lan}")
                    used[nic.lan].add(nic.address.ip)
            if server.gateway is not None and not any(
                n.address is not None and server.gateway in n.address.network for n in server.nics
            ):
                raise ValueError(f"server {server.name}: gateway {server.gateway} is on none of its NIC subnets")
        for vna in self.vnas:
            for lan in vna.lans:
                if lan not in lans:
                    raise ValueError(f"vna {vna.name}: unknown LAN {lan!r} in site {self.name}")
            if len(set(vna.lans)) != len(vna.lans):
                raise ValueError(f"vna {vna.name}: LAN listed twice")
        return self

    def _default_wan(self, index: int) -> None:
        """Give the site its default wan subnet and check the VNAs' wan addresses in it."""
        if self.wan_subnet is None:
            self.wan_subnet = IPv4Network(f"198.18.{index}.0/24")
        used = {next(self.wan_subnet.hosts())}
        for vna in self.vnas:
            if vna.wan_address is not None:
                vna.wan_address = fit_subnet(vna.wan_address, self.wan_subnet)
                if vna.wan_address.ip in used:
                    raise ValueError(f"vna {vna.name}: wan address {vna.wan_address.ip} already used")
                used.add(vna.wan_address.ip)


class CloudServerSpec(_Model):
    """A public-cloud server: one NIC with a vendor-assigned address in the cloud subnet."""

    name: HostName
    nic: NicName = "eth0"
    address: IPv4Interface | None = Field(default=None, description="Vendor-assigned address (default: next free).")
    mac: MacAddress | None = None
    services: list[str] = Field(default_factory=list)


class CloudVnaSpec(_Model):
    """A VNA running as a cloud server: a single ``wan`` NIC in the cloud subnet."""

    name: HostName
    address: IPv4Interface | None = None


class CloudSite(_Model):
    """A public cloud: one vendor subnet (a bridge named ``vpc``), its gateway is the edge router."""

    kind: Literal["cloud"] = "cloud"
    name: SiteName
    description: str = ""
    vendor: str = Field(default="lab", description="Vendor label (metadata only).")
    edge: EdgeSpec = Field(default_factory=EdgeSpec)
    subnet: IPv4Network = Field(description="The vendor subnet; routed over the underlay; gateway = first host.")
    servers: list[CloudServerSpec] = Field(default_factory=list)
    vnas: list[CloudVnaSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _addresses(self) -> CloudSite:
        used = {next(self.subnet.hosts())}
        items: list[CloudServerSpec | CloudVnaSpec] = [*self.servers, *self.vnas]
        for item in items:
            if item.address is not None:
                item.address = fit_subnet(item.address, self.subnet)
                if item.address.ip in used:
                    raise ValueError(f"{item.name}: address {item.address.ip} already used in {self.subnet}")
                used.add(item.address.ip)
        return self


def routed_subnet(site: DatacenterSite | CloudSite) -> IPv4Network:
    """The subnet a site announces on the underlay: a data center's wan subnet, a cloud's subnet."""
    if isinstance(site, CloudSite):
        return site.subnet
    if site.wan_subnet is None:  # set by LabSpec validation
        raise LabSpecError(f"site {site.name} has no wan subnet")
    return site.wan_subnet


def _site_kind(value: Any) -> str:
    """``kind`` of a site; data center when left out."""
    kind = value.get("kind", "datacenter") if isinstance(value, dict) else getattr(value, "kind", "datacenter")
    return str(kind)


Site = Annotated[
    Annotated[DatacenterSite, Tag("datacenter")] | Annotated[CloudSite, Tag("cloud")],
    Discriminator(_site_kind),
]


class LabSpec(_Model):
    """A whole lab: the underlay and its sites."""

    name: str = Field(default="lab", description="Label for logs and status.")
    description: str = ""
    underlay: UnderlaySpec = Field(default_factory=UnderlaySpec)
    sites: list[Site] = Field(min_length=1)
    ipv6: bool = Field(default=False, description="Keep IPv6 on lab links (off: no DAD/RA/MLD noise).")
    lan_mode: LanMode = Field(default=LanMode.BRIDGE_PER_LAN, description="How LANs/VLANs are built.")

    @model_validator(mode="after")
    def _global(self) -> LabSpec:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate site names: {names}")
        taken = {INTERNET_HOST}
        for index, site in enumerate(self.sites):
            taken |= {f"{site.name}-edge", f"{site.name}-sw"}
            if isinstance(site, DatacenterSite):
                site._default_wan(index)
        for site in self.sites:
            for host in [*site.servers, *site.vnas]:
                if host.name in taken:
                    raise ValueError(f"host name {host.name!r} is used twice (or is a reserved host id)")
                taken.add(host.name)
        self._check_underlay()
        self._check_routed()
        return self

    def _check_underlay(self) -> None:
        subnet = self.underlay.subnet
        fixed = [s.edge.underlay_address for s in self.sites if s.edge.underlay_address is not None]
        if self.underlay.address is not None:
            fixed.append(self.underlay.address)
        for addr in fixed:
            fit_subnet(IPv4Interface(addr), subnet)
        if len(set(fixed)) != len(fixed):
            raise ValueError("duplicate underlay addresses")
        if subnet.num_addresses < len(self.sites) + 16:
            raise ValueError(f"underlay {subnet} too small for {len(self.sites)} sites")

    def _check_routed(self) -> None:
        routed: list[tuple[str, IPv4Network]] = [("underlay", self.underlay.subnet)]
        routed += [(site.name, routed_subnet(site)) for site in self.sites]
        for i, (a, na) in enumerate(routed):
            for b, nb in routed[i + 1 :]:
                if na.overlaps(nb):
                    raise ValueError(f"routed subnets overlap: {a} {na} and {b} {nb}")

    def site(self, name: str) -> DatacenterSite | CloudSite:
        """The site called ``name`` (raises :class:`KeyError`)."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


def parse_spec(data: Any) -> LabSpec:
    """Validate a decoded YAML/JSON document; raises :class:`LabSpecError`."""
    try:
        return LabSpec.model_validate(data)
    except ValidationError as exc:
        errors = [{"loc": ".".join(str(x) for x in e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise LabSpecError(
            f"invalid lab spec: {errors[0]['loc']}: {errors[0]['msg']}", details={"errors": errors}
        ) from exc


class _Loader(yaml.SafeLoader):
    """YAML without 1.1's surprises: 52:54:00:00:01:14 stays a string (not base 60), "no" stays "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|false|False)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))


def load_spec(source: str | Path) -> LabSpec:
    """Load a spec from a YAML file path (or YAML text when ``source`` is a ``str`` containing a newline)."""
    if isinstance(source, str) and "\n" in source:
        text = source
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise LabSpecError(f"cannot read lab spec {source}: {exc}", details={"path": str(source)}) from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise LabSpecError(f"lab spec is not valid YAML: {exc}") from exc
    return parse_spec(data)
