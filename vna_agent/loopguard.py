"""Loop protection for one overlay switch: loop probes, loop evidence, who blocks, when to unblock.

Sans-IO: :class:`LoopCore` is fed frames and times and answers with actions; the
I/O (packet socket, netlink) is :mod:`vna_agent.l2guard`.

How it works (a loop-protect/BPDU-guard scheme, not STP):

* Every ``interval_s`` (and at once when something suspicious happens: a MAC
  flapping, a peer announcing a loop) the switch sends a *loop probe* out of
  each of its ports, tunnels and local segments alike: a small multicast
  frame (``PROBE_DST``, ethertype ``0x88B5``) carrying the VNA's id, a random
  instance id, a sequence number, flags and an HMAC only this instance can
  verify. Every bridge floods it, so it goes wherever a broadcast goes.
* A probe of our own that comes back on *another* port than it left by is a
  loop through those two ports (the packet socket sees it before the bridge,
  also on a blocked port). Back on the *same* port means a loop somewhere
  beyond that port; it is counted, nothing here can break it.
* Exactly one VNA per loop breaks it: the one with the highest id among the
  VNAs that see the loop (like an STP election, the lowest id keeps all its
  ports). A VNA that hears a higher-id VNA waits ``hold_s`` (with a confirming
  probe round half-way) for that VNA to announce the loop (``FLAG_LOOPED``)
  and defers to it; otherwise it blocks one of its own loop ports: a tunnel
  before a local segment, the newest tunnel first (the redundant one). A VNA
  with a port added lately waits ``new_port_hold_s`` first: the new port may
  lead to VNAs it has not heard yet.
* Any block or unblock bumps the VNA's topology-change counter; peers that see
  it flush their MAC tables (like STP's topology change) and re-examine the
  loop with probes sent after the change only, so two VNAs do not both block.
* A blocked port keeps sending and receiving probes. When none of them has
  come back for ``clear_s`` the redundant path is gone and the port forwards
  again (``loop-cleared``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from bus.vna import BlockedPort, ConflictKind, LoopDetector, LoopProtectStatus, LoopState

#: IEEE 802 local experimental ethertype 1 (for vendor-private protocols).
PROBE_ETHERTYPE = 0x88B5
#: Locally administered multicast: every bridge floods it (it is not a reserved 01:80:c2 address).
PROBE_DST = bytes.fromhex("035346000001")
#: Probes leave with a locally administered source MAC starting with this prefix.
PROBE_SRC_PREFIX = bytes.fromhex("025346")
PROBE_SRC_PREFIX_TEXT = PROBE_SRC_PREFIX.hex(":")
MAGIC = b"SFLP"
VERSION = 1
FLAG_LOOPED = 0x01  # the sender sees a loop it has not broken
FLAG_BLOCKING = 0x02  # the sender blocks at least one port
TAG_LEN = 16
MAX_ID = 64
MIN_FRAME = 60
# dst, src, ethertype | magic, version, flags, tc, seq, port number, instance, id length
_HEAD = struct.Struct("!6s6sH4sBBHIH8sB")
log = structlog.get_logger(__name__)


class PortKind(StrEnum):
    TUNNEL = "tunnel"
    SEGMENT = "segment"


@dataclass(frozen=True, slots=True)
class Probe:
    """A decoded loop probe."""

    src: bytes
    vna_id: str
    instance: bytes
    seq: int
    port_no: int
    flags: int
    tc: int
    signed: bytes
    tag: bytes


def probe_src(vna_id: str, overlay_id: str) -> bytes:
    """The source MAC of a switch's probes (stable per VNA and overlay)."""
    return PROBE_SRC_PREFIX + hashlib.sha256(f"{vna_id}/{overlay_id}".encode()).digest()[:3]


