"""Layer-2 guard of a VNA: loop probes and MAC-move watching for every overlay switch, and their actions.

Runs on the agent's :class:`~vna_agent.netns.NetnsLoop` (so its sockets live in the
VNA's namespace); all state is touched on that loop only. One ``AF_PACKET``
socket (kernel BPF filter: loop probes only, never outgoing copies) sends each
switch's probe rounds out of every port and sees probes arriving on any port,
before the bridge (so also on a blocked port); one netlink socket
(:class:`~vna_agent.fdbwatch.FdbWatcher`) reports MAC learns and moves as they
happen. Decisions are :class:`~vna_agent.loopguard.LoopCore`'s; this module
carries them out:

* *block* a port: bridge port ``locked`` (frames from MACs not learned on it are
  dropped on ingress, without roaming), ``learning`` off, unicast, multicast and
  broadcast flooding off, multicast router off, and its learned MACs flushed, in one
  synchronous netlink message (:mod:`vna_agent.dataplane.brport`): nothing enters or
  leaves it any more, while probes still do (the packet socket sends and receives
  below the bridge). STP port states cannot be used: with the
  bridge's STP off the kernel puts every port back to forwarding at once, and
  kernel STP (the only STP a namespace gets) takes seconds and would join the
  customers' own spanning trees over the segments.
* *unblock*: the port's flags as they were when it joined come back.
* *flush*: forget every learned MAC of the bridge (after a topology change).
* *alert*: a :class:`bus.vna.Conflict` to the sink (the service publishes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from bus.vna import Conflict, ConflictKind, LoopProtectStatus
from vna_agent.conflicts import MacTracker
from vna_agent.dataplane import brport
from vna_agent.dataplane.errors import SwitchError
from vna_agent.dataplane.switch import Switch
from vna_agent.fdbwatch import FdbEvent, FdbWatcher
from vna_agent.loopguard import (
    PROBE_ETHERTYPE,
    PROBE_SRC_PREFIX_TEXT,
    Action,
    Alert,
    Block,
    Flush,
    LoopCore,
    LoopTiming,
    PortKind,
    Unblock,
)

log = structlog.get_logger(__name__)

AlertSink = Callable[[Conflict], None]
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE
#: Ports a block sets (and an unblock restores from what was there before).
BLOCKED_FLAGS = {
    "locked": 1,
    "learning": 0,
    "unicast_flood": 0,
    "mcast_flood": 0,
    "bcast_flood": 0,
    "multicast_router": 0,
}
FORWARDING_FLAGS = {
    "locked": 0,
    "learning": 1,
    "unicast_flood": 1,
    "mcast_flood": 1,
    "bcast_flood": 1,
    "multicast_router": 1,
}
READ_BUDGET = 256
_FILTER = (  # accept ethertype PROBE_ETHERTYPE unless the frame is outgoing
    (0x28, 0, 0, 12),  # ldh [12]
    (0x15, 0, 3, PROBE_ETHERTYPE),  # jeq #type, next, drop
    (0x30, 0, 0, SKF_AD_PKTTYPE),  # ldb pkttype
    (0x15, 1, 0, PACKET_OUTGOING),  # jeq #outgoing, drop, accept
    (0x06, 0, 0, 0x0000FFFF),  # accept
    (0x06, 0, 0, 0),  # drop
)


def _attach_filter(sock: socket.socket) -> None:
    code = b"".join(struct.pack("HBBI", *ins) for ins in _FILTER)
    buf = ctypes.create_string_buffer(code)
    prog = struct.pack("HL", len(_FILTER), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


@dataclass
class _Guarded:
    overlay_id: str
    switch: Switch
    core: LoopCore
    macs: MacTracker = field(default_factory=MacTracker)
    bridge_index: int = 0
    flags: dict[str, dict[str, int]] = field(default_factory=dict)  # port -> its forwarding flags (restored)
    suppressed_moves: int = 0


class L2Guard:
    """Loop protection and MAC watching of one VNA's switches (see the module docstring).

    Args:
        vna_id: this VNA.
        timing: loop protection timers.
    """

    def __init__(self, vna_id: str, timing: LoopTiming | None = None) -> None:
        self.vna_id = vna_id
        self.timing = timing or LoopTiming()
        self.sink: AlertSink | None = None
        self._switches: dict[str, _Guarded] = {}
        self._ports: dict[str, _Guarded] = {}  # port name -> its switch
        self._bridges: dict[int, _Guarded] = {}  # bridge ifindex -> switch
        self._names: dict[int, str] = {}
        self._psock: socket.socket | None = None
        self._fdb = FdbWatcher()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.send_errors = 0

    # -- life cycle (on the namespace's loop) --------------------------------------------------------

    def open(self) -> None:
        """Open the sockets and start the timers; call on the namespace's loop.

        Raises:
            SwitchError: the packet or netlink socket could not be opened.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.htons(ETH_P_ALL))
            _attach_filter(sock)
            with contextlib.suppress(OSError):  # Linux >= 4.20: outgoing copies are not even made
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError as exc:
            raise SwitchError(f"cannot open the loop-probe socket: {exc}") from exc
        with contextlib.suppress(BlockingIOError):  # what arrived before the filter was attached
            while True:
                sock.recv(2048)
        self._psock = sock
        self._fdb.open()
        loop.add_reader(sock.fileno(), self._on_probes)
        loop.add_reader(self._fdb.fileno(), self._on_fdb)
        self._tasks = [loop.create_task(self._timers(), name=f"l2guard-{self.vna_id}")]
        log.info("l2guard_started", vna=self.vna_id, probe_interval_s=self.timing.interval_s)

    async def stop(self) -> None:
        """Stop timers and close the sockets (on the namespace's loop)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._loop is not None:
            if self._psock is not None:
                self._loop.remove_reader(self._psock.fileno())
                self._psock.close()
                self._psock = None
            if self._fdb.sock is not None:
                self._loop.remove_reader(self._fdb.fileno())
                self._fdb.close()

    # -- switches and ports (on the namespace's loop) ------------------------------------------------

    async def attach(self, overlay_id: str, switch: Switch) -> None:
        """Guard a switch; its MAC table so far is the baseline for moves."""
        if overlay_id in self._switches:
            return
        g = _Guarded(overlay_id, switch, LoopCore(self.vna_id, overlay_id, self.timing))
        g.bridge_index = socket.if_nametoindex(switch.name)
        g.macs.update({e.mac: e.port for e in await switch.fdb() if not e.local and not e.static})
        self._switches[overlay_id] = g
        self._bridges[g.bridge_index] = g

    async def detach(self, overlay_id: str) -> None:
        g = self._switches.pop(overlay_id, None)
        if g is None:
            return
        self._bridges.pop(g.bridge_index, None)
        for name in [n for n, owner in self._ports.items() if owner is g]:
            del self._ports[name]
        self._names.clear()

    async def port_added(
        self, overlay_id: str, name: str, kind: PortKind, label: str, *, peer: str | None = None
    ) -> None:
        """A tunnel (``peer``: the VNA at its far end, if known) or segment port joined the switch: probe it."""
        g = self._switches.get(overlay_id)
        if g is None:
            return
        try:
            g.flags[name] = await g.switch.port_flags(name)
        except SwitchError as exc:
            log.warning("port_flags_unknown", vna=self.vna_id, port=name, error=str(exc))
            g.flags[name] = dict(FORWARDING_FLAGS)
        self._ports[name] = g
        self._names.clear()
        self._apply(g, g.core.add_port(name, kind, label, time.monotonic(), peer=peer))

    async def port_removed(self, overlay_id: str, name: str) -> None:
        """A port is leaving the switch (before it goes: a blocked one is restored first)."""
        g = self._switches.get(overlay_id)
        if g is None or self._ports.get(name) is not g:
            return
        if g.core.blocked(name):
            with contextlib.suppress(SwitchError):
                brport.set_port_flags(name, g.flags.get(name, FORWARDING_FLAGS))
        del self._ports[name]
        g.flags.pop(name, None)
        self._names.clear()
        self._apply(g, g.core.remove_port(name, time.monotonic()))

    def status(self, overlay_id: str) -> LoopProtectStatus | None:
        g = self._switches.get(overlay_id)
        return g.core.status() if g is not None else None

    # -- probes --------------------------------------------------------------------------------------

    def _on_probes(self) -> None:
        sock = self._psock
        if sock is None:
            return
        now = time.monotonic()
        for _ in range(READ_BUDGET):
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("loop_probe_recv_failed", vna=self.vna_id, error=repr(exc))
                break
            ifname, pkttype = addr[0], addr[2]
            if pkttype == PACKET_OUTGOING:
                continue
            g = self._ports.get(ifname)
            if g is not None:
                self._apply(g, g.core.receive(data, ifname, now))

    def _send_round(self, g: _Guarded, now: float) -> None:
        sock = self._psock
        if sock is None:
            return
        for port, frame in g.core.make_round(now):
            try:
                sock.sendto(frame, (port, PROBE_ETHERTYPE))
            except OSError as exc:  # port down, queue full, port gone: this probe is lost
                self.send_errors += 1
                if self.send_errors & (self.send_errors - 1) == 0:  # 1, 2, 4, 8, ...: never a log storm
                    log.info(
                        "loop_probe_send_failed", vna=self.vna_id, port=port, error=repr(exc), count=self.send_errors
                    )

    async def _timers(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            nxt = now + 1.0
            for g in list(self._switches.values()):
                self._apply(g, g.core.tick(now))
                if g.core.round_due(now):
                    self._send_round(g, now)
                nxt = min(nxt, g.core.wakeup(now))
            self._wake.clear()
            delay = max(0.001, nxt - time.monotonic())  # never a busy loop that starves the namespace's loop
            with contextlib.suppress(TimeoutError):  # asyncio.timeout, not wait_for: a stop is never swallowed
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- MAC moves -----------------------------------------------------------------------------------

    def _port_name(self, ifindex: int) -> str | None:
        name = self._names.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                return None
            self._names[ifindex] = name
        return name

    def _on_fdb(self) -> None:
        try:
            events = self._fdb.read(READ_BUDGET)
        except OSError as exc:
            log.warning("fdb_watch_failed", vna=self.vna_id, error=repr(exc))
            return
        now = time.monotonic()
        for ev in events:
            g = self._bridges.get(ev.master)
            if g is not None:
                self._fdb_event(g, ev, now)

    def _fdb_event(self, g: _Guarded, ev: FdbEvent, now: float) -> None:
        if ev.mac.startswith(PROBE_SRC_PREFIX_TEXT):
            return  # loop probes' own source addresses
        if ev.deleted:
            g.macs.forget(ev.mac)
            return
        if ev.static or ev.ifindex == g.bridge_index:
            return
        port = self._port_name(ev.ifindex)
        if port is None:
            return
        obs = g.macs.observe(ev.mac, port, now)
        if obs is None:
            return
        if obs.kind is ConflictKind.LOOP:
            self._apply(g, g.core.on_flap(obs.mac, obs.ports, now))
        elif g.core.in_episode(now):
            g.suppressed_moves += 1  # a loop's symptom, not a server that moved
        else:
            self._emit(
                g,
                Alert(
                    ConflictKind.MAC_MOVED, f"{obs.mac}: {' -> '.join(obs.ports)}", ports=tuple(obs.ports), mac=obs.mac
                ),
            )

    # -- actions -------------------------------------------------------------------------------------

    def _apply(self, g: _Guarded, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Alert):
                self._emit(g, a)
            else:
                self._carry_out(g, a)
        if self._wake is not None:
            self._wake.set()  # rounds the core asked for go out now

    def _carry_out(self, g: _Guarded, action: Action) -> None:
        """Blocks, unblocks and flushes happen at once, synchronously (a storm may be raging)."""
        try:
            if isinstance(action, Block):
                brport.set_port_flags(action.port, BLOCKED_FLAGS, flush=True)
                log.warning(
                    "loop_port_blocked", vna=self.vna_id, overlay=g.overlay_id, port=action.port, reason=action.reason
                )
            elif isinstance(action, Unblock):
                brport.set_port_flags(action.port, g.flags.get(action.port, FORWARDING_FLAGS))
                log.warning(
                    "loop_port_unblocked", vna=self.vna_id, overlay=g.overlay_id, port=action.port, reason=action.reason
                )
            elif isinstance(action, Flush):
                brport.flush_bridge(g.switch.name)
                log.info("fdb_flushed_topology_change", vna=self.vna_id, overlay=g.overlay_id, reason=action.reason)
        except SwitchError as exc:
            log.error("l2_action_failed", vna=self.vna_id, overlay=g.overlay_id, action=repr(action), error=str(exc))
            if isinstance(action, Block):
                g.core.block_failed(action.port, time.monotonic())

    def _emit(self, g: _Guarded, a: Alert) -> None:
        log_fn = log.warning if a.kind in (ConflictKind.LOOP, ConflictKind.LOOP_BLOCKED) else log.info
        log_fn(
            "l2_alert",
            vna=self.vna_id,
            overlay=g.overlay_id,
            kind=a.kind.value,
            port=a.port,
            ports=list(a.ports),
            mac=a.mac,
            detector=a.detector.value if a.detector else None,
            detail=a.detail,
        )
        if self.sink is None:
            return
        alert = Conflict(
            vna_id=self.vna_id,
            overlay_id=g.overlay_id,
            kind=a.kind,
            mac=a.mac,
            ports=list(a.ports),
            port=a.port,
            detector=a.detector,
            time=dt.datetime.now(dt.UTC),
            detail=a.detail,
        )
        try:
            self.sink(alert)
        except Exception as exc:  # the sink must never break the data plane
            log.warning("alert_sink_failed", vna=self.vna_id, error=repr(exc))
