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
    handshakes_refused: int = Field(default=0, description="Handshake messages refused (a server's junk count).")
    handshakes_failed: int = Field(default=0, description="Handshakes started or awaited that did not complete.")
    receiver_index: int | None = Field(
        default=None, description="Index the peer's records name for the current session (in the clear on the wire)."
    )
    last_handshake: dt.datetime | None = None
    fastpath: bool = Field(default=False, description="Frames move in the native forwarding thread (not Python).")


class PortStatus(VnaMessage):
    name: str
    kind: str
    blocked: bool = Field(
        default=False, description="Loop protection blocks this port (see the switch's loop_protect)."
    )
    blocked_reason: str | None = None


class LoopState(StrEnum):
    """Loop protection of one switch: no loop seen, a loop seen and not (yet) broken here, a port blocked here."""

    OK = "ok"
    LOOPED = "looped"
    BLOCKING = "blocking"


class BlockedPort(VnaMessage):
    """A port loop protection took out of forwarding, and why."""

    port: str
    kind: str = Field(description="tunnel or segment")
    label: str = Field(description="the tunnel id or segment interface behind the port")
    since: dt.datetime
    reason: str
    loop_ports: list[str] = Field(default_factory=list, description="this VNA's ports on the loop")


class LoopProtectStatus(VnaMessage):
    """Loop probes and the ports they blocked (``vna_agent.loopguard``)."""

    state: LoopState = LoopState.OK
    blocked: list[BlockedPort] = Field(default_factory=list)
    probe_interval_s: float
    probes_sent: int = 0
    probes_returned: int = Field(default=0, description="own probes that came back (on any port)")
    peers: list[str] = Field(default_factory=list, description="VNAs whose probes reach this switch")
    deferring_to: str | None = Field(default=None, description="a higher-id VNA on the same loop that breaks it")
    last_detected: dt.datetime | None = None
    last_cleared: dt.datetime | None = None


class SwitchStatus(VnaMessage):
    overlay_id: str
    bridge: str
    mtu: int
    ports: list[PortStatus]
    macs: dict[str, str] = Field(default_factory=dict, description="learned MAC -> port")
    loop_protect: LoopProtectStatus | None = None


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
    LOOP_BLOCKED = "loop-blocked"
    LOOP_CLEARED = "loop-cleared"


class LoopDetector(StrEnum):
    """What found a loop: the VNA's own loop probe came back, or a MAC flapping between ports."""

    PROBE = "probe"
    MAC_FLAP = "mac-flap"


class Conflict(VnaMessage):
    """An alert on ``sf.alert.<overlay>.<vna>``: a MAC seen behind two ports, an IP answered by two MACs,
    or a bridged loop (``loop`` found, ``loop-blocked`` a port taken out of forwarding, ``loop-cleared``
    the port forwards again because the redundant path is gone)."""

    __schema_name__ = "skyferry.v1.vna.conflict"
    vna_id: str
    overlay_id: str
    kind: ConflictKind
    mac: str | None = None
    ip: str | None = None
    ports: list[str] = Field(default_factory=list)
    macs: list[str] = Field(default_factory=list)
    port: str | None = Field(default=None, description="loop-blocked / loop-cleared: the port")
    detector: LoopDetector | None = Field(default=None, description="loop: how it was found")
    time: dt.datetime
    detail: str = ""
