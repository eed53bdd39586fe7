"""Lab traffic tools for the tunnel spray test, run inside a lab namespace (``python -m tests.e2e.spray_tool``).

* ``spray``: send random and mutated datagrams to a datagram tunnel port and
  junk TCP connections to a stream tunnel port, at a bounded rate for a
  bounded time; print what was sent as JSON.
* ``source`` / ``sink``: a timed TCP transfer of seeded pseudo-random bytes;
  each side prints the byte count and the SHA-256 of what it sent/received.

Junk is shaped like the real wire (``vna_agent.dataplane.wire``): every
message type, headers with every field at its edges, exact and wrong
lengths, and (``--receiver-index``) the receiver index an on-path observer
would read off the wire.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable

from vna_agent.dataplane.handshake import INITIATION_LEN, RESPONSE_LEN
from vna_agent.dataplane.wire import MAX_MESSAGE, PIECE_HEADER, RECORD_HEADER, STREAM_LEN, MsgType

MAX_DATAGRAM = 1472
MAX_OPEN = 24
Mutator = Callable[[random.Random, int | None], bytes]


def _edge(rng: random.Random, bits: int) -> int:
    return rng.choice((0, 1, 2, (1 << bits) - 1, (1 << (bits - 1)), rng.getrandbits(bits)))


def _index(rng: random.Random, known: int | None) -> int:
    return known if known is not None and rng.random() < 0.5 else rng.getrandbits(32)


def _random(rng: random.Random, known: int | None) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 15, 16, 17, rng.randrange(MAX_DATAGRAM + 1))))


def _handshake(rng: random.Random, known: int | None) -> bytes:
    typ = rng.choice((MsgType.INITIATION, MsgType.RESPONSE))
    size = INITIATION_LEN if typ == MsgType.INITIATION else RESPONSE_LEN
    size = rng.choice((size, size, 1, size - 1, size + 1, rng.randrange(1, 600)))
    return bytes([typ]) + rng.randbytes(size - 1)


def _record(rng: random.Random, known: int | None) -> bytes:
    typ = rng.choice((MsgType.DATA, MsgType.DATA, MsgType.PLAIN))
    head = RECORD_HEADER.pack(typ, _edge(rng, 8), _edge(rng, 16), _index(rng, known), _edge(rng, 64))
    return head + rng.randbytes(rng.randrange(MAX_DATAGRAM - len(head)))


def _piece(rng: random.Random, known: int | None) -> bytes:
    count = rng.choice((0, 1, 2, 3, 45, 255, rng.randrange(256)))
    idx = rng.choice((0, 1, max(count - 1, 0), 255, rng.randrange(256)))
    n = rng.choice((1, 16, 700, MAX_DATAGRAM - PIECE_HEADER.size, rng.randrange(1, MAX_DATAGRAM - PIECE_HEADER.size)))
    off = rng.choice((0, idx * n, 66079, 0xFFFFFFFF, rng.getrandbits(32)))
    head = PIECE_HEADER.pack(MsgType.PIECE, idx, count, _edge(rng, 8), _index(rng, known), _edge(rng, 32), off)
    return head + rng.randbytes(n)


UDP_MUTATORS: tuple[Mutator, ...] = (_random, _handshake, _record, _piece)


def _framed(msg: bytes) -> bytes:
    return STREAM_LEN.pack(len(msg)) + msg


def tcp_junk(rng: random.Random, known: int | None) -> bytes:
    """What one junk connection sends (always at least one byte)."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    if kind == 1:
        return STREAM_LEN.pack(rng.choice((0, MAX_MESSAGE + 1, 0xFFFFFFFF))) + rng.randbytes(8)
    if kind == 2:  # a length that promises more than comes
        return STREAM_LEN.pack(rng.randrange(100, MAX_MESSAGE)) + rng.randbytes(rng.randrange(1, 64))
    if kind == 3:
        return _framed(_handshake(rng, known))
    if kind == 4:
        return b"".join(_framed(_record(rng, known)) for _ in range(rng.randrange(1, 5)))
    return bytes(rng.randrange(1, 4))  # less than a length prefix


