"""Overlay MTU each tunnel kind can carry over a given underlay path MTU.

Policy: oversized frames are never dropped silently. We fragment inside the
tunnel rather than clamp MSS:

* stream (TCP): records are a byte stream, any frame up to a 64 KiB
  superpacket passes; the underlay TCP segments it. Nothing to clamp.
* datagram (UDP): a record larger than one underlay datagram is split into
  pieces (``PIECE`` messages, sent with UDP GSO) and reassembled; IP
  fragmentation is never used (DF is set). Losing one piece loses the whole
  record (a superpacket: up to 64 KiB of inner TCP data, retransmitted by
  the inner TCP). Frames up to :attr:`MtuReport.unsplit_mtu` go as one
  datagram each.
* vxlan (kernel): no splitting; the VXLAN link gets ``path MTU - 50`` and
  the bridge drops bigger frames, so give the underlay room (jumbo frames).

A record that cannot be carried at all (payload above ``MAX_PAYLOAD``) is
counted under the ``too_big`` drop reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .wire import MAX_PAYLOAD, PIECE_HEADER, RECORD_HEADER, STREAM_LEN, TAG_LEN, VNET_HDR

IPV4_HDR = 20
IPV6_HDR = 40
UDP_HDR = 8
TCP_HDR = 20 + 12  # with the timestamp option Linux uses by default
ETH_HDR = 14
VXLAN_HDR = 8
#: IP packets are at most 64 KiB; such a frame (+ VLAN tag + virtio header) fits a record.
MAX_OVERLAY_MTU = 65535
assert MAX_OVERLAY_MTU + ETH_HDR + 4 + VNET_HDR.size <= MAX_PAYLOAD


def ip_overhead(ipv6: bool) -> int:
    return IPV6_HDR if ipv6 else IPV4_HDR


def vxlan_overhead(*, ipv6: bool = False) -> int:
    """Outer IP + UDP + VXLAN + inner Ethernet header (50 bytes over IPv4)."""
    return ip_overhead(ipv6) + UDP_HDR + VXLAN_HDR + ETH_HDR


def max_datagram(path_mtu: int, *, ipv6: bool = False) -> int:
    """Largest UDP payload that leaves unfragmented."""
    return path_mtu - ip_overhead(ipv6) - UDP_HDR


def piece_chunk(path_mtu: int, *, ipv6: bool = False) -> int:
    """Record bytes per datagram piece."""
    return max_datagram(path_mtu, ipv6=ipv6) - PIECE_HEADER.size


def record_overhead(*, encrypted: bool, vnet: bool) -> int:
    """Bytes a record adds to an Ethernet frame (header, tag, virtio header)."""
    return RECORD_HEADER.size + (TAG_LEN if encrypted else 0) + (VNET_HDR.size if vnet else 0)


@dataclass(frozen=True, slots=True)
class MtuReport:
    """What a tunnel kind carries over one underlay path."""

    mode: str
    path_mtu: int
    ipv6: bool
    encrypted: bool
    vnet: bool
    overlay_mtu: int
    """Largest overlay IP MTU carried without loss."""
    unsplit_mtu: int
    """Largest overlay IP MTU whose frames take one underlay packet each."""
    per_record_overhead: int
    """Bytes added per frame on the wire (record header/tag/virtio header, framing, piece header)."""
    strategy: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(mode: str, path_mtu: int, *, ipv6: bool = False, encrypted: bool = True, vnet: bool = True) -> MtuReport:
    """Compute the :class:`MtuReport` for ``mode`` in {stream, datagram, plain-stream, plain-datagram, vxlan}."""
    ipo = ip_overhead(ipv6)
    if mode == "vxlan":
        mtu = path_mtu - vxlan_overhead(ipv6=ipv6)
        return MtuReport(mode, path_mtu, ipv6, False, False, mtu, mtu, vxlan_overhead(ipv6=ipv6), "kernel-vxlan")
    rec = record_overhead(encrypted=encrypted, vnet=vnet)
    if mode.endswith("stream"):
        framing = STREAM_LEN.size + rec
        # one record per TCP segment when frame + framing fits the segment
        unsplit = path_mtu - ipo - TCP_HDR - framing - ETH_HDR
        return MtuReport(mode, path_mtu, ipv6, encrypted, vnet, MAX_OVERLAY_MTU, unsplit, framing, "tcp-stream")
    if mode.endswith("datagram"):
        unsplit = max_datagram(path_mtu, ipv6=ipv6) - rec - ETH_HDR
        return MtuReport(
            mode, path_mtu, ipv6, encrypted, vnet, MAX_OVERLAY_MTU, unsplit, rec, "split-records-in-tunnel"
        )
    raise ValueError(f"unknown mode {mode!r}")
