"""Seed corpora of the native harnesses, built with the Python implementation of the same wire format.

``python -m tests.fuzz.native.gen_corpus`` writes ``corpus/<harness>/seed-*``.

The record payloads are real traffic first: ``captured/`` holds record payloads the pump opened during
the lab's netns tunnel tests (``tests/vna_agent/dataplane/test_netns.py``: ARP, ping and a TCP
transfer over an encrypted datagram tunnel with TAP offloads), one file each, the record flags byte
then the payload: virtio_net_hdr frames, TSO superframes (gso_type TCPv4), bundles, a keepalive. They
were taken once with a temporary capture in ``fp_open_record`` (not kept in the code). A few more are
built here (IPv6 TSO, ECN, frames without a virtio header). Each payload is sealed under
the harness' fixed session keys (``fuzz_common.h``) by :class:`~vna_agent.dataplane.record.RecordSession`
and laid out the way the pump and the Python link send it: one datagram, PIECE runs in order, reversed
with a duplicate, a GRO-coalesced run, stream framing; plus handshakes with a valid mac1, keepalives,
the next session's first record, counters across the 32-bit wrap, and malformed framings.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.fuzz.native import CORPUS, HERE
from vna_agent.dataplane.handshake import INITIATION_LEN, RESPONSE_LEN, SessionKeys
from vna_agent.dataplane.keys import PublicKey
from vna_agent.dataplane.mtu import piece_chunk
from vna_agent.dataplane.record import RecordSession
from vna_agent.dataplane.wire import (
    FLAG_BUNDLE,
    FLAG_VNET,
    MAX_RECORD,
    PIECE_HEADER,
    STREAM_LEN,
    VNET_HDR,
    MsgType,
)

LOCAL_INDEX, NEXT_INDEX, REMOTE_INDEX = 0x0A0B0C0D, 0x0A0B0C0E, 0x01020304
_TAIL = bytes(range(1, 31))
RX_KEY, TX_KEY, NEXT_KEY, STATIC_PUB = (bytes(p) + _TAIL for p in (b"RX", b"TX", b"NX", b"SP"))
CAPTURED = HERE / "captured"
CHUNK = piece_chunk(1500)  # record bytes per piece on a 1500-byte IPv4 path, as the links compute it
_U16 = struct.Struct("!H")


def peer_session(*, next_session: bool = False, counter: int = 0) -> RecordSession:
    """The peer's side of the harness' session: its records open under the harness keys."""
    keys = SessionKeys(
        NEXT_KEY if next_session else RX_KEY,
        TX_KEY,
        REMOTE_INDEX,
        NEXT_INDEX if next_session else LOCAL_INDEX,
        True,
        PublicKey(STATIC_PUB),
    )
    s = RecordSession(keys)
    s.next_counter = counter
    return s


def seal(s: RecordSession, payload: bytes, flags: int) -> bytes:
    out = bytearray(MAX_RECORD)
    return bytes(out[: s.seal_into(payload, flags, memoryview(out))])


def pieces(rec: bytes, chunk: int = CHUNK) -> list[bytes]:
    """The PIECE datagrams of a record, as DatagramLink and the pump split it."""
    _, _, _, receiver, counter = struct.unpack_from("!BBHIQ", rec)
    parts = [rec[o : o + chunk] for o in range(0, len(rec), chunk)]
    return [
        PIECE_HEADER.pack(MsgType.PIECE, i, len(parts), 0, receiver, counter & 0xFFFFFFFF, i * chunk) + p
        for i, p in enumerate(parts)
    ]


def mac1(body: bytes) -> bytes:
    key = hashlib.blake2s(b"mac1----" + STATIC_PUB).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def handshake(kind: int) -> bytes:
    """An initiation or response addressed to the harness' node (valid mac1; the rest is not checked in C)."""
    size = INITIATION_LEN if kind == MsgType.INITIATION else RESPONSE_LEN
    body = bytes([kind, 0, 0, 0]) + hashlib.sha256(bytes([kind])).digest() * 4
    body = body[: size - 16]
    return body + mac1(body)


# -- payloads -------------------------------------------------------------------------------


def _eth(ethertype: int) -> bytes:
    return bytes.fromhex("02aabbccdd01") + bytes.fromhex("02aabbccdd02") + _U16.pack(ethertype)


def _ipv4_tcp(payload_len: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload_len, 1, 0x4000, 64, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    return _eth(0x0800) + ip + tcp + bytes(payload_len)


def _ipv6_tcp(payload_len: int) -> bytes:
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + payload_len, 6, 64, b"\xfd" + bytes(15), b"\xfd" + bytes(14) + b"\2")
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    return _eth(0x86DD) + ip + tcp + bytes(payload_len)


def _arp() -> bytes:
    return _eth(0x0806) + bytes.fromhex("0001080006040001") + bytes(20)


def _vnet(frame: bytes, *, gso: int = 0, csum_start: int = 34, gso_size: int = 1448, flags: int = 1) -> bytes:
    hdr_len = csum_start + 20 if gso else 0
    return VNET_HDR.pack(flags, gso, hdr_len, gso_size if gso else 0, csum_start, 16) + frame


def _bundle(frames: Iterable[bytes]) -> bytes:
    return b"".join(_U16.pack(len(f)) + f for f in frames)