def encode_probe(
    key: bytes, src: bytes, vna_id: str, instance: bytes, seq: int, port_no: int, flags: int, tc: int
) -> bytes:
    """One probe frame (padded to the Ethernet minimum)."""
    ident = vna_id.encode()[:MAX_ID]
    signed = (
        _HEAD.pack(
            PROBE_DST,
            src,
            PROBE_ETHERTYPE,
            MAGIC,
            VERSION,
            flags,
            tc & 0xFFFF,
            seq & 0xFFFFFFFF,
            port_no,
            instance,
            len(ident),
        )
        + ident
    )
    frame = signed + hmac.new(key, signed, hashlib.sha256).digest()[:TAG_LEN]
    return frame.ljust(MIN_FRAME, b"\0")


def decode_probe(frame: bytes) -> Probe | None:
    """The probe in ``frame``, or ``None`` if it is not one (or is malformed)."""
    if len(frame) < _HEAD.size + TAG_LEN:
        return None
    _dst, src, etype, magic, version, flags, tc, seq, port_no, instance, n = _HEAD.unpack_from(frame)
    if etype != PROBE_ETHERTYPE or magic != MAGIC or version != VERSION or n > MAX_ID:
        return None
    end = _HEAD.size + n
    if len(frame) < end + TAG_LEN:
        return None
    try:
        vna_id = frame[_HEAD.size : end].decode()
    except UnicodeDecodeError:
        return None
    return Probe(src, vna_id, instance, seq, port_no, flags, tc, frame[:end], frame[end : end + TAG_LEN])


