"""Per-flow counters fed by the tunnels' frame hook, and ARP-based IP/MAC conflict detection."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from vna_agent.dataplane.stats import Direction, parse_frame
from vna_agent.loopguard import PROBE_ETHERTYPE

ETH_P_ARP = 0x0806
_VNET = 10

FlowKey = tuple[str, str, str | None, str | None]


@dataclass
class FlowTable:
    """Packets/bytes per (src MAC, dst MAC, src IP, dst IP) of one overlay since the last drain."""

    overlay_id: str
    counts: dict[FlowKey, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    arp_seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    """IP -> (MAC, time) from ARP senders, for duplicate-IP detection."""
    ip_conflicts: list[tuple[str, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, payload: memoryview, vnet: bool, direction: Direction) -> None:
        """The tunnels' FlowHook: count the frame (a superpacket counts as its segments)."""
        self.sample(payload, len(payload), 0, vnet, direction)

    def sample(self, head: memoryview | bytes, length: int, segments: int, vnet: bool, direction: Direction) -> None:
        """The native fast path's FlowSampler: a frame's head, its length and wire packets (0: work it out)."""
        info = parse_frame(head, vnet)
        if info is None or info.ethertype == PROBE_ETHERTYPE:  # loop probes are the overlay's own, not a flow
            return
        size = length - (_VNET if vnet else 0)
        with self.lock:
            c = self.counts[(info.src_mac, info.dst_mac, info.src_ip, info.dst_ip)]
            c[0] += segments or info.segments
            c[1] += size
        if info.ethertype == ETH_P_ARP:
            self._arp(memoryview(head)[_VNET if vnet else 0 :])

    def _arp(self, frame: memoryview) -> None:
        if len(frame) < 42:
            return
        sender_mac = ":".join(f"{b:02x}" for b in frame[22:28])
        sender_ip = ".".join(str(b) for b in frame[28:32])
        if sender_ip == "0.0.0.0":
            return
        now = time.time()
        with self.lock:
            prev = self.arp_seen.get(sender_ip)
            if prev is not None and prev[0] != sender_mac and now - prev[1] < 30:
                self.ip_conflicts.append((sender_ip, prev[0], sender_mac))
            self.arp_seen[sender_ip] = (sender_mac, now)

    def drain(self) -> tuple[float, float, dict[FlowKey, list[int]], list[tuple[str, str, str]]]:
        """Take the counters and conflicts gathered since the last drain."""
        with self.lock:
            counts, self.counts = dict(self.counts), defaultdict(lambda: [0, 0])
            conflicts, self.ip_conflicts = self.ip_conflicts, []
            start, self.started = self.started, time.time()
        return start, self.started, counts, conflicts
