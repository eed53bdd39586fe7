"""The VNA agent: one software switch per overlay, segment joins, tunnels, discovery, flows, conflicts.

Domain logic lives here; :mod:`vna_agent.service` puts it on the bus. All data-plane
objects are created and driven on a :class:`~vna_agent.netns.NetnsLoop` (the VNA's
namespace in the lab, the host otherwise).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pyroute2 import AsyncIPRoute

from bus.errors import AlreadyExists, NotFound, SkyferryError, Unsupported, ValidationFailed
from bus.vna import (
    Conflict,
    ConflictKind,
    DiscoveredHost,
    DiscoveredLan,
    Discovery,
    FlowRecord,
    FlowStats,
    LoopProtectStatus,
    PortStatus,
    SegmentJoin,
    SwitchCreate,
    SwitchStatus,
    TunnelAdd,
    TunnelMode,
    TunnelRole,
    TunnelStatus,
    VnaStatus,
)
from vna_agent.dataplane import Peer, PublicKey, StaticKeyPair, Switch, Tunnel, TunnelConfig
from vna_agent.dataplane import Role as DpRole
from vna_agent.dataplane import TunnelMode as DpMode
from vna_agent.dataplane.switch import l2_only
from vna_agent.dataplane.vxlan import VxlanSpec
from vna_agent.flows import FlowTable
from vna_agent.l2guard import AlertSink, L2Guard
from vna_agent.loopguard import LoopTiming, PortKind
from vna_agent.netns import NetnsLoop
from vna_agent.state import DesiredState, JoinRecord, StateFileCorrupt, StateStore

log = structlog.get_logger(__name__)
T = TypeVar("T")


def short_name(prefix: str, ident: str) -> str:
    """A stable interface name (<= 15 chars) for an overlay or tunnel id."""
    return f"{prefix}{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def kernel_capabilities() -> dict[str, bool]:
    """What this kernel offers the data plane (probed from /proc and /sys)."""
    mods = Path("/proc/modules").read_text() if Path("/proc/modules").exists() else ""
    return {
        "tap": os.path.exists("/dev/net/tun"),
        "bridge": True,
        "vxlan": True,
        "vlan_8021q": os.path.exists("/proc/net/vlan") or " 8021q " in f" {mods} ",
        "wireguard": "wireguard" in mods,
    }


@dataclass
class OverlaySwitch:
    overlay_id: str
    switch: Switch
    mtu: int
    segments: set[str] = field(default_factory=set)
    flows: FlowTable = field(default_factory=lambda: FlowTable(""))


@dataclass
class TunnelEntry:
    spec: TunnelAdd
    tunnel: Tunnel

    @property
    def port(self) -> str:
        """The tunnel's port on the overlay switch (its TAP, or the kernel VXLAN device)."""
        cfg = self.tunnel.config
        return cfg.vxlan.name if cfg.vxlan is not None else cfg.tap_name


@dataclass(frozen=True)
class RestoreFailure:
    """One piece of the stored configuration that could not be re-applied on start."""

    kind: str  # switch | join | tunnel
    ident: str
    error: str


