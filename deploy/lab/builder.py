"""The lab: a hybrid cloud on one machine, built from a :class:`~deploy.lab.spec.LabSpec`.

>>> with Lab(load_spec("deploy/samples/lab-reference.yaml")) as lab:   # doctest: +SKIP
...     lab.ping("asw", "198.51.100.10")
...     lab.exec("wsw", ["ip", "-o", "addr"])

``up()`` and ``down()`` are idempotent; ``up()`` returns the number of changes
it made (0 the second time). See ``README.md`` for naming and what is
simulated how.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from deploy.lab import images, netops, procs
from deploy.lab import naming as n
from deploy.lab.apply import Applier
from deploy.lab.capabilities import Capabilities, KernelFeatures, describe, detect
from deploy.lab.errors import CapabilityMissing, LabNotFound, LabSpecError
from deploy.lab.procs import PingResult
from deploy.lab.spec import (
    CloudServerSpec,
    CloudSite,
    DatacenterSite,
    LabSpec,
    LanMode,
    ServerSpec,
    load_spec,
    parse_spec,
)
from deploy.lab.statedir import StateDir, default_state_dir
from deploy.lab.topology import NicPlan, Role, Topology, plan, resolve_lan_mode

log = structlog.get_logger("deploy.lab")


@dataclass(frozen=True)
class BridgeRef:
    """A LAN bridge: its namespace, its name, and the VLAN a port must carry (trunk mode only)."""

    ns: str
    name: str
    vlan: int | None = None


@dataclass(frozen=True)
class VethPort:
    """A port given to another component: ``bridge_port`` on ``bridge`` in ``bridge_ns``; ``peer`` in ``peer_ns``."""

    bridge_ns: str
    bridge: str
    bridge_port: str
    peer_ns: str
    peer: str


class Lab:
    """A lab built from ``spec`` under ``prefix`` (random ``sf<4 hex>`` by default).

    Args:
        spec: the lab description, or a path to its YAML.
        prefix: names every namespace ``<prefix>-<host>``; 2-8 chars ``[a-z][a-z0-9]*``.
        state_dir: where server roots live (default ``<tmp>/skyferry-lab/<prefix>``); owned by the lab.
        keep_state: leave the state directory in place on ``down()``.
    """

    def __init__(
        self,
        spec: LabSpec | str | Path,
        prefix: str | None = None,
        state_dir: str | Path | None = None,
        *,
        keep_state: bool = False,
    ) -> None:
        self.spec = spec if isinstance(spec, LabSpec) else load_spec(spec)
        self.names = n.Names(prefix or n.random_prefix())
        self.prefix = self.names.prefix
        self.state = StateDir(Path(state_dir) if state_dir else default_state_dir(self.prefix), self.prefix)
        self.keep_state = keep_state
        self._overrides = self.state.overrides()
        self._features: KernelFeatures | None = None
        self._topo: Topology | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self.log = log.bind(lab=self.spec.name, prefix=self.prefix)

    # -- context managers --------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    async def __aenter__(self) -> Lab:
        try:
            await asyncio.to_thread(self.up)
        except BaseException:
            await asyncio.to_thread(self.down)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.down)

    # -- plan --------------------------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.state.path

    def features(self) -> KernelFeatures:
        """Kernel features (probed once per process, needs root)."""
        if self._features is None:
            self._features = detect(self.prefix)
        return self._features

    def lan_mode(self) -> LanMode:
        """The LAN mode this lab builds (``auto`` resolved against the kernel)."""
        if self.spec.lan_mode is LanMode.BRIDGE_PER_LAN:
            return LanMode.BRIDGE_PER_LAN
        return resolve_lan_mode(self.spec.lan_mode, self.features().vlan_trunk)

    def capabilities(self) -> Capabilities:
        """Kernel features detected (vlan/8021q, vlan_filtering, vxlan, tap, wireguard ...) and the LAN mode used."""
        return describe(self.features(), self.lan_mode())

    @property
    def topology(self) -> Topology:
        """Everything this lab consists of (computed from the spec and the re-plugs)."""
        if self._topo is None:
            self._topo = plan(self.spec, self.names, self.lan_mode(), self._overrides)
        return self._topo

    # -- up / down ---------------------------------------------------------------------------------------------

    def up(self) -> int:
        """Build whatever is missing; returns the number of changes (0 when already up)."""
        netops.require_root()
        started = time.monotonic()
        mode = self.lan_mode()
        if mode is LanMode.VLAN_TRUNK and not self.features().vlan_trunk:
            raise CapabilityMissing("vlan-trunk mode needs 802.1q and VLAN-filtering bridges", details={})
        topo = self.topology
        self.state.claim(self.spec.name, self._overrides)
        with Applier(self.names, topo, ipv6=self.spec.ipv6) as applier:
            changes = applier.apply()
        changes += self._write_roots()
        self.log.info("lab.up", changes=changes, seconds=round(time.monotonic() - started, 3), lan_mode=str(mode))
        return changes

    def _write_roots(self) -> int:
        written = 0
        for site in self.spec.sites:
            for server in site.servers:
                nics = self.topology.nics_of(server.name)
                gateway = (
                    server.gateway
                    if isinstance(server, ServerSpec)
                    else next((r.gateway for r in self.topology.routes if r.host == server.name), None)
                )
                root = self.state.server_root(server.name)
                written += int(images.write_root(root, server.name, nics, gateway, list(server.services)))
        return written

    def down(self) -> int:
        """Remove every namespace of this prefix (and with them every link), stop their processes,
        and remove the state directory unless ``keep_state``. Returns the number of namespaces removed."""
        netops.require_root()
        for proc in self._procs:
            procs.stop(proc)
        self._procs.clear()
        mine = [ns for ns in netops.list_ns() if self.names.owns(ns)]
        self._reap(mine)
        removed = sum(int(netops.remove_ns(ns)) for ns in mine)
        if not self.keep_state:
            self.state.remove()
        self.log.info("lab.down", namespaces=removed, kept_state=self.keep_state)
        return removed

    def _reap(self, namespaces: list[str]) -> None:
        pids = procs.reap(namespaces)
        if pids:
            self.log.info("lab.reaped", pids=pids)

    # -- lookups -----------------------------------------------------------------------------------------------

    def hosts(self, role: Role | None = None) -> list[str]:
        """Host ids (optionally of one role)."""
        return [h.host for h in self.topology.hosts.values() if role is None or h.role is role]

    def ns(self, host: str) -> str:
        """Namespace name of a host id (server, VNA, ``<site>-edge``, ``<site>-sw``, ``internet``)."""
        return self.topology.host(host).ns

    def link(self, host: str, nic: str) -> str:
        """Interface name inside the host's namespace for NIC ``nic`` (NIC keys are interface names)."""
        if any(v.host == host and v.ifname == nic for v in self.topology.vlans):
            return nic
        return self.topology.nic(host, nic).ifname

    def addr(self, host: str, nic: str) -> IPv4Interface | None:
        """Planned address of a NIC (``None`` when unnumbered, e.g. a VNA's LAN leg)."""
        if any(v.host == host and v.ifname == nic for v in self.topology.vlans):
            return None
        return self.topology.nic(host, nic).address

    def mac(self, host: str, nic: str) -> str:
        """MAC address of a NIC (from the spec, or derived from host and NIC name)."""
        for v in self.topology.vlans:
            if v.host == host and v.ifname == nic:
                return self.topology.nic(host, v.parent).mac
        return self.topology.nic(host, nic).mac

    def nics(self, host: str) -> list[str]:
        """NIC names of a host."""
        self.topology.host(host)
        return [p.ifname for p in self.topology.nics_of(host)] + [
            v.ifname for v in self.topology.vlans if v.host == host
        ]

    def bridge(self, site: str, lan: str) -> BridgeRef:
        """The bridge of LAN ``lan`` in ``site`` (``wan`` and ``vpc`` are the edge subnets)."""
        att = self.topology.lan(site, lan)
        return BridgeRef(ns=self.ns(att.sw_host), name=att.bridge, vlan=att.pvid)

    def underlay(self) -> BridgeRef:
        """The internet bridge."""
        return BridgeRef(ns=self.ns("internet"), name=n.UNDERLAY_BRIDGE)

    def underlay_port(self, site: str) -> tuple[str, str]:
        """(namespace, port) of a site's edge uplink on the internet bridge: count cross-site traffic here."""
        nic = self.topology.nic(n.edge_host(site), n.EDGE_UPLINK)
        return self.ns(nic.home.sw_host), nic.port

    def root(self, server: str) -> Path:
        """Root directory of a server's image (``<state>/<server>/root``)."""
        if self.topology.host(server).role is not Role.SERVER:
            raise LabNotFound(f"{server!r} is not a server", details={"host": server})
        return self.state.server_root(server)

    def link_stats(self, host: str, ifname: str) -> dict[str, int]:
        """rx/tx bytes and packets of a link in a host's namespace."""
        with Applier(self.names, self.topology) as applier:
            info = applier.link_state(host, ifname)
        if info is None:
            raise LabNotFound(f"no link {ifname!r} in {host!r}", details={"host": host, "ifname": ifname})
        return dict(info["stats"])

    # -- running things ----------------------------------------------------------------------------------------

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        timeout: float = 10.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a host's namespace (text mode, output captured, bounded by ``timeout``).

        Raises:
            LabNotFound: unknown host.
            LabCommandTimeout: it ran longer than ``timeout`` (it is killed).
            LabCommandError: it could not start, or ``check`` and it exited non-zero.
        """
        return procs.run_in(self.ns(host), argv, timeout=timeout, check=check, input=input)

    def spawn(self, host: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in a host's namespace; ``down()`` stops it."""
        proc: subprocess.Popen[Any] = subprocess.Popen(procs.ns_argv(self.ns(host), argv), **popen)
        self._procs.append(proc)
        return proc

    def ping(self, host: str, dst: str, *, count: int = 3, timeout: float = 1.0, interval: float = 0.05) -> PingResult:
        """ICMP echo from ``host`` to ``dst`` (bounded: ``count`` <= 100, ``timeout`` <= 5 s per probe)."""
        return procs.ping(self.ns(host), dst, count=count, timeout=timeout, interval=interval)

    def arp(self, host: str, nic: str, dst: str, *, count: int = 2, timeout: float = 0.5) -> str | None:
        """Ask for ``dst``'s MAC on ``host``'s NIC (raw ARP); the MAC, or ``None`` when nobody answers."""
        return procs.arp(self.ns(host), self.link(host, nic), dst, count=count, timeout=timeout)

    # -- re-plugging and extra ports ---------------------------------------------------------------------------

    def _movable_nic(self, host: str, nic: str | None) -> NicPlan:
        if nic is not None:
            plan_ = self.topology.nic(host, nic)
            if not plan_.movable:
                raise LabSpecError(f"{host}/{nic} cannot be re-plugged", details={"host": host, "nic": nic})
            return plan_
        for plan_ in self.topology.nics_of(host):
            if plan_.movable:
                return plan_
        raise LabNotFound(f"{host!r} has no NIC that can be re-plugged", details={"host": host})

    def _replug(self, nic: NicPlan, target: tuple[str, str] | None) -> None:
        key = (nic.host, nic.ifname)
        home = (nic.home.site or "", nic.home.lan or "")
        if target == home:
            self._overrides.pop(key, None)
        else:
            self._overrides[key] = target
        self._topo = None
        new = self.topology.nic(nic.host, nic.ifname)
        self.state.claim(self.spec.name, self._overrides)
        with Applier(self.names, self.topology) as applier:
            applier.ensure_port(new)

    def plug(self, host: str, site: str, lan: str, nic: str | None = None) -> None:
        """Plug a server's (or VNA's) NIC into ``lan`` of ``site``, keeping its name, MAC and addresses.

        The NIC's switch-side port moves to that site's switch namespace: the server "moved".
        ``nic`` defaults to the host's first re-pluggable NIC.
        """
        self.topology.lan(site, lan)
        target = self._movable_nic(host, nic)
        self._replug(target, (site, lan))
        self.log.info("lab.plug", host=host, nic=target.ifname, site=site, lan=lan)

    def unplug(self, host: str, nic: str | None = None) -> None:
        """Pull a NIC's cable: its port leaves the bridge and goes down (the NIC loses carrier)."""
        target = self._movable_nic(host, nic)
        self._replug(target, None)
        self.log.info("lab.unplug", host=host, nic=target.ifname)

    def where(self, host: str, nic: str | None = None) -> tuple[str, str] | None:
        """(site, LAN) a NIC is plugged into now, or ``None`` when unplugged."""
        att = self._movable_nic(host, nic).attach
        return (att.site or "", att.lan or "") if att is not None else None

    def add_veth_port(
        self, site: str, lan: str, name: str, *, into: str | None = None, peer_name: str | None = None
    ) -> VethPort:
        """Give another component a port on a LAN bridge (idempotent).

        ``name`` is the bridge-side end (in the site's switch namespace). The peer, ``peer_name``
        (default ``name``), goes into host ``into``'s namespace, or stays in the switch namespace
        (default peer name ``<name>p``) when ``into`` is ``None``. Ports do not survive ``down()``.
        """
        br = self.bridge(site, lan)
        n.check_ifname(name)
        if into is None:
            peer_ns, peer = br.ns, n.check_ifname(peer_name or f"{name}p")
        else:
            peer_ns = self.ns(into) if into in self.topology.hosts else into
            if not self.names.owns(peer_ns) or peer_ns not in netops.list_ns():
                raise LabNotFound(f"no lab namespace for {into!r}", details={"into": into})
            peer = n.check_ifname(peer_name or name)
        sw_host = self.topology.lan(site, lan).sw_host
        mtu = next(b.mtu for b in self.topology.bridges if b.host == sw_host and b.ifname == br.name)
        with Applier(self.names, self.topology) as applier:
            links = applier.ns_links(br.ns)
            if links.index(name) is None:
                links.add_veth(name, n.derived_mac(sw_host, name), peer, peer_ns, n.derived_mac(peer_ns, peer), mtu)
                links.set(name, master=links.need(br.name), state="up")
                if br.vlan is not None:
                    netops.bridge_access_vlan(br.ns, name, br.vlan)
                applier.ns_links(peer_ns).set(peer, state="up")
                self.log.info("lab.port.added", site=site, lan=lan, port=name, peer_ns=peer_ns, peer=peer)
        return VethPort(bridge_ns=br.ns, bridge=br.name, bridge_port=name, peer_ns=peer_ns, peer=peer)

    def remove_veth_port(self, site: str, lan: str, name: str) -> bool:
        """Remove a port added by :meth:`add_veth_port` (and its peer); returns whether it existed."""
        br = self.bridge(site, lan)
        with Applier(self.names, self.topology) as applier:
            return applier.ns_links(br.ns).delete(name)

    # -- servers created at run time (the lab resource-domain driver) ------------------------------------------

    def add_server(self, site: str, server: ServerSpec | CloudServerSpec) -> int:
        """Add a server to a site and build it (validated like the YAML); returns the changes made."""
        data = self.spec.model_dump(mode="json")
        for s in data["sites"]:
            if s["name"] == site:
                s["servers"].append(server.model_dump(mode="json", exclude_none=True))
                break
        else:
            raise LabNotFound(f"no site {site!r}", details={"site": site})
        self._respec(data)
        return self.up()

    def remove_server(self, name: str, *, keep_root: bool = False) -> None:
        """Delete a server: stop its processes, remove its namespace (and NICs), and its root unless kept."""
        if self.topology.host(name).role is not Role.SERVER:
            raise LabNotFound(f"{name!r} is not a server", details={"host": name})
        ns = self.ns(name)
        data = self.spec.model_dump(mode="json")
        for s in data["sites"]:
            s["servers"] = [x for x in s["servers"] if x["name"] != name]
        self._reap([ns])
        netops.remove_ns(ns)
        if not keep_root:
            shutil.rmtree(self.state.path / name, ignore_errors=True)
        self._overrides = {k: v for k, v in self._overrides.items() if k[0] != name}
        self._respec(data)
        self.state.claim(self.spec.name, self._overrides)
        self.log.info("lab.server.removed", host=name)

    def _respec(self, data: dict[str, Any]) -> None:
        self.spec = parse_spec(data)
        self._topo = None

    # -- status ------------------------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Live state: per host, whether its namespace exists and each planned NIC's state and addresses."""
        present = set(netops.list_ns())
        rows: list[dict[str, Any]] = []
        with Applier(self.names, self.topology) as applier:
            for h in self.topology.hosts.values():
                row: dict[str, Any] = {"host": h.host, "ns": h.ns, "role": str(h.role), "site": h.site}
                row["exists"] = h.ns in present
                row["links"] = []
                if row["exists"]:
                    for name in self.nics(h.host):
                        info = applier.link_state(h.host, name)
                        addrs = [str(a) for a in applier.links(h.host).addresses(name)] if info else []
                        row["links"].append(
                            {
                                "nic": name,
                                "present": info is not None,
                                "operstate": info and info["operstate"],
                                "addresses": addrs,
                            }
                        )
                rows.append(row)
        return rows

    def sites(self) -> list[DatacenterSite | CloudSite]:
        """The spec's sites."""
        return list(self.spec.sites)
