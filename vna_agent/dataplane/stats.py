"""Per-tunnel counters, frame parsing helpers and the per-flow hook.

Frames are counted as the packets they stand for: a GSO superpacket read
from a TAP with a virtio_net_hdr counts as its number of segments
(payload / gso_size), so counters compare with what an iperf or a NIC
counts. Per-flow statistics are a later step: a :data:`FlowHook` installed
on a tunnel sees every frame that passes (cheap when unset: one ``is None``
test per frame); :func:`parse_frame` extracts MACs, IPs and segment count.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .wire import VNET_HDR

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
_VNET = VNET_HDR.size
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100


class Direction(StrEnum):
    """Which way a frame passes the tunnel."""

    OUT = "out"  # device -> peer
    IN = "in"  # peer -> device


class DropReason(StrEnum):
    """Names of the drop counters."""

    BAD_TAG = "bad_tag"
    REPLAY = "replay"
    NO_SESSION = "no_session"
    NONCE_EXHAUSTED = "nonce_exhausted"
    TOO_BIG = "too_big"
    DECODE = "decode"
    INCOMPLETE = "incomplete"  # datagram: a piece of a split record never arrived
    LINK_DOWN = "link_down"  # frame read while no peer connection
    QUEUE_FULL = "queue_full"
    OFFLOAD_MISMATCH = "offload_mismatch"  # GSO/csum frame for a TAP without VNET_HDR
    DEVICE = "device"  # TAP write failed


#: Called with (payload, payload starts with virtio_net_hdr, direction).
FlowHook = Callable[[memoryview, bool, Direction], None]
#: The native fast path's flow feed: (frame head, frame length, wire packets, head starts with
#: virtio_net_hdr, direction); the head holds at least the L2/L3 headers and an ARP body.
FlowSampler = Callable[[bytes, int, int, bool, Direction], None]


class TunnelState(StrEnum):
    """Life cycle of a tunnel endpoint."""

    STOPPED = "stopped"
    CONNECTING = "connecting"  # client: dialing / backing off
    LISTENING = "listening"  # server: waiting for the peer
    HANDSHAKING = "handshaking"
    UP = "up"
    FAILED = "failed"


#: Serialises read-modify-writes of ``TunnelStats.drops`` (see :meth:`TunnelStats.drop`).
STATS_LOCK = threading.Lock()


@dataclass(slots=True)
class TunnelStats:
    """Counters of one tunnel endpoint (monotonic, never reset while running)."""

    records_out: int = 0
    bytes_out: int = 0
    frames_out: int = 0
    records_in: int = 0
    bytes_in: int = 0
    frames_in: int = 0
    keepalives_out: int = 0
    keepalives_in: int = 0
    handshakes: int = 0
    handshakes_failed: int = 0
    handshakes_refused: int = 0
    connects: int = 0
    disconnects: int = 0
    last_handshake: float | None = None
    state: TunnelState = TunnelState.STOPPED
    drops: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped frames/records under ``reason``."""
        with STATS_LOCK:  # the fast path's counters may be merged in from another thread
            self.drops[reason] = self.drops.get(reason, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "state": str(self.state),
            "records_out": self.records_out,
            "bytes_out": self.bytes_out,
            "frames_out": self.frames_out,
            "records_in": self.records_in,
            "bytes_in": self.bytes_in,
            "frames_in": self.frames_in,
            "keepalives_out": self.keepalives_out,
            "keepalives_in": self.keepalives_in,
            "handshakes": self.handshakes,
            "handshakes_failed": self.handshakes_failed,
            "handshakes_refused": self.handshakes_refused,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "last_handshake": self.last_handshake,
            "drops": dict(self.drops),
            "uptime": round(time.time() - self.started, 3),
        }


def gso_segments(payload: memoryview | bytes, vnet: bool) -> int:
    """How many wire packets a payload stands for (1 unless it is a GSO superpacket)."""
    if not vnet or len(payload) < _VNET:
        return 1
    flags, gso_type, hdr_len, gso_size, csum_start, _ = VNET_HDR.unpack_from(payload)
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE or gso_size == 0:
        return 1
    frame_len = len(payload) - _VNET
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if kind in (GSO_TCPV4, GSO_TCPV6) and csum_start + 13 <= frame_len:
            l4 = (payload[_VNET + csum_start + 12] >> 4) * 4
        else:
            l4 = 8
        data = frame_len - csum_start - l4
    else:  # hdr_len from tun is the linear head, an upper bound of the headers
        data = frame_len - hdr_len
    segments: int = -(-data // gso_size)
    return max(1, segments)


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """Addresses of one frame (for per-flow statistics)."""

    dst_mac: str
    src_mac: str
    ethertype: int
    src_ip: str | None
    dst_ip: str | None
    proto: int | None
    segments: int


def _mac(b: memoryview | bytes) -> str:
    return ":".join(f"{x:02x}" for x in bytes(b))


def parse_frame(payload: memoryview | bytes, vnet: bool) -> FrameInfo | None:
    """Ethernet/IP addresses of a payload (``None`` if too short)."""
    off = _VNET if vnet else 0
    frame = memoryview(payload)[off:]
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    l3 = 14
    if ethertype == ETH_P_8021Q and len(frame) >= 18:
        ethertype = int.from_bytes(frame[16:18], "big")
        l3 = 18
    src_ip = dst_ip = None
    proto = None
    if ethertype == ETH_P_IP and len(frame) >= l3 + 20:
        proto = frame[l3 + 9]
        src_ip = str(ipaddress.IPv4Address(bytes(frame[l3 + 12 : l3 + 16])))
        dst_ip = str(ipaddress.IPv4Address(bytes(frame[l3 + 16 : l3 + 20])))
    elif ethertype == ETH_P_IPV6 and len(frame) >= l3 + 40:
        proto = frame[l3 + 6]
        src_ip = str(ipaddress.IPv6Address(bytes(frame[l3 + 8 : l3 + 24])))
        dst_ip = str(ipaddress.IPv6Address(bytes(frame[l3 + 24 : l3 + 40])))
    return FrameInfo(
        dst_mac=_mac(frame[0:6]),
        src_mac=_mac(frame[6:12]),
        ethertype=ethertype,
        src_ip=src_ip,
        dst_ip=dst_ip,
        proto=proto,
        segments=gso_segments(payload, vnet),
    )
