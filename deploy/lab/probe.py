"""Bounded reachability probes, run inside a lab namespace (stdlib only; runs as a plain script).

``python probe.py ping DST [--count N] [--timeout S] [--interval S]``
    ICMP echo over a raw socket; prints one JSON line
    ``{"sent": n, "received": m, "rtt_ms": [...]}``; exit 0 if any reply came back.

``python probe.py arp IFACE DST [--count N] [--timeout S]``
    ARP request (an RFC 5227 probe when IFACE has no address) on a packet
    socket; prints ``{"mac": "..."}`` or ``{"mac": null}``; exit 0 if answered.

The lab runs it with ``ip netns exec``; no ``ping``/``arping`` binary needed.
Counts are capped at 100 and waits at 5 s so a probe is always bounded.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

MAX_COUNT = 100
MAX_WAIT = 5.0
ETH_P_ARP = 0x0806
SIOCGIFADDR = 0x8915


def checksum(data: bytes) -> int:
    """The internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload


def ping(dst: str, count: int, timeout: float, interval: float) -> dict[str, object]:
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(1, count + 1):
            sent_at = time.monotonic()
            try:
                sock.sendto(echo_request(ident, seq, struct.pack("!d", sent_at) + b"skyferry-lab"), (dst, 0))
            except OSError:  # no route, neighbour failed: this one is lost
                time.sleep(min(timeout, interval))
                continue
            deadline = sent_at + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                packet, (src, _) = sock.recvfrom(2048)
                ihl = (packet[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
                if kind == 0 and rid == ident and rseq == seq and src == dst:
                    rtts.append((time.monotonic() - sent_at) * 1000)
                    break
            if seq < count:
                time.sleep(max(0.0, interval - (time.monotonic() - sent_at)))
    return {"sent": count, "received": len(rtts), "rtt_ms": [round(r, 3) for r in rtts]}


def _iface_ip(iface: str) -> bytes:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", iface.encode()[:15]))
        except OSError:
            return b"\0\0\0\0"
    return res[20:24]


def arp(iface: str, dst: str, count: int, timeout: float) -> dict[str, object]:
    target = socket.inet_aton(dst)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((iface, ETH_P_ARP))
        mac = sock.getsockname()[4]
        src_ip = _iface_ip(iface)
        frame = (
            b"\xff" * 6
            + mac
            + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac
            + src_ip
            + b"\0" * 6
            + target
        )
        for _ in range(count):
            sock.send(frame)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                data = sock.recv(2048)
                op = struct.unpack("!H", data[20:22])[0]
                if op == 2 and data[28:32] == target:
                    return {"mac": ":".join(f"{b:02x}" for b in data[22:28])}
    return {"mac": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping")
    p.add_argument("dst")
    a = sub.add_parser("arp")
    a.add_argument("iface")
    a.add_argument("dst")
    for q in (p, a):
        q.add_argument("--count", "-c", type=int, default=3)
        q.add_argument("--timeout", "-W", type=float, default=1.0)
    p.add_argument("--interval", "-i", type=float, default=0.2)
    args = parser.parse_args(argv)
    count = max(1, min(args.count, MAX_COUNT))
    timeout = max(0.01, min(args.timeout, MAX_WAIT))
    dst = str(ipaddress.IPv4Address(args.dst))
    if args.cmd == "ping":
        result = ping(dst, count, timeout, max(0.0, min(args.interval, MAX_WAIT)))
        ok = bool(result["received"])
    else:
        result = arp(args.iface, dst, count, timeout)
        ok = result["mac"] is not None
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
