"""Thin, typed wrappers over pyroute2 (and ``ip``/``sysctl``/``bridge`` where netlink is awkward).

Every netlink error becomes :class:`~deploy.lab.errors.NetlinkFailure` here,
and nothing in this module ever opens the root namespace for writing: every
call names a lab namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import structlog
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from deploy.lab.errors import LabCommandError, LabCommandTimeout, LabPermissionError, NetlinkFailure

log = structlog.get_logger("deploy.lab")

EEXIST = 17
ENOENT = 2
ESRCH = 3
ENODEV = 19
EADDRNOTAVAIL = 99


@contextmanager
def netlink_errors(op: str, ns: str, **details: Any) -> Iterator[None]:
    """Map pyroute2's errors to :class:`NetlinkFailure` (chained)."""
    try:
        yield
    except NetlinkError as exc:
        raise NetlinkFailure(
            f"{op} in {ns} failed: {exc}", details={"op": op, "ns": ns, "errno": exc.code, **details}
        ) from exc
    except OSError as exc:
        raise NetlinkFailure(
            f"{op} in {ns} failed: {exc}", details={"op": op, "ns": ns, "errno": exc.errno, **details}
        ) from exc


def require_root() -> None:
    """Raise :class:`LabPermissionError` unless root with the ``ip`` tool."""
    if os.geteuid() != 0:
        raise LabPermissionError("the lab needs root (network namespaces)")
    if shutil.which("ip") is None:
        raise LabPermissionError("the lab needs the 'ip' tool (iproute2)")


def list_ns() -> list[str]:
    """Names of all named network namespaces."""
    return sorted(netns.listnetns())


def create_ns(name: str) -> bool:
    """Create a named namespace unless it exists; returns whether it was created."""
    if name in netns.listnetns():
        return False
    with netlink_errors("netns create", name):
        netns.create(name)
    return True


def remove_ns(name: str) -> bool:
    """Remove a named namespace if it exists; returns whether it was removed."""
    if name not in netns.listnetns():
        return False
    with netlink_errors("netns remove", name):
        netns.remove(name)
    return True


def pids_in(namespaces: Sequence[str]) -> list[int]:
    """Pids of processes whose network namespace is one of ``namespaces`` (one scan of /proc)."""
    if not namespaces:
        return []
    found = netns.ns_pids()
    return [int(pid) for ns in namespaces for pid in found.get(ns, [])]


def run(
    argv: Sequence[str], *, timeout: float, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a helper command (``ip``, ``sysctl``, ``tc``, ``bridge``) with a bound on time."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabCommandTimeout(f"{argv[0]} timed out after {timeout}s", details={"argv": list(argv)}) from exc
    except OSError as exc:
        raise LabCommandError(f"cannot run {argv[0]}: {exc}", details={"argv": list(argv)}) from exc
    if check and proc.returncode != 0:
        raise LabCommandError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}",
            details={"argv": list(argv), "rc": proc.returncode, "stderr": proc.stderr},
        )
    return proc


def sysctl(ns: str, values: dict[str, str]) -> None:
    """Set sysctls inside a namespace (one process for all of them)."""
    if values:
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())], timeout=10)


