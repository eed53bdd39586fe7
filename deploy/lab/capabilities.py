"""Kernel features the lab (and the overlays built on it) can use, probed once per process.

Each feature is tried for real in a scratch namespace (``<prefix>-_caps``,
removed right after): a link of that kind is created and deleted. Nothing is
created in the root namespace.
"""

from __future__ import annotations

import platform
import shutil
import threading
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from deploy.lab import netops
from deploy.lab.spec import LanMode

log = structlog.get_logger("deploy.lab")

_lock = threading.Lock()
_cache: KernelFeatures | None = None


class KernelFeatures(BaseModel):
    """What this kernel can do (each probed by creating one object in a scratch namespace)."""

    model_config = ConfigDict(frozen=True)
    kernel: str = Field(description="uname -r")
    netns: bool
    veth: bool
    bridge: bool
    vlan_8021q: bool = Field(description="802.1q VLAN sub-interfaces")
    vlan_filtering: bool = Field(description="VLAN-filtering bridges")
    vxlan: bool
    tap: bool
    macvlan: bool
    dummy: bool
    wireguard: bool
    gretap: bool
    geneve: bool
    netem: bool = Field(description="tc netem (delay/loss shaping)")
    tbf: bool = Field(description="tc tbf (rate limiting)")

    @property
    def vlan_trunk(self) -> bool:
        """Whether VLAN trunks can be built (VLAN-filtering bridges plus 802.1q sub-interfaces)."""
        return self.vlan_8021q and self.vlan_filtering


class Capabilities(BaseModel):
    """Kernel features plus how this lab uses them."""

    model_config = ConfigDict(frozen=True)
    features: KernelFeatures
    lan_mode: LanMode = Field(description="How this lab builds its LANs.")
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Flat view: every feature flag plus ``lan_mode`` and ``notes``."""
        return {**self.features.model_dump(), "lan_mode": str(self.lan_mode), "notes": list(self.notes)}


def _try(links: netops.NsLinks, name: str, **kw: Any) -> bool:
    try:
        links.ipr.link("add", ifname=name, **kw)
    except Exception:  # any failure means "not available"; the kind is what we probe
        return False
    links.delete(name)
    return True


def _probe(ns: str) -> KernelFeatures:
    netops.create_ns(ns)
    links = netops.NsLinks(ns)
    try:
        veth = _try(links, "c0", kind="veth", peer="c1")
        if veth:
            links.ipr.link("add", ifname="c0", kind="veth", peer="c1")
        c0 = links.index("c0") or 0
        checks: dict[str, Callable[[], bool]] = {
            "bridge": lambda: _try(links, "cx", kind="bridge"),
            "vlan_filtering": lambda: _try(links, "cx", kind="bridge", br_vlan_filtering=1),
            "vlan_8021q": lambda: veth and _try(links, "cx", kind="vlan", link=c0, vlan_id=10),
            "vxlan": lambda: _try(links, "cx", kind="vxlan", vxlan_id=5, vxlan_port=4789),
            "macvlan": lambda: veth and _try(links, "cx", kind="macvlan", link=c0, macvlan_mode="bridge"),
            "dummy": lambda: _try(links, "cx", kind="dummy"),
            "wireguard": lambda: _try(links, "cx", kind="wireguard"),
            "gretap": lambda: _try(links, "cx", kind="gretap", gre_local="192.0.2.1", gre_remote="192.0.2.2"),
            "geneve": lambda: _try(links, "cx", kind="geneve", geneve_id=3, geneve_remote="192.0.2.2"),
        }
        found = {name: check() for name, check in checks.items()}
        tap = netops.run(["ip", "-n", ns, "tuntap", "add", "name", "ctap", "mode", "tap"], timeout=5, check=False)
        found["tap"] = tap.returncode == 0
        for qdisc, args in (
            ("netem", ["delay", "1ms"]),
            ("tbf", ["rate", "1mbit", "burst", "32kbit", "latency", "50ms"]),
        ):
            ok = False
            if veth and shutil.which("tc"):
                argv = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "c0", "root", qdisc, *args]
                ok = netops.run(argv, timeout=5, check=False).returncode == 0
            found[qdisc] = ok
        return KernelFeatures(kernel=platform.release(), netns=True, veth=veth, **found)
    finally:
        links.close()
        netops.remove_ns(ns)


def detect(scratch_prefix: str, *, refresh: bool = False) -> KernelFeatures:
    """Probe the kernel once per process (cached); ``scratch_prefix`` names the scratch namespace."""
    global _cache
    with _lock:
        if _cache is None or refresh:
            netops.require_root()
            _cache = _probe(f"{scratch_prefix}-_caps")
            log.info("lab.capabilities", **_cache.model_dump())
        return _cache


def describe(features: KernelFeatures, lan_mode: LanMode) -> Capabilities:
    """The capabilities of a lab built in ``lan_mode`` on a kernel with ``features``."""
    notes: list[str] = []
    if lan_mode is LanMode.BRIDGE_PER_LAN:
        why = "by choice" if features.vlan_trunk else "802.1q/vlan_filtering missing"
        notes.append(f"one bridge per LAN ({why}); VLAN ids are metadata, VNAs get one leg per LAN")
    else:
        notes.append("one VLAN-filtering bridge per site; access ports carry the LAN's PVID; VNAs get a tagged trunk")
    if not features.netem:
        notes.append("no tc netem: links cannot be given delay or loss")
    if not features.wireguard:
        notes.append("no wireguard: encrypted tunnels must run in user space")
    return Capabilities(features=features, lan_mode=lan_mode, notes=tuple(notes))