class Sprayer:
    """Paced junk towards one UDP and one TCP port (lab addresses only, bounded rate and time)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sent: Counter[str] = Counter()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sel = selectors.DefaultSelector()
        self.open = 0

    def run(self) -> dict[str, int]:
        a = self.args
        udp_to = _addr(a.udp)
        start = time.monotonic()
        end = start + a.seconds
        udp_n = tcp_n = 0
        while (now := time.monotonic()) < end:
            while udp_n < (now - start) * a.udp_rate:
                self._send_udp(udp_to)
                udp_n += 1
            while tcp_n < (now - start) * a.tcp_rate:
                self._open_tcp()
                tcp_n += 1
            self._poll(0.002)
        deadline = time.monotonic() + 10  # let the server see every close
        while self.open and time.monotonic() < deadline:
            self._poll(0.05)
        return dict(self.sent)

    def _send_udp(self, to: tuple[str, int]) -> None:
        mutate = self.rng.choice(UDP_MUTATORS)
        payload = mutate(self.rng, self.args.receiver_index)
        try:
            self.udp.sendto(payload, to)
        except OSError:
            self.sent["udp_failed"] += 1
            return
        self.sent["udp"] += 1
        self.sent[f"udp_{mutate.__name__.lstrip('_')}"] += 1
        self.sent["udp_empty"] += not payload

    def _open_tcp(self) -> None:
        if self.open >= MAX_OPEN:
            self.sent["tcp_skipped"] += 1
            return
        data = tcp_junk(self.rng, self.args.receiver_index)
        try:
            s = socket.create_connection(_addr(self.args.tcp), timeout=2)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees EOF: whatever is unparsed is counted
        except OSError:
            self.sent["tcp_failed"] += 1
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.open += 1
        self.sent["tcp"] += 1
        self.sent["tcp_bytes"] += len(data)

    def _poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                if s.recv(65536):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            self.sel.unregister(s)
            s.close()
            self.open -= 1


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _stream(seed: int) -> Callable[[], bytes]:
    rng = random.Random(seed)
    return lambda: rng.randbytes(65536)


def source(args: argparse.Namespace) -> dict[str, object]:
    """Send seeded bytes for ``--seconds`` (at most ``--rate`` bytes/s when given)."""
    for _ in range(100):
        try:
            s = socket.create_connection(_addr(args.to), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit("cannot connect")
    h, n, block = hashlib.sha256(), 0, _stream(args.seed)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < args.seconds:
        if args.rate and n > elapsed * args.rate:
            time.sleep(0.001)
            continue
        b = block()
        s.sendall(b)
        h.update(b)
        n += len(b)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(60)
    s.recv(1)  # the sink closes once it has everything
    return {"bytes": n, "sha256": h.hexdigest(), "seconds": round(time.monotonic() - start, 3)}


def sink(args: argparse.Namespace) -> dict[str, object]:
    """Receive one connection to EOF."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(1)
    print("ready", flush=True)
    srv.settimeout(60)
    c, _ = srv.accept()
    c.settimeout(60)
    h, n = hashlib.sha256(), 0
    while b := c.recv(1 << 20):
        h.update(b)
        n += len(b)
    c.close()
    return {"bytes": n, "sha256": h.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.spray_tool")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("spray")
    sp.add_argument("--udp", required=True, help="host:port of a datagram tunnel")
    sp.add_argument("--tcp", required=True, help="host:port of a stream tunnel")
    sp.add_argument("--seconds", type=float, default=30.0)
    sp.add_argument("--udp-rate", type=float, default=1000.0, help="datagrams per second")
    sp.add_argument("--tcp-rate", type=float, default=20.0, help="connections per second")
    sp.add_argument("--receiver-index", type=int, default=None, help="index read off the wire (on-path junk)")
    sp.add_argument("--seed", type=int, default=9)
    so = sub.add_parser("source")
    so.add_argument("--to", required=True)
    so.add_argument("--seconds", type=float, required=True)
    so.add_argument("--rate", type=float, default=0.0, help="bytes per second, 0: as fast as it goes")
    so.add_argument("--seed", type=int, default=1)
    si = sub.add_parser("sink")
    si.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    if args.cmd == "spray":
        out: dict[str, object] = dict(Sprayer(args).run())
    elif args.cmd == "source":
        out = source(args)
    else:
        out = sink(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
