"""Per-overlay software switch: a MAC-learning Linux bridge driven over netlink.

The kernel bridge learns source MACs per port and re-learns a MAC on the
next frame it sends from a different port, so a workload that moves and
announces itself (gratuitous ARP) is reached at its new place at once.
:meth:`Switch.flush_mac` and a short ageing time are for hosts that move
silently.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from .errors import SwitchError

log = structlog.get_logger("vna_agent.dataplane.switch")

NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
USER_HZ = 100
#: Bridge port attributes :meth:`Switch.port_flags` reads (:mod:`.brport` writes them).
PORT_FLAGS = ("learning", "unicast_flood", "mcast_flood", "bcast_flood", "locked", "multicast_router")


@dataclass(frozen=True, slots=True)
class FdbEntry:
    """One learned (or local/static) MAC on a bridge port."""

    mac: str
    port: str
    local: bool
    static: bool
    age: float | None  # seconds since last refreshed (dynamic entries)


def l2_only(ifname: str) -> bool:
    """Turn IPv6 off on an interface that only carries overlay frames (the bridge, tunnel ports).

    Otherwise the kernel sends the VNA's own link-local ND and MLD frames from it into the
    overlay (and out of a port loop protection blocked: frames the bridge itself sends ignore
    the ports' flood flags). Call in the interface's namespace; ``False`` if it could not.
    """
    try:
        (Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6").write_text("1")
    except OSError as exc:
        log.info("ipv6_not_disabled", interface=ifname, error=str(exc))
        return False
    return True


async def collect(result: Any) -> list[Any]:
    """pyroute2 returns lists for some calls and async generators for others."""
    if isinstance(result, AsyncIterable):
        return [m async for m in result]
    if isinstance(result, Iterable):
        return list(result)
    return [result]


class Switch:
    """A Linux bridge used as one overlay's switch.

    Args:
        name: bridge interface name.
        netns: network namespace name (``None``: the caller's).
    """

    def __init__(self, name: str, *, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns

    def _ipr(self) -> AsyncIPRoute:
        return AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()

    async def _index(self, ipr: AsyncIPRoute, ifname: str) -> int:
        found = await ipr.link_lookup(ifname=ifname)
        if not found:
            raise SwitchError(f"no interface {ifname}", details={"netns": self.netns})
        return int(found[0])

    async def exists(self) -> bool:
        async with self._ipr() as ipr:
            return bool(await ipr.link_lookup(ifname=self.name))

    async def create(self, *, ageing: float = 300.0, mtu: int | None = None) -> None:
        """Create the bridge (or adopt an existing one), set ageing, bring it up."""
        try:
            async with self._ipr() as ipr:
                if not await ipr.link_lookup(ifname=self.name):
                    await ipr.link("add", ifname=self.name, kind="bridge", br_ageing_time=int(ageing * USER_HZ))
                    log.info("bridge_created", bridge=self.name, netns=self.netns)
                idx = await self._index(ipr, self.name)
                await ipr.link("set", index=idx, kind="bridge", br_ageing_time=int(ageing * USER_HZ))
                if mtu:
                    await ipr.link("set", index=idx, mtu=mtu)
                await ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise SwitchError(f"cannot create bridge {self.name}: {exc}") from exc

    async def delete(self) -> None:
        """Remove the bridge (its ports are released, not deleted)."""
        try:
            async with self._ipr() as ipr:
                found = await ipr.link_lookup(ifname=self.name)
                if found:
                    await ipr.link("del", index=found[0])
                    log.info("bridge_deleted", bridge=self.name, netns=self.netns)
        except NetlinkError as exc:
            raise SwitchError(f"cannot delete bridge {self.name}: {exc}") from exc

    async def add_port(self, ifname: str, *, mtu: int | None = None) -> None:
        """Enslave ``ifname`` to the bridge and bring it up."""
        try:
            async with self._ipr() as ipr:
                br = await self._index(ipr, self.name)
                idx = await self._index(ipr, ifname)
                if mtu:
                    await ipr.link("set", index=idx, mtu=mtu)
                await ipr.link("set", index=idx, master=br, state="up")
        except NetlinkError as exc:
            raise SwitchError(f"cannot add {ifname} to {self.name}: {exc}") from exc
        log.info("port_added", bridge=self.name, port=ifname, mtu=mtu)

    async def remove_port(self, ifname: str) -> None:
        """Release ``ifname`` from the bridge (missing interfaces are ignored)."""
        try:
            async with self._ipr() as ipr:
                found = await ipr.link_lookup(ifname=ifname)
                if found:
                    await ipr.link("set", index=found[0], master=0)
        except NetlinkError as exc:
            raise SwitchError(f"cannot remove {ifname} from {self.name}: {exc}") from exc

    async def ports(self) -> list[str]:
        """Names of the bridge's ports."""
        async with self._ipr() as ipr:
            br = await self._index(ipr, self.name)
            links = await collect(await ipr.link("dump"))
            return [str(lk.get_attr("IFLA_IFNAME")) for lk in links if lk.get_attr("IFLA_MASTER") == br]

    async def _names(self, ipr: AsyncIPRoute) -> dict[int, str]:
        return {int(lk["index"]): str(lk.get_attr("IFLA_IFNAME")) for lk in await collect(await ipr.link("dump"))}

    async def fdb(self) -> list[FdbEntry]:
        """The bridge's forwarding database (port entries only)."""
        async with self._ipr() as ipr:
            br = await self._index(ipr, self.name)
            names = await self._names(ipr)
            out: list[FdbEntry] = []
            for m in await collect(await ipr.fdb("dump")):
                if m.get_attr("NDA_MASTER") != br:
                    continue
                state = int(m["state"])
                ci = m.get_attr("NDA_CACHEINFO")
                local = bool(state & NUD_PERMANENT)
                static = bool(state & NUD_NOARP) and not local
                age = None if (local or static or not ci) else ci["ndm_updated"] / USER_HZ
                out.append(
                    FdbEntry(str(m.get_attr("NDA_LLADDR")), names.get(int(m["ifindex"]), "?"), local, static, age)
                )
            return out

    async def port_flags(self, ifname: str) -> dict[str, int]:
        """The port's forwarding flags (:data:`PORT_FLAGS`) as the kernel reports them."""
        try:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, ifname)
                msgs = await collect(await ipr.link("get", index=idx))
        except NetlinkError as exc:
            raise SwitchError(f"cannot read port {ifname} of {self.name}: {exc}") from exc
        info = msgs[0].get_attr("IFLA_LINKINFO") if msgs else None
        data = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
        if data is None:
            raise SwitchError(f"{ifname} is not a port of {self.name}", details={"netns": self.netns})
        out: dict[str, int] = {}
        for name in PORT_FLAGS:
            value = data.get_attr(f"IFLA_BRPORT_{name.upper()}")
            if value is not None:
                out[name] = int(value)
        return out

    async def lookup(self, mac: str) -> str | None:
        """The port a MAC is learned on, if any."""
        mac = mac.lower()
        for e in await self.fdb():
            if e.mac == mac and not e.local:
                return e.port
        return None

    async def set_ageing(self, seconds: float) -> None:
        """Set the bridge's MAC ageing time."""
        try:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, self.name)
                await ipr.link("set", index=idx, kind="bridge", br_ageing_time=int(seconds * USER_HZ))
        except NetlinkError as exc:
            raise SwitchError(f"cannot set ageing on {self.name}: {exc}") from exc

    async def flush_mac(self, mac: str) -> int:
        """Forget where ``mac`` was learned (the next frame from it re-learns); return entries removed."""
        mac = mac.lower()
        removed = 0
        async with self._ipr() as ipr:
            br = await self._index(ipr, self.name)
            for m in await collect(await ipr.fdb("dump")):
                if m.get_attr("NDA_MASTER") != br or str(m.get_attr("NDA_LLADDR")) != mac:
                    continue
                if int(m["state"]) & NUD_PERMANENT:
                    continue
                try:
                    await ipr.fdb(
                        "del", ifindex=m["ifindex"], lladdr=mac, flags=ndmsg.flags["master"], state=m["state"]
                    )
                    removed += 1
                except NetlinkError as exc:
                    raise SwitchError(f"cannot flush {mac} on {self.name}: {exc}") from exc
        log.info("fdb_flushed", bridge=self.name, mac=mac, removed=removed)
        return removed