class VnaAgent:
    """State and operations of one VNA.

    Every switch is guarded (:mod:`vna_agent.l2guard`): MAC moves and flapping are watched as
    the bridge learns, and loop probes find, block and clear bridged loops; the alerts go to
    the sink set with :meth:`set_alert_sink`.

    The accepted configuration is kept in ``<state_dir>/state.json`` (:mod:`vna_agent.state`),
    rewritten atomically by every command that changes it before the command returns, and
    re-applied by :meth:`restore` on start. :meth:`close` takes the data plane down and keeps
    the file: only the removal commands shrink it.
    """

    def __init__(
        self, vna_id: str, state_dir: Path, *, netns: str | None = None, loop_timing: LoopTiming | None = None
    ) -> None:
        self.vna_id = vna_id
        self.state_dir = state_dir
        self.netns = netns
        self.loop = NetnsLoop(netns)
        self.switches: dict[str, OverlaySwitch] = {}
        self.tunnels: dict[str, TunnelEntry] = {}
        self.identity = self._load_identity()
        self.capabilities = kernel_capabilities()
        self.guard = L2Guard(vna_id, loop_timing)
        self.store = StateStore(state_dir, vna_id)
        loaded = self.store.load()
        self.desired: DesiredState = loaded.state
        #: The state file was bad and moved aside at start (the agent started empty).
        self.state_error: StateFileCorrupt | None = loaded.error
        self.state_quarantined: Path | None = loaded.quarantined
        self.restore_failures: list[RestoreFailure] = []

    def _load_identity(self) -> StaticKeyPair:
        path = self.state_dir / "identity.key"
        if path.exists():
            return StaticKeyPair.load(path)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        kp = StaticKeyPair.generate()
        kp.save(path)
        return kp

    def start(self) -> None:
        """Start the data-plane loop (in the VNA's namespace) and the L2 guard on it."""
        self.loop.start()
        self.loop.call(self.guard.open)

    def set_alert_sink(self, sink: AlertSink | None) -> None:
        """Where alerts go; called on the data-plane thread, so it must be thread-safe and quick."""
        self.guard.sink = sink

    async def close(self) -> None:
        """Take the data plane down (tunnels, joins, bridges); the stored configuration stays."""
        for tid in list(self.tunnels):
            await self._stop_tunnel(tid)
        for ov in list(self.switches):
            await self._delete_switch(ov)
        await self.loop.run(self.guard.stop())
        self.loop.stop()

    def _persist(self) -> None:
        """Write the desired configuration now (raises :class:`~vna_agent.state.StateWriteFailed`)."""
        self.store.save(self.desired)

    async def restore(self) -> list[RestoreFailure]:
        """Re-apply the stored configuration: adopt the bridges, re-join segments, re-create tunnels.

        What fails is logged and kept in the file (a re-run of its command applies it again, a
        removal forgets it); it does not stop the rest.
        """
        wanted = self.desired.model_copy(deep=True)
        failures: list[RestoreFailure] = []

        async def attempt(kind: str, ident: str, step: Awaitable[Any]) -> None:
            try:
                await step
            except Exception as exc:  # one bad piece must not keep the rest (or the agent) down
                failures.append(RestoreFailure(kind, ident, str(exc)))
                log.error(
                    "restore_failed", vna=self.vna_id, kind=kind, id=ident, error=str(exc), type=type(exc).__name__
                )

        for sc in wanted.switches.values():
            await attempt("switch", sc.overlay_id, self.switch_create(sc.overlay_id, sc.mtu, persist=False))
        for jr in wanted.joins:
            await attempt("join", f"{jr.request.overlay_id}/{jr.port}", self.segment_join(jr.request, persist=False))
        for ta in wanted.tunnels.values():
            await attempt("tunnel", ta.tunnel_id, self.tunnel_add(ta, persist=False))
        self.restore_failures = failures
        log.info(
            "state_restored",
            vna=self.vna_id,
            switches=len(self.switches),
            joins=sum(len(s.segments) for s in self.switches.values()),
            tunnels=len(self.tunnels),
            failed=len(failures),
        )
        return failures

    # --- switches and segments ------------------------------------------------------------------

    async def switch_create(self, overlay_id: str, mtu: int, *, persist: bool = True) -> OverlaySwitch:
        """Create (or adopt) the overlay's bridge; stored before it returns."""
        if overlay_id in self.switches:
            if persist and overlay_id not in self.desired.switches:  # a previous store failed
                self.desired.switches[overlay_id] = SwitchCreate(
                    overlay_id=overlay_id, mtu=self.switches[overlay_id].mtu
                )
                self._persist()
            return self.switches[overlay_id]
        sw = Switch(short_name("sfo", overlay_id))
        await self.loop.run(sw.create(mtu=mtu))
        await self.loop.run(_in_ns(l2_only, sw.name))
        entry = OverlaySwitch(overlay_id, sw, mtu, flows=FlowTable(overlay_id))
        self.switches[overlay_id] = entry
        await self.loop.run(self.guard.attach(overlay_id, sw))
        if persist:
            self.desired.switches[overlay_id] = SwitchCreate(overlay_id=overlay_id, mtu=mtu)
            self._persist()
        log.info("switch_created", vna=self.vna_id, overlay=overlay_id, bridge=sw.name)
        return entry

    def _switch(self, overlay_id: str) -> OverlaySwitch:
        sw = self.switches.get(overlay_id)
        if sw is None:
            raise NotFound(f"no switch for overlay {overlay_id!r} on {self.vna_id}")
        return sw

    async def switch_remove(self, overlay_id: str) -> None:
        """Remove the switch with its tunnels and joins, and forget them."""
        if overlay_id not in self.switches and overlay_id in self.desired.switches:  # never restored
            self.forget_switch(overlay_id)
            return
        await self._delete_switch(overlay_id)
        self.forget_switch(overlay_id)

    async def _delete_switch(self, overlay_id: str) -> None:
        sw = self._switch(overlay_id)
        for tid, t in list(self.tunnels.items()):
            if t.spec.overlay_id == overlay_id:
                await self._stop_tunnel(tid)
        for seg in list(sw.segments):
            await self._leave(overlay_id, seg)
        await self.loop.run(self.guard.detach(overlay_id))
        await self.loop.run(sw.switch.delete())
        del self.switches[overlay_id]

    def forget_switch(self, overlay_id: str) -> None:
        """Drop a switch (its joins, its tunnels) from the stored configuration."""
        before = self.desired.model_copy(deep=True)
        self.desired.drop_switch(overlay_id)
        if self.desired != before:
            self._persist()

    async def segment_join(self, req: SegmentJoin, *, persist: bool = True) -> None:
        """Put a local segment on the switch; stored before it returns."""
        sw = self._switch(req.overlay_id)
        if req.vlan_id is not None and not self.capabilities["vlan_8021q"]:
            raise Unsupported(
                "802.1q VLAN devices are not available on this kernel; join the VLAN's own bridge or "
                "interface untagged instead",
                details={"vlan_id": req.vlan_id, "interface": req.interface},
            )
        ifname = req.interface
        if req.vlan_id is not None:
            ifname = await self.loop.run(_make_vlan(req.interface, req.vlan_id))
        if ifname in sw.segments:  # joined already: the same answer (stored, if a previous store failed)
            if persist and self.desired.join(req.overlay_id, ifname) is None:
                self.desired.joins.append(JoinRecord(port=ifname, request=req))
                self._persist()
            return
        for other in self.switches.values():
            if ifname in other.segments:
                raise AlreadyExists(f"{ifname} is already joined to overlay {other.overlay_id}")
        await self.loop.run(sw.switch.add_port(ifname, mtu=sw.mtu))
        sw.segments.add(ifname)
        await self.loop.run(self.guard.port_added(req.overlay_id, ifname, PortKind.SEGMENT, ifname))
        if persist:
            self.desired.drop_join(req.overlay_id, ifname)
            self.desired.joins.append(JoinRecord(port=ifname, request=req))
            self._persist()

    async def segment_leave(self, overlay_id: str, interface: str) -> None:
        """Detach a segment from the switch and forget the join."""
        sw = self.switches.get(overlay_id)
        if (sw is None or interface not in sw.segments) and self.desired.join(overlay_id, interface) is not None:
            self.forget_join(overlay_id, interface)  # never restored
            return
        sw = self._switch(overlay_id)
        if interface not in sw.segments:
            raise NotFound(f"{interface} is not joined to {overlay_id}")
        await self._leave(overlay_id, interface)
        self.forget_join(overlay_id, interface)

    async def _leave(self, overlay_id: str, interface: str) -> None:
        sw = self._switch(overlay_id)
        await self.loop.run(self.guard.port_removed(overlay_id, interface))
        await self.loop.run(sw.switch.remove_port(interface))
        sw.segments.discard(interface)

    def forget_join(self, overlay_id: str, interface: str) -> None:
        """Drop a segment join from the stored configuration."""
        if self.desired.drop_join(overlay_id, interface):
            self._persist()

    async def mac_flush(self, overlay_id: str, mac: str) -> int:
        sw = self._switch(overlay_id)
        return int(await self.loop.run(sw.switch.flush_mac(mac)))

    # --- tunnels --------------------------------------------------------------------------------

    async def tunnel_add(self, req: TunnelAdd, *, persist: bool = True) -> Tunnel:
        """Start a tunnel on its switch; stored before it returns (undone if it cannot be stored)."""
        if req.tunnel_id in self.tunnels:
            raise AlreadyExists(f"tunnel {req.tunnel_id!r} exists")
        sw = self._switch(req.overlay_id)
        cfg = self._tunnel_config(req, sw)
        peer = None
        if req.peer is not None:
            peer = Peer(req.peer.name, PublicKey.from_b64(req.peer.public_key))
        elif req.mode in (TunnelMode.STREAM, TunnelMode.DATAGRAM):
            raise ValidationFailed("encrypted tunnels need the peer's public key")
        tunnel = Tunnel(cfg, identity=self.identity, peer=peer, flow_hook=sw.flows.hook, flow_sampler=sw.flows.sample)
        await self.loop.run(tunnel.start())
        entry = TunnelEntry(req, tunnel)
        self.tunnels[req.tunnel_id] = entry
        await self.loop.run(_in_ns(l2_only, entry.port))
        peer_vna = req.peer.name if req.peer else None  # the VNM names a VNA's peer by its VNA id
        await self.loop.run(
            self.guard.port_added(req.overlay_id, entry.port, PortKind.TUNNEL, req.tunnel_id, peer=peer_vna)
        )
        if persist:
            self.desired.tunnels[req.tunnel_id] = req
            try:
                self._persist()
            except SkyferryError:
                del self.desired.tunnels[req.tunnel_id]
                await self._stop_tunnel(req.tunnel_id)
                raise
        log.info("tunnel_added", vna=self.vna_id, tunnel=req.tunnel_id, mode=req.mode.value, role=req.role.value)
        return tunnel

    def _tunnel_config(self, req: TunnelAdd, sw: OverlaySwitch) -> TunnelConfig:
        role = DpRole.SERVER if req.role is TunnelRole.SERVER else DpRole.CLIENT
        addr_text = req.listen if role is DpRole.SERVER else req.connect
        if req.mode is TunnelMode.VXLAN:
            if not (req.connect and req.local and req.vni):
                raise ValidationFailed("vxlan tunnels need connect (remote), local and vni")
            remote, port = _hostport(req.connect)
            spec = VxlanSpec(
                name=short_name("sfx", req.tunnel_id),
                vni=req.vni,
                remote=remote,
                local=req.local,
                port=port,
                underlay_mtu=req.path_mtu,
            )
            return TunnelConfig(
                name=req.tunnel_id, mode=DpMode.VXLAN, role=role, bridge=sw.switch.name, vxlan=spec, mtu=sw.mtu
            )
        if not addr_text:
            raise ValidationFailed(f"a tunnel {role.value} needs {'listen' if role is DpRole.SERVER else 'connect'}")
        return TunnelConfig(
            name=req.tunnel_id,
            mode=DpMode(req.mode.value),
            role=role,
            address=_hostport(addr_text),
            bridge=sw.switch.name,
            tap=short_name("sft", req.tunnel_id),
            mtu=sw.mtu,
            path_mtu=req.path_mtu,
        )

    async def tunnel_remove(self, tunnel_id: str) -> None:
        """Stop a tunnel and forget it."""
        if tunnel_id not in self.tunnels and tunnel_id in self.desired.tunnels:  # never restored
            self.forget_tunnel(tunnel_id)
            return
        await self._stop_tunnel(tunnel_id)
        self.forget_tunnel(tunnel_id)

    async def _stop_tunnel(self, tunnel_id: str) -> None:
        entry = self.tunnels.pop(tunnel_id, None)
        if entry is None:
            raise NotFound(f"no tunnel {tunnel_id!r}")
        await self.loop.run(self.guard.port_removed(entry.spec.overlay_id, entry.port))
        await self.loop.run(entry.tunnel.stop())

    def forget_tunnel(self, tunnel_id: str) -> None:
        """Drop a tunnel from the stored configuration."""
        if self.desired.tunnels.pop(tunnel_id, None) is not None:
            self._persist()

    # --- views ----------------------------------------------------------------------------------

    def tunnel_status(self, entry: TunnelEntry) -> TunnelStatus:
        st: dict[str, Any] = entry.tunnel.status()
        session = st.get("session") or {}
        last_hs = st.get("last_handshake")
        return TunnelStatus(
            tunnel_id=entry.spec.tunnel_id,
            overlay_id=entry.spec.overlay_id,
            role=entry.spec.role,
            mode=entry.spec.mode,
            state=str(st.get("state", "unknown")),
            peer=session.get("peer") or (entry.spec.peer.name if entry.spec.peer else None),
            overlay_mtu=(st.get("mtu") or {}).get("overlay_mtu"),
            bytes_in=int(st.get("bytes_in", 0)),
            bytes_out=int(st.get("bytes_out", 0)),
            records_in=int(st.get("records_in", 0)),
            records_out=int(st.get("records_out", 0)),
            drops={k: int(v) for k, v in (st.get("drops") or {}).items()},
            handshakes_refused=int(st.get("handshakes_refused", 0)),
            handshakes_failed=int(st.get("handshakes_failed", 0)),
            receiver_index=session.get("current_index"),
            last_handshake=dt.datetime.fromtimestamp(last_hs, dt.UTC) if isinstance(last_hs, int | float) else None,
            fastpath=bool(st.get("fastpath")),
        )

    async def switch_status(self, sw: OverlaySwitch) -> SwitchStatus:
        ports = await self.loop.run(sw.switch.ports())
        fdb = await self.loop.run(sw.switch.fdb())
        loop_protect = await self.loop.run(self._guard_status(sw.overlay_id))
        kinds = {t.port: "tunnel" for t in self.tunnels.values()}
        blocked = {b.port: b.reason for b in loop_protect.blocked} if loop_protect else {}
        return SwitchStatus(
            overlay_id=sw.overlay_id,
            bridge=sw.switch.name,
            mtu=sw.mtu,
            ports=[
                PortStatus(
                    name=p,
                    kind=kinds.get(p, "segment" if p in sw.segments else "other"),
                    blocked=p in blocked,
                    blocked_reason=blocked.get(p),
                )
                for p in ports
            ],
            macs={e.mac: e.port for e in fdb if not e.local and not e.static},
            loop_protect=loop_protect,
        )

    async def _guard_status(self, overlay_id: str) -> LoopProtectStatus | None:
        return self.guard.status(overlay_id)

    def unapplied(self) -> list[str]:
        """Stored configuration that is not in effect (it failed to re-apply after a restart)."""
        d = self.desired
        out = [f"switch {ov}" for ov in d.switches if ov not in self.switches]
        out += [
            f"join {j.request.overlay_id}/{j.port}"
            for j in d.joins
            if j.request.overlay_id not in self.switches or j.port not in self.switches[j.request.overlay_id].segments
        ]
        out += [f"tunnel {tid}" for tid in d.tunnels if tid not in self.tunnels]
        return out

    async def status(self) -> VnaStatus:
        """Switches, tunnels, health: ``degraded`` when a tunnel is not up, loop protection blocks a
        port, or the stored configuration is not all in effect (or was unreadable at start)."""
        switches = [await self.switch_status(sw) for sw in self.switches.values()]
        tunnels = [self.tunnel_status(t) for t in self.tunnels.values()]
        blocking = any(s.loop_protect and s.loop_protect.blocked for s in switches)
        healthy = all(t.state == "up" for t in tunnels) and not blocking
        healthy = healthy and self.state_error is None and not self.unapplied()
        health = "ok" if healthy else "degraded"
        return VnaStatus(
            vna_id=self.vna_id, health=health, switches=switches, tunnels=tunnels, capabilities=self.capabilities
        )

    async def discover(self) -> Discovery:
        lans = await self.loop.run(_discover())
        return Discovery(vna_id=self.vna_id, lans=lans)

    def flow_stats(self, sw: OverlaySwitch) -> tuple[FlowStats, list[Conflict]]:
        for t in self.tunnels.values():
            if t.spec.overlay_id == sw.overlay_id:
                t.tunnel.flush_flows()
        start, end, counts, ip_conflicts = sw.flows.drain()
        flows = [
            FlowRecord(src_mac=k[0], dst_mac=k[1], src_ip=k[2], dst_ip=k[3], packets=v[0], bytes=v[1])
            for k, v in sorted(counts.items(), key=lambda kv: -kv[1][1])
        ]
        tunnels = [self.tunnel_status(t) for t in self.tunnels.values() if t.spec.overlay_id == sw.overlay_id]
        now = dt.datetime.now(dt.UTC)
        conflicts = [
            Conflict(
                vna_id=self.vna_id,
                overlay_id=sw.overlay_id,
                kind=ConflictKind.IP_DUPLICATE,
                ip=ip,
                macs=[a, b],
                time=now,
                detail=f"{ip} answered by {a} and {b}",
            )
            for ip, a, b in ip_conflicts
        ]
        stats = FlowStats(
            vna_id=self.vna_id,
            overlay_id=sw.overlay_id,
            interval_start=dt.datetime.fromtimestamp(start, dt.UTC),
            interval_end=dt.datetime.fromtimestamp(end, dt.UTC),
            flows=flows,
            tunnels=tunnels,
        )
        return stats, conflicts