class NsLinks:
    """Links, addresses and routes of one namespace, over one netlink socket opened inside it."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        with netlink_errors("open", ns):
            # flags=0: never create the namespace implicitly
            self.ipr: Any = IPRoute(netns=ns, flags=0)

    def close(self) -> None:
        self.ipr.close()

    def index(self, ifname: str) -> int | None:
        """Index of ``ifname`` here, or ``None``."""
        with netlink_errors("lookup", self.ns, ifname=ifname):
            found = self.ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def need(self, ifname: str) -> int:
        idx = self.index(ifname)
        if idx is None:
            raise NetlinkFailure(f"{ifname} not found in {self.ns}", details={"ns": self.ns, "ifname": ifname})
        return idx

    def info(self, ifname: str) -> dict[str, Any] | None:
        """State of a link: ifname, mac, mtu, operstate, master (ifname), kind, stats."""
        idx = self.index(ifname)
        if idx is None:
            return None
        with netlink_errors("get link", self.ns, ifname=ifname):
            msg = self.ipr.get_links(idx)[0]
            master = msg.get("master")
            master_name = None
            if master:
                m = self.ipr.get_links(master)
                master_name = m[0].get("ifname") if m else None
            linkinfo = msg.get("linkinfo")
            kind = linkinfo.get("kind") if linkinfo is not None else None
            stats = msg.get("stats64") or {}
        return {
            "ifname": ifname,
            "index": idx,
            "mac": msg.get("address"),
            "mtu": msg.get("mtu"),
            "up": bool(msg["flags"] & 1),
            "operstate": msg.get("operstate"),
            "master": master_name,
            "kind": kind,
            "stats": {k: int(stats.get(k, 0)) for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")},
        }

    def links(self) -> list[str]:
        """Names of every link in the namespace."""
        with netlink_errors("dump links", self.ns):
            return [str(m.get("ifname")) for m in self.ipr.get_links()]

    def add_bridge(self, ifname: str, *, mtu: int, vlan_filtering: bool = False) -> None:
        kw: dict[str, Any] = {"br_stp_state": 0, "br_forward_delay": 0}
        if vlan_filtering:
            kw["br_vlan_filtering"] = 1
        with netlink_errors("add bridge", self.ns, ifname=ifname):
            self.ipr.link("add", ifname=ifname, kind="bridge", mtu=mtu, **kw)

    def add_veth(self, ifname: str, mac: str, peer: str, peer_ns: str, peer_mac: str, mtu: int) -> None:
        """A veth pair: ``ifname`` here, ``peer`` created directly inside ``peer_ns``."""
        with netlink_errors("add veth", self.ns, ifname=ifname, peer=peer, peer_ns=peer_ns):
            self.ipr.link(
                "add",
                ifname=ifname,
                address=mac,
                mtu=mtu,
                kind="veth",
                peer={"ifname": peer, "net_ns_fd": peer_ns, "address": peer_mac, "mtu": mtu},
            )

    def add_vlan(self, ifname: str, parent: str, vlan_id: int, mtu: int) -> None:
        with netlink_errors("add vlan", self.ns, ifname=ifname, vlan=vlan_id):
            self.ipr.link("add", ifname=ifname, kind="vlan", link=self.need(parent), vlan_id=vlan_id, mtu=mtu)

    def set(self, ifname: str, **kw: Any) -> None:
        """``ip link set`` with pyroute2 keywords (``state``, ``master``, ``mtu``, ``address`` ...)."""
        idx = self.need(ifname)
        with netlink_errors("set link", self.ns, ifname=ifname, **{k: str(v) for k, v in kw.items()}):
            self.ipr.link("set", index=idx, **kw)

    def move(self, ifname: str, to_ns: str) -> None:
        """Move a link into another namespace (it loses its master and goes down)."""
        self.set(ifname, net_ns_fd=to_ns)

    def delete(self, ifname: str) -> bool:
        idx = self.index(ifname)
        if idx is None:
            return False
        try:
            with netlink_errors("del link", self.ns, ifname=ifname):
                self.ipr.link("del", index=idx)
        except NetlinkFailure as exc:
            if exc.details.get("errno") in (ENODEV, ENOENT):  # the peer took it with it
                return False
            raise
        return True

    def addresses(self, ifname: str) -> list[IPv4Interface]:
        idx = self.need(ifname)
        with netlink_errors("get addr", self.ns, ifname=ifname):
            msgs = self.ipr.get_addr(family=2, index=idx)
        return [IPv4Interface(f"{m.get('address')}/{m['prefixlen']}") for m in msgs]

    def ensure_address(self, ifname: str, address: IPv4Interface) -> bool:
        """Add an IPv4 address unless present; returns whether it was added."""
        if address in self.addresses(ifname):
            return False
        idx = self.need(ifname)
        with netlink_errors("add addr", self.ns, ifname=ifname, address=str(address)):
            self.ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
        return True

    def routes(self) -> dict[IPv4Network, IPv4Address | None]:
        """Main-table IPv4 routes: destination -> gateway."""
        with netlink_errors("get routes", self.ns):
            msgs = self.ipr.get_routes(family=2, table=254)
        out: dict[IPv4Network, IPv4Address | None] = {}
        for m in msgs:
            dst = m.get("dst") or "0.0.0.0"
            gw = m.get("gateway")
            out[IPv4Network(f"{dst}/{m['dst_len']}", strict=False)] = IPv4Address(gw) if gw else None
        return out

    def ensure_route(self, dst: IPv4Network, gateway: IPv4Address) -> bool:
        """``ip route replace`` unless already so; returns whether it changed."""
        if self.routes().get(dst) == gateway:
            return False
        with netlink_errors("replace route", self.ns, dst=str(dst), gateway=str(gateway)):
            self.ipr.route("replace", dst=str(dst), gateway=str(gateway))
        return True


def bridge_access_vlan(ns: str, port: str, pvid: int) -> None:
    """Make ``port`` an untagged access port of VLAN ``pvid`` on a VLAN-filtering bridge."""
    run(["bridge", "-n", ns, "vlan", "del", "dev", port, "vid", "1"], timeout=5, check=False)
    run(["bridge", "-n", ns, "vlan", "add", "dev", port, "vid", str(pvid), "pvid", "untagged"], timeout=5)


def bridge_trunk_vlans(ns: str, port: str, vids: Sequence[int]) -> None:
    """Make ``port`` a tagged trunk of ``vids`` on a VLAN-filtering bridge."""
    run(["bridge", "-n", ns, "vlan", "del", "dev", port, "vid", "1"], timeout=5, check=False)
    for vid in vids:
        run(["bridge", "-n", ns, "vlan", "add", "dev", port, "vid", str(vid)], timeout=5)