def built_payloads() -> list[tuple[int, bytes]]:
    """(flags, payload) pairs of the traffic a tunnel carries."""
    acks = [_ipv4_tcp(0) for _ in range(8)]
    return [
        (0, _arp()),
        (0, _ipv4_tcp(1460)),
        (FLAG_BUNDLE, _bundle(acks)),
        (FLAG_VNET, _vnet(_ipv4_tcp(0), gso=0, flags=0)),
        (FLAG_VNET, _vnet(_ipv4_tcp(1448 * 8), gso=1)),
        (FLAG_VNET, _vnet(_ipv6_tcp(1428 * 6), gso=4, csum_start=54, gso_size=1428)),
        (FLAG_VNET, _vnet(_ipv4_tcp(1448 * 44), gso=0x81)),
        (FLAG_VNET | FLAG_BUNDLE, _bundle(_vnet(a, flags=1) for a in acks)),
        (0, b""),  # keepalive
    ]


def captured_payloads(directory: Path | None) -> list[tuple[int, bytes]]:
    if directory is None or not directory.is_dir():
        return []
    return [(p.read_bytes()[0], p.read_bytes()[1:]) for p in sorted(directory.iterdir()) if p.is_file()]


# -- seeds per harness ----------------------------------------------------------------------------


def _unit(data: bytes, *, addr: int = 0, advance: int = 0, gro: int | None = None) -> bytes:
    ctl = (1 if gro is not None else 0) | (addr << 1) | (advance << 3)
    return bytes([ctl]) + _U16.pack(len(data)) + (_U16.pack(gro) if gro is not None else b"") + data


def datagram_seeds(payloads: list[tuple[int, bytes]]) -> Iterator[bytes]:
    late = False
    for flags, payload in payloads:
        mode = b"\4" if flags & FLAG_VNET else b"\0"  # a TAP with a virtio header for offloaded traffic
        s = peer_session()
        rec = seal(s, payload, flags)
        ps = pieces(rec)
        if len(ps) == 1 or len(rec) <= CHUNK + PIECE_HEADER.size:
            yield mode + _unit(rec)
            yield mode + _unit(rec) + _unit(rec, addr=1)  # replayed from elsewhere: no roam
            continue
        yield mode + b"".join(_unit(p) for p in ps)
        yield mode + b"".join(_unit(p) for p in [*reversed(ps), ps[0]])
        run = b"".join(ps)
        yield mode + _unit(run, gro=CHUNK + PIECE_HEADER.size)
        if not late:  # once: the last piece comes after the partial aged out
            yield mode + b"".join(_unit(p) for p in ps[:-1]) + _unit(ps[-1], advance=31)
            late = True
    wrap = peer_session(counter=0xFFFFFFF8)
    yield b"\2" + b"".join(_unit(p) for _ in range(12) for p in pieces(seal(wrap, _ipv4_tcp(3000), 0)))
    nxt = peer_session(next_session=True)
    yield b"\0" + _unit(seal(nxt, _arp(), 0)) + _unit(seal(peer_session(), _arp(), 0), addr=2)
    yield b"\0" + _unit(handshake(MsgType.INITIATION)) + _unit(handshake(MsgType.RESPONSE), addr=3)
    yield b"\0" + b"".join(_unit(handshake(MsgType.INITIATION), addr=1) for _ in range(20))


def stream_seeds(payloads: list[tuple[int, bytes]]) -> Iterator[bytes]:
    s = peer_session()
    framed = [STREAM_LEN.pack(len(r)) + r for r in (seal(s, p, f) for f, p in payloads)]
    hs = STREAM_LEN.pack(INITIATION_LEN) + handshake(MsgType.INITIATION)
    yield b"\x00\x07" + b"".join(framed)
    yield b"\x01\x2a" + hs + b"".join(framed[:3]) + hs
    yield b"\x00\x03" + framed[0] + STREAM_LEN.pack(MAX_RECORD + 1)  # oversized: the link closes
    yield b"\x00\x05" + framed[1] + STREAM_LEN.pack(0)


def keyed_seeds(payloads: list[tuple[int, bytes]]) -> Iterator[bytes]:
    chunk = (CHUNK - 64) // 32
    for flags, payload in payloads:
        for transport in range(5) if len(payload) <= 4096 else (1, 3):  # big ones: PIECE runs and GRO only
            vnet_tap = 4 if flags & FLAG_VNET else 0
            yield bytes([flags | vnet_tap | (transport << 3), chunk]) + payload
    yield bytes([0x40, chunk]) + _arp()  # the next session's first record


def write(harness: str, seeds: Iterable[bytes]) -> int:
    directory = CORPUS / harness
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for seed in seeds:
        (directory / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.native.gen_corpus")
    parser.add_argument(
        "--payloads", type=Path, default=CAPTURED, help="captured record payloads (flags byte + payload)"
    )
    args = parser.parse_args(argv)
    payloads = captured_payloads(args.payloads) + built_payloads()
    for name, gen in (("datagram", datagram_seeds), ("stream", stream_seeds), ("keyed", keyed_seeds)):
        print(name, write(name, gen(payloads)))


if __name__ == "__main__":
    main()