async def _in_ns(fn: Callable[..., T], *args: Any) -> T:
    """A plain call as a coroutine, to run it on the namespace's loop."""
    return fn(*args)


async def _make_vlan(parent: str, vlan_id: int) -> str:
    name = f"{parent[:10]}.{vlan_id}"
    async with AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname=parent))[0]
        if not await ipr.link_lookup(ifname=name):  # made by this agent before a restart: adopt it
            await ipr.link("add", ifname=name, kind="vlan", link=idx, vlan_id=vlan_id)
        await ipr.link("set", ifname=name, state="up")
    return name


async def _discover() -> list[DiscoveredLan]:
    from vna_agent.dataplane.switch import collect

    async with AsyncIPRoute() as ipr:
        links = {m["index"]: m.get_attr("IFLA_IFNAME") for m in await collect(await ipr.get_links())}
        addrs: dict[int, list[str]] = {}
        for a in await collect(await ipr.get_addr()):
            addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        hosts: dict[int, list[DiscoveredHost]] = {}
        for n in await collect(await ipr.get_neighbours()):
            ip, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            if ip and mac and n["ifindex"] in links:
                hosts.setdefault(n["ifindex"], []).append(DiscoveredHost(ip=ip, mac=mac, interface=links[n["ifindex"]]))
    return [
        DiscoveredLan(interface=name, subnets=sorted(addrs.get(idx, [])), hosts=hosts.get(idx, []))
        for idx, name in sorted(links.items())
        if name != "lo"
    ]
