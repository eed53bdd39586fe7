"""Root directories of lab servers: the image a lab server "boots" from.

Layout of ``<state>/<server>/root``::

    etc/hostname
    etc/hosts
    etc/network/interfaces      ifupdown syntax: address, hwaddress, gateway per NIC
    etc/skyferry/services       one service name per line
    srv/  var/lib/              application code and data (empty at first)

Written once when the server is first built and never overwritten, so a
deployment that changed the image keeps its changes across ``up()``.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from deploy.lab.topology import NicPlan


def interfaces_file(nics: list[NicPlan], gateway: IPv4Address | None) -> str:
    """``/etc/network/interfaces`` for these NICs (static addresses, MACs, the default gateway)."""
    lines = ["# written by the Skyferry lab", "auto lo", "iface lo inet loopback", ""]
    for nic in nics:
        lines.append(f"auto {nic.ifname}")
        if nic.address is None:
            lines += [f"iface {nic.ifname} inet manual", f"    hwaddress ether {nic.mac}", ""]
            continue
        lines += [
            f"iface {nic.ifname} inet static",
            f"    address {nic.address}",
            f"    hwaddress ether {nic.mac}",
            f"    mtu {nic.mtu}",
        ]
        if gateway is not None and gateway in nic.address.network:
            lines.append(f"    gateway {gateway}")
        lines.append("")
    return "\n".join(lines)


def hosts_file(name: str, nics: list[NicPlan]) -> str:
    lines = ["127.0.0.1\tlocalhost"]
    lines += [f"{nic.address.ip}\t{name}" for nic in nics if nic.address is not None]
    return "\n".join(lines) + "\n"


def write_root(root: Path, name: str, nics: list[NicPlan], gateway: IPv4Address | None, services: list[str]) -> bool:
    """Create a server's root directory unless it exists; returns whether it was written."""
    if (root / "etc" / "hostname").exists():
        return False
    for sub in ("etc/network", "etc/skyferry", "srv", "var/lib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text(name + "\n", encoding="utf-8")
    (root / "etc" / "hosts").write_text(hosts_file(name, nics), encoding="utf-8")
    (root / "etc" / "network" / "interfaces").write_text(interfaces_file(nics, gateway), encoding="utf-8")
    (root / "etc" / "skyferry" / "services").write_text("".join(s + "\n" for s in services), encoding="utf-8")
    return True
