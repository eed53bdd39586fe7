"""Tiny stdlib-only network tools run inside test namespaces (no ping/arping/nc needed).

python nettools.py ping HOST [COUNT] [TIMEOUT]     -> prints replies, exit 0 if all answered
python nettools.py garp IFACE IP                   -> one gratuitous ARP request
python nettools.py sink PORT                       -> accept one TCP connection, print "<bytes> <sha256>"
python nettools.py source HOST PORT NBYTES [SECS]  -> send random bytes (spread over SECS), print "<bytes> <sha256>"
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
import time


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(host: str, count: int = 3, timeout: float = 1.0) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(timeout)
    ident = os.getpid() & 0xFFFF
    ok = 0
    for seq in range(count):
        body = struct.pack("!HH", ident, seq) + b"skyferry-ping"
        hdr = struct.pack("!BBH", 8, 0, 0)
        pkt = hdr[:2] + struct.pack("!H", _csum(hdr + body)) + body
        t0 = time.monotonic()
        sock.sendto(pkt, (host, 0))
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"seq={seq} timeout")
                break
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                print(f"seq={seq} timeout")
                break
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if typ == 0 and rid == ident and rseq == seq:
                ok += 1
                print(f"seq={seq} rtt_ms={(time.monotonic() - t0) * 1000:.2f}")
                break
    return 0 if ok == count else 1


def garp(iface: str, ip: str) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    mac = sock.getsockname()[4][:6]
    ipb = socket.inet_aton(ip)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ipb + b"\0" * 6 + ipb
    frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
    sock.send(frame.ljust(60, b"\0"))
    return 0


def sink(port: int) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    print(n, h.hexdigest(), flush=True)
    return 0


def source(host: str, port: int, nbytes: int, secs: float = 0.0) -> int:
    data = os.urandom(nbytes)
    sock = socket.create_connection((host, port), timeout=20)
    chunk = 64 * 1024
    steps = max(1, -(-nbytes // chunk))
    t0 = time.monotonic()
    for i in range(steps):
        sock.sendall(data[i * chunk : (i + 1) * chunk])
        if secs:
            delay = t0 + secs * (i + 1) / steps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the sink to close
    print(nbytes, hashlib.sha256(data).hexdigest(), flush=True)
    return 0


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "ping":
        return ping(args[0], int(args[1]) if len(args) > 1 else 3, float(args[2]) if len(args) > 2 else 1.0)
    if cmd == "garp":
        return garp(args[0], args[1])
    if cmd == "sink":
        return sink(int(args[0]))
    if cmd == "source":
        return source(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 0.0)
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