def _newer(a: int, b: int) -> bool:
    """Serial-number order of 16-bit counters: is ``a`` after ``b``."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


@dataclass(frozen=True)
class LoopTiming:
    """Timers of loop protection (seconds)."""

    interval_s: float = 0.25  # periodic probe round
    hold_s: float = 0.4  # a VNA that hears a higher-id one waits this long for it to act before blocking
    new_port_hold_s: float = 0.1  # a new port may lead to unknown (higher) VNAs: hear them first
    neighbour_hold_s: float = 1.0  # a loop port's own peer has the higher id: it blocks, unless it fails to
    neighbour_s: float = 5.0  # a tunnel's far end counts as known this long after its last probe there
    clear_s: float = 1.0  # no probe came back through a blocked port for this long: unblock
    fresh_s: float = 0.75  # evidence older than this no longer means "looped now"
    peer_s: float = 0.75  # a peer's probe counts as heard for this long
    max_probe_age_s: float = 2.0  # own probes older than this are ignored (replays)
    min_round_gap_s: float = 0.02  # triggered rounds at most this often
    flush_gap_s: float = 0.05  # MAC table flushes on a peer's topology change at most this often


# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    port: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unblock:
    port: str
    reason: str


@dataclass(frozen=True, slots=True)
class Flush:
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    kind: ConflictKind
    detail: str
    ports: tuple[str, ...] = ()
    port: str | None = None
    mac: str | None = None
    detector: LoopDetector | None = None


Action = Block | Unblock | Flush | Alert


# --- state ---------------------------------------------------------------------------------------


@dataclass
class _Port:
    name: str
    kind: PortKind
    label: str
    number: int
    order: int
    peer: str | None = None  # a tunnel's far end (the VNA id the VNM named)
    blocked_since: float | None = None
    blocked_wall: dt.datetime | None = None
    block_reason: str = ""
    loop_ports: tuple[str, ...] = ()


@dataclass
class _Pair:
    ports: tuple[str, str]
    first_seen: float
    last_seen: float
    last_sent: float  # send time of the newest probe seen on this pair


@dataclass
class _Peer:
    vna_id: str
    instance: bytes
    tc: int
    last_seen: float
    looped: bool = False
    looped_on: dict[str, float] = field(default_factory=dict)  # my port -> last LOOPED probe there
    seen_on: dict[str, float] = field(default_factory=dict)  # my port -> last probe there


@dataclass
class LoopCounters:
    probes_sent: int = 0
    probes_returned: int = 0
    echoes: int = 0  # own probe back on the port it left by (a loop beyond that port)
    peer_probes: int = 0
    bad_probes: int = 0


class LoopCore:
    """Loop protection state of one switch (see the module docstring).

    Args:
        vna_id: this VNA (the election compares ids as strings: the highest id on a loop blocks).
        overlay_id: the overlay whose switch this is.
        timing: timers.
        key: HMAC key of this instance's probes (random by default).
    """

    def __init__(self, vna_id: str, overlay_id: str, timing: LoopTiming | None = None, *, key: bytes | None = None):
        self.vna_id = vna_id
        self.overlay_id = overlay_id
        self.t = timing or LoopTiming()
        self.key = key or os.urandom(32)
        self.instance = os.urandom(8)
        self.src = probe_src(vna_id, overlay_id)
        self.counters = LoopCounters()
        self.ports: dict[str, _Port] = {}
        self._numbers = 0
        self._seq = 0
        self._tc = 0
        self._outstanding: dict[int, tuple[str, float]] = {}  # seq -> (port, sent at)
        self._verified: set[int] = set()
        self._returned: set[tuple[int, str]] = set()  # (seq, port) seen back
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._echo: dict[str, float] = {}
        self._peers: dict[str, _Peer] = {}
        self._epoch = -1e18  # last topology change known here (own block/unblock, port change, peer's change)
        self._pending: float | None = None  # waiting since (a higher-id VNA was heard)
        self._pending_hold = 0.0  # the longest hold asked for while waiting
        self._deferring_to: str | None = None
        self._next_round = 0.0
        self._last_round = -1e18
        self._last_flush = -1e18
        self._last_flap = -1e18
        self._episode_alerted: set[LoopDetector] = set()
        self._last_evidence = -1e18  # any own probe across two ports, or a flap
        self._last_loop_seen = -1e18  # the same through forwarding ports only
        self._last_port_added = -1e18
        self.last_detected: dt.datetime | None = None
        self.last_cleared: dt.datetime | None = None

    # -- ports -------------------------------------------------------------------------------------

    def add_port(self, name: str, kind: PortKind, label: str, now: float, *, peer: str | None = None) -> list[Action]:
        """A port joined the switch (a tunnel, with the VNA at its far end if known, or a segment); probe it."""
        if name in self.ports:
            return []
        self._numbers += 1
        self.ports[name] = _Port(name, kind, label, self._numbers & 0xFFFF, self._numbers, peer)
        self._last_port_added = now
        self.request_round(now)
        return []

    def remove_port(self, name: str, now: float) -> list[Action]:
        """A port left the switch: forget its evidence; a blocked one is cleared."""
        port = self.ports.pop(name, None)
        if port is None:
            return []
        self._pairs = {k: v for k, v in self._pairs.items() if name not in k}
        self._echo.pop(name, None)
        for peer in self._peers.values():
            peer.looped_on.pop(name, None)
        self._topology_change(now)
        out: list[Action] = []
        if port.blocked_since is not None:
            self.last_cleared = dt.datetime.now(dt.UTC)
            out.append(
                Alert(
                    ConflictKind.LOOP_CLEARED, f"blocked port {name} ({port.label}) removed", port=name, ports=(name,)
                )
            )
        self.request_round(now)
        return out

    def blocked(self, name: str) -> bool:
        p = self.ports.get(name)
        return p is not None and p.blocked_since is not None

    def block_failed(self, name: str, now: float) -> None:
        """The I/O could not block ``name``: it forwards, look again."""
        p = self.ports.get(name)
        if p is not None:
            p.blocked_since = p.blocked_wall = None
            self._topology_change(now)

    # -- probe rounds ------------------------------------------------------------------------------

    def request_round(self, now: float, at: float | None = None) -> None:
        """Send a probe round at ``at`` (default: now), no sooner than the minimum gap after the last."""
        when = max(now if at is None else at, self._last_round + self.t.min_round_gap_s)
        self._next_round = min(self._next_round, when)

    def round_due(self, now: float) -> bool:
        return bool(self.ports) and now >= self._next_round

    def wakeup(self, now: float) -> float:
        """When :meth:`tick` (or a round) is next needed."""
        soon = self._next_round if self.ports else now + self.t.interval_s
        if self._pending is not None:
            soon = min(soon, self._pending + self.t.new_port_hold_s)
        if any(p.blocked_since is not None for p in self.ports.values()) or now - self._last_evidence < self.t.clear_s:
            soon = min(soon, now + 0.05)
        return soon

    def make_round(self, now: float) -> list[tuple[str, bytes]]:
        """One probe per port, recorded so their return can be recognised."""
        self._last_round = now
        self._next_round = now + self.t.interval_s
        cutoff = now - self.t.max_probe_age_s
        if self._outstanding and next(iter(self._outstanding.values()))[1] < cutoff:
            self._outstanding = {s: v for s, v in self._outstanding.items() if v[1] >= cutoff}
            self._verified &= self._outstanding.keys()
            self._returned = {r for r in self._returned if r[0] in self._outstanding}
        flags = (FLAG_LOOPED if self._looped(now) else 0) | (
            FLAG_BLOCKING if any(p.blocked_since is not None for p in self.ports.values()) else 0
        )
        out = []
        for port in self.ports.values():
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._outstanding[self._seq] = (port.name, now)
            out.append(
                (
                    port.name,
                    encode_probe(
                        self.key, self.src, self.vna_id, self.instance, self._seq, port.number, flags, self._tc
                    ),
                )
            )
        self.counters.probes_sent += len(out)
        return out

    # -- input -------------------------------------------------------------------------------------

    def receive(self, frame: bytes, port: str, now: float) -> list[Action]:
        """A probe frame seen arriving on ``port`` (any direction but outgoing)."""
        if port not in self.ports:
            return []
        probe = decode_probe(frame)
        if probe is None:
            self.counters.bad_probes += 1
            return []
        if probe.vna_id == self.vna_id and probe.instance == self.instance:
            return self._own(probe, port, now)
        if probe.vna_id == self.vna_id:
            return []  # our id with another instance: a previous run's probe, or forged
        return self._peer(probe, port, now)

    def _own(self, probe: Probe, port: str, now: float) -> list[Action]:
        sent = self._outstanding.get(probe.seq)
        if sent is None:
            return []
        if probe.seq not in self._verified:  # in a storm the same probe comes back many times
            expect = hmac.new(self.key, probe.signed, hashlib.sha256).digest()[:TAG_LEN]
            if not hmac.compare_digest(expect, probe.tag):
                self.counters.bad_probes += 1
                return []
            self._verified.add(probe.seq)
        sent_port, sent_at = sent
        self.counters.probes_returned += 1
        again = (probe.seq, port) in self._returned  # a copy still circling: nothing new to decide
        self._returned.add((probe.seq, port))
        if port == sent_port:
            self._echo[port] = now
            self.counters.echoes += 1
            return []
        if sent_port not in self.ports:
            return []
        a, b = sorted((sent_port, port))
        key = (a, b)
        pair = self._pairs.get(key)
        if pair is None:
            self._pairs[key] = _Pair(key, now, now, sent_at)
        else:
            pair.last_seen = now
            pair.last_sent = max(pair.last_sent, sent_at)
        self._last_evidence = now
        if not (self.blocked(a) or self.blocked(b)):
            self._last_loop_seen = now
        return [] if again else self._evaluate(now)

    def _peer(self, probe: Probe, port: str, now: float) -> list[Action]:
        self.counters.peer_probes += 1
        out: list[Action] = []
        peer = self._peers.get(probe.vna_id)
        news = peer is None
        if peer is None or peer.instance != probe.instance:
            changed = peer is not None  # restarted: its view of the topology is new
            peer = _Peer(probe.vna_id, probe.instance, probe.tc, now)
            self._peers[probe.vna_id] = peer
        else:
            changed = _newer(probe.tc, peer.tc)
            if changed:
                peer.tc = probe.tc
        peer.last_seen = now
        peer.seen_on[port] = now
        looped = bool(probe.flags & FLAG_LOOPED)
        if looped:
            news = news or now - peer.looped_on.get(port, -1e18) > self.t.peer_s
            peer.looped_on[port] = now
            if not peer.looped and LoopDetector.PROBE not in self._episode_alerted:
                self.request_round(now)  # it sees a loop: am I on it?
        news = news or changed or looped != peer.looped
        peer.looped = looped
        if changed:
            self._topology_change(now)
            if now - self._last_flush >= self.t.flush_gap_s:
                self._last_flush = now
                out.append(Flush(f"topology change at {probe.vna_id}"))
        if news:  # copies of probes already seen (a storm is full of them) change nothing
            out.extend(self._evaluate(now))
        return out

    def on_flap(self, mac: str, ports: list[str], now: float) -> list[Action]:
        """The MAC watcher saw ``mac`` flapping between ``ports``: likely a loop; probe now to find it."""
        self._last_flap = now
        self._last_evidence = self._last_loop_seen = now
        if LoopDetector.PROBE not in self._episode_alerted:
            self.request_round(now)  # find the loop's ports (later rounds would only feed the storm)
        out: list[Action] = []
        if LoopDetector.MAC_FLAP not in self._episode_alerted:
            self._detected(LoopDetector.MAC_FLAP)
            out.append(
                Alert(
                    ConflictKind.LOOP,
                    f"{mac} flapping between {' and '.join(ports)}: a bridged loop",
                    ports=tuple(ports),
                    mac=mac,
                    detector=LoopDetector.MAC_FLAP,
                )
            )
        out.extend(self._parallel_block(ports, now))
        return out

    def _parallel_block(self, ports: list[str], now: float) -> list[Action]:
        """A MAC flapping between two forwarding tunnels to the same lower-id VNA: parallel links between two
        switches are a loop whatever else is there, and this is its higher end, so block now. (Probes say the
        same, but in a storm they may queue behind it in the tunnels for a second or more.)"""
        if len(ports) != 2 or ports[0] == ports[1]:
            return []
        a, b = (self.ports.get(n) for n in ports)
        if a is None or b is None or a.blocked_since is not None or b.blocked_since is not None:
            return []
        if a.kind is not PortKind.TUNNEL or b.kind is not PortKind.TUNNEL or a.peer is None or a.peer != b.peer:
            return []
        peer = self._peers.get(a.peer)
        if peer is None or now - peer.last_seen > self.t.neighbour_s or not peer.vna_id < self.vna_id:
            return []
        x, y = sorted((a.name, b.name))
        pair = _Pair((x, y), now, now, now)
        why = f"a MAC flaps between {x} and {y}, two tunnels to {a.peer}"
        return self._block([pair], now, why=why)

    def in_episode(self, now: float) -> bool:
        """An unbroken loop was seen lately (MAC moves are its symptoms then, not servers that moved)."""
        return now - self._last_loop_seen < self.t.clear_s

    # -- decisions ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Timers: decide after a hold, unblock cleared ports, end an episode."""
        out = self._evaluate(now)
        for port in list(self.ports.values()):
            if port.blocked_since is None:
                continue
            seen = [p.last_seen for k, p in self._pairs.items() if port.name in k]
            last = max([port.blocked_since, self._epoch, *seen])  # quiet since the last change, too
            if now - last > self._clear_after(port):
                out.extend(self._unblock(port, now))
        stale = now - 2 * self.t.clear_s
        if any(p.last_seen < stale for p in self._pairs.values()):
            self._pairs = {k: p for k, p in self._pairs.items() if p.last_seen >= stale}
        if self._episode_alerted and not self.in_episode(now):
            self._episode_alerted.clear()
        return out

    def _topology_change(self, now: float) -> None:
        self._epoch = now
        self._pending = None
        log.debug("loop_topology_change", vna=self.vna_id, overlay=self.overlay_id)

    def _detected(self, detector: LoopDetector) -> None:
        self._episode_alerted.add(detector)
        self.last_detected = dt.datetime.now(dt.UTC)

    def _unbroken(self, now: float) -> list[_Pair]:
        """Loops through two forwarding ports, seen by probes sent after the last topology change."""
        out = []
        for pair in self._pairs.values():
            a, b = (self.ports.get(n) for n in pair.ports)
            if a is None or b is None or a.blocked_since is not None or b.blocked_since is not None:
                continue
            if pair.last_sent > self._epoch and now - pair.last_seen <= self.t.fresh_s:
                out.append(pair)
        return out

    def _looped(self, now: float) -> bool:
        return bool(self._unbroken(now))

    def _higher_looped(self, now: float) -> str | None:
        """A higher-id VNA that announces a loop, heard on two of my ports (so on a loop with me)."""
        best = None
        for peer in self._peers.values():
            if peer.vna_id <= self.vna_id:
                continue
            ports = [p for p, t in peer.looped_on.items() if now - t <= self.t.peer_s]
            if len(ports) >= 2 and (best is None or peer.vna_id > best):
                best = peer.vna_id
        return best

    def _evaluate(self, now: float) -> list[Action]:
        out: list[Action] = []
        cands = self._unbroken(now)
        if not cands:
            self._pending = None
            self._deferring_to = None
            return out
        if LoopDetector.PROBE not in self._episode_alerted:
            self._detected(LoopDetector.PROBE)
            first = min(cands, key=lambda p: p.first_seen)
            out.append(
                Alert(
                    ConflictKind.LOOP,
                    f"own loop probe sent on {first.ports[0]} came back on {first.ports[1]}",
                    ports=first.ports,
                    detector=LoopDetector.PROBE,
                )
            )
            self.request_round(now)  # announce it (FLAG_LOOPED) at once
        higher = self._higher_looped(now)
        if higher is not None:
            if self._deferring_to != higher:
                log.debug("loop_defer", vna=self.vna_id, overlay=self.overlay_id, to=higher)
            self._deferring_to = higher
            self._pending = None
            return out
        self._deferring_to = None
        hold = self._hold(now, cands)
        if hold:
            if self._pending is None:
                self._pending, self._pending_hold = now, hold
                self.request_round(now, at=now + hold / 2)  # the confirming round
                log.debug("loop_hold", vna=self.vna_id, overlay=self.overlay_id, hold_s=hold)
                return out
            self._pending_hold = hold = max(hold, self._pending_hold)  # a hold never shrinks while waiting
            if now < self._pending + hold:
                return out
            confirm = self._pending + hold / 2 - 1e-3
            cands = [c for c in cands if c.last_sent >= confirm]
            if not cands:
                return out
        out.extend(self._block(cands, now))
        return out

    def _neighbours(self, now: float, cands: list[_Pair]) -> set[str] | None:
        """The VNAs at the far ends of my loop ports, if all are tunnels whose named peer is heard (lately)."""
        out = set()
        for name in {n for c in cands for n in c.ports}:
            peer = self.ports[name].peer
            known = self._peers.get(peer) if peer else None
            if known is None or now - known.last_seen > self.t.neighbour_s:
                return None  # a segment, or a name no probing VNA goes by
            out.add(known.vna_id)
        return out

    def _hold(self, now: float, cands: list[_Pair]) -> float:
        """How long to wait before blocking (zero: this VNA is the one to block now).

        The loop ports' own peers say most: a higher one will block (wait long, in case it fails);
        one lower peer at both ends is a two-VNA loop whose higher end this is. Otherwise a higher-id
        VNA heard lately may be on the loop and act, and a new port may lead to VNAs not heard yet.
        """
        neighbours = self._neighbours(now, cands)
        if neighbours and max(neighbours) > self.vna_id:
            return self.t.neighbour_hold_s
        if neighbours and len(neighbours) == 1:
            return 0.0
        if any(p.vna_id > self.vna_id and now - p.last_seen <= self.t.peer_s for p in self._peers.values()):
            return self.t.hold_s
        if now - self._last_port_added <= self.t.peer_s:
            return self.t.new_port_hold_s
        return 0.0

    def _choose(self, cands: list[_Pair]) -> _Port:
        names = {n for c in cands for n in c.ports}
        ports = [self.ports[n] for n in names]
        return max(ports, key=lambda p: (p.kind is PortKind.TUNNEL, p.order, p.name))

    def _clear_after(self, port: _Port) -> float:
        """Quiet time before a blocked port forwards again. Longer at the higher end of a tunnel (and a little
        different per VNA otherwise): when both ends of one link blocked because neither heard the other in
        time, the lower lets go first, its probes show the higher end the loop again, and that one keeps it."""
        if port.peer is not None and port.peer > self.vna_id:
            return self.t.clear_s
        spread = hashlib.sha256(self.vna_id.encode()).digest()[0] / 255
        return self.t.clear_s * (2 + spread / 4)

    def _block(self, cands: list[_Pair], now: float, *, why: str = "") -> list[Action]:
        port = self._choose(cands)
        pair = next(c for c in cands if port.name in c.ports)
        other = pair.ports[0] if pair.ports[1] == port.name else pair.ports[1]
        port.blocked_since = now
        port.blocked_wall = dt.datetime.now(dt.UTC)
        why = why or "own loop probes cross between them"
        port.block_reason = f"loop through {other} and {port.name}: {why}"
        port.loop_ports = pair.ports
        self._last_loop_seen = now  # the storm's echoes still arrive for a moment
        self._tc = (self._tc + 1) & 0xFFFF
        self._topology_change(now)
        self.request_round(now)  # tell the others (topology change, FLAG_BLOCKING) at once
        return [
            Block(port.name, port.block_reason),
            Flush(f"blocked {port.name}"),
            Alert(
                ConflictKind.LOOP_BLOCKED,
                f"blocked {port.kind.value} port {port.name} ({port.label}) to break the {other} - {port.name} loop",
                ports=pair.ports,
                port=port.name,
            ),
        ]

    def _unblock(self, port: _Port, now: float) -> list[Action]:
        waited = now - (port.blocked_since or now)
        port.blocked_since = port.blocked_wall = None
        port.block_reason = ""
        self._tc = (self._tc + 1) & 0xFFFF
        self._topology_change(now)
        self.request_round(now)
        self.last_cleared = dt.datetime.now(dt.UTC)
        reason = f"no loop probe crossed {port.name} for {self._clear_after(port):.1f} s: the redundant path is gone"
        return [
            Unblock(port.name, reason),
            Flush(f"unblocked {port.name}"),
            Alert(
                ConflictKind.LOOP_CLEARED,
                f"{port.kind.value} port {port.name} ({port.label}) forwards again after {waited:.1f} s; {reason}",
                ports=port.loop_ports,
                port=port.name,
            ),
        ]

    # -- view --------------------------------------------------------------------------------------

    def status(self, now: float | None = None) -> LoopProtectStatus:
        t = time.monotonic() if now is None else now
        blocked = [
            BlockedPort(
                port=p.name,
                kind=p.kind.value,
                label=p.label,
                since=p.blocked_wall or dt.datetime.now(dt.UTC),
                reason=p.block_reason,
                loop_ports=list(p.loop_ports),
            )
            for p in self.ports.values()
            if p.blocked_since is not None
        ]
        state = LoopState.BLOCKING if blocked else LoopState.LOOPED if self._looped(t) else LoopState.OK
        return LoopProtectStatus(
            state=state,
            blocked=blocked,
            probe_interval_s=self.t.interval_s,
            probes_sent=self.counters.probes_sent,
            probes_returned=self.counters.probes_returned,
            peers=sorted(p.vna_id for p in self._peers.values() if t - p.last_seen <= 4 * self.t.peer_s),
            deferring_to=self._deferring_to,
            last_detected=self.last_detected,
            last_cleared=self.last_cleared,
        )
