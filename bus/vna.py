"""Command, status and event schemas of the VNA agent (``sf.agent.<vna-id>.<verb>``).

Keys: each VNA generates its own static X25519 identity and never sends the
private half anywhere; the VNM installs the *peers'* public keys (and an
optional pre-shared key) on each tunnel, so a VNA only talks to the peers the
network map says it should.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from bus.models.common import Id, MacAddress, VlanId

# The same modes as the network map's local overlay networks (re-exported).
from bus.models.network import TunnelMode as TunnelMode


class VnaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TunnelRole(StrEnum):
    SERVER = "server"
    CLIENT = "client"


HostPort = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$", description="host:port")]
PublicKeyB64 = Annotated[str, Field(min_length=43, max_length=44, description="X25519 public key, base64")]


class SwitchCreate(VnaMessage):
    """Create the overlay's software switch (idempotent)."""

    overlay_id: Id
    mtu: int = Field(default=1500, ge=576, le=65_000)


class OverlayRef(VnaMessage):
    overlay_id: Id


class SegmentJoin(VnaMessage):
    """Join a local segment (an interface or bridge port on the overlay's LAN) to the switch."""

    overlay_id: Id
    interface: Annotated[str, Field(min_length=1, max_length=15)]
    vlan_id: VlanId | None = Field(default=None, description="802.1q tag; refused where the kernel lacks it")


class SegmentLeave(VnaMessage):
    overlay_id: Id
    interface: Annotated[str, Field(min_length=1, max_length=15)]


class PeerKey(VnaMessage):
    name: Id
    public_key: PublicKeyB64


class TunnelAdd(VnaMessage):
    """A tunnel server (listens, accepts the configured peers) or client (connects to one server)."""

    overlay_id: Id
    tunnel_id: Id
    role: TunnelRole
    mode: TunnelMode = TunnelMode.STREAM
    listen: HostPort | None = Field(default=None, description="server: local address to listen on")
    connect: HostPort | None = Field(default=None, description="client: the server's address")
    local: str | None = Field(default=None, description="vxlan: local underlay address")
    peer: PeerKey | None = Field(
        default=None, description="the one peer this tunnel accepts (server) or dials (client)"
    )
    vni: int | None = Field(default=None, ge=1, le=16_777_215, description="vxlan network identifier")
    path_mtu: int = Field(default=1500, ge=576, le=65_535)


class TunnelRef(VnaMessage):
    tunnel_id: Id


class MacFlush(VnaMessage):
    overlay_id: Id
    mac: MacAddress


class Ack(VnaMessage):
    ok: bool = True
    detail: str = ""


class IdentityView(VnaMessage):
    vna_id: Id
    public_key: PublicKeyB64


class TunnelStatus(VnaMessage):
    tunnel_id: str
    overlay_id: str
    role: TunnelRole
    mode: TunnelMode
    state: str
    peer: str | None = None
    overlay_mtu: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    records_in: int = 0
    records_out: int = 0
    drops: dict[str, int] = Field(default_factory=dict)
    last_handshake: dt.datetime | None = None
    fastpath: bool = Field(default=False, description="Frames move in the native forwarding thread (not Python).")


class PortStatus(VnaMessage):
    name: str
    kind: str


class SwitchStatus(VnaMessage):
    overlay_id: str
    bridge: str
    mtu: int
    ports: list[PortStatus]
    macs: dict[str, str] = Field(default_factory=dict, description="learned MAC -> port")


class VnaStatus(VnaMessage):
    vna_id: str
    health: str
    switches: list[SwitchStatus]
    tunnels: list[TunnelStatus]
    capabilities: dict[str, bool]


class DiscoveredHost(VnaMessage):
    ip: str
    mac: str
    interface: str


class DiscoveredLan(VnaMessage):
    interface: str
    subnets: list[str]
    hosts: list[DiscoveredHost]


class Discovery(VnaMessage):
    __schema_name__ = "skyferry.v1.vna.discovery"
    vna_id: str
    lans: list[DiscoveredLan]


class FlowRecord(VnaMessage):
    src_mac: str
    dst_mac: str
    src_ip: str | None = None
    dst_ip: str | None = None
    packets: int
    bytes: int


class FlowStats(VnaMessage):
    """Published on ``sf.flow.<overlay>.<vna>`` (stream SF_FLOWS) every interval."""

    __schema_name__ = "skyferry.v1.vna.flow_stats"
    vna_id: str
    overlay_id: str
    interval_start: dt.datetime
    interval_end: dt.datetime
    flows: list[FlowRecord]
    tunnels: list[TunnelStatus]


class ConflictKind(StrEnum):
    MAC_MOVED = "mac-moved"
    MAC_DUPLICATE = "mac-duplicate"
    IP_DUPLICATE = "ip-duplicate"
    LOOP = "loop"


class Conflict(VnaMessage):
    """A MAC seen behind two ports, or an IP answered by two MACs."""

    __schema_name__ = "skyferry.v1.vna.conflict"
    vna_id: str
    overlay_id: str
    kind: ConflictKind
    mac: str | None = None
    ip: str | None = None
    ports: list[str] = Field(default_factory=list)
    macs: list[str] = Field(default_factory=list)
    time: dt.datetime
    detail: str = ""
