"""The review findings of issue 9 against the native fast path, one test each (each failed before its fix).

Every exchange is real: the pump's link is a UDP socket on loopback or a stream socketpair, the
other side seals with the Python record layer, and an "attacker" is another loopback socket (or
the peer's own socket, standing in for a spoofed source address).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.vna_agent.dataplane.test_fastpath import (
    Rig,
    _initiation_to,
    _open,
    _response_to,
    _seal,
    _wait,
    needs_native,
)
from vna_agent.dataplane import fastpath
from vna_agent.dataplane.wire import FLAG_VNET, PIECE_HEADER, RECORD_HEADER, VNET_HDR, MsgType

if fastpath.available():
    from vna_agent.dataplane import _fastpath  # type: ignore[attr-defined]

_PIECE = int(MsgType.PIECE)


@pytest.fixture
def udp() -> Iterator[Rig]:
    r = Rig(stream=False, chunk=1000)
    r.pump.start()
    yield r
    r.close()


@pytest.fixture
def attacker() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s


def _pieces(rec: bytes, chunk: int = 1200) -> list[bytes]:
    _, _, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
    parts = [rec[o : o + chunk] for o in range(0, len(rec), chunk)]
    return [
        PIECE_HEADER.pack(_PIECE, i, len(parts), 0, receiver, counter & 0xFFFFFFFF, i * chunk) + p
        for i, p in enumerate(parts)
    ]


def _piece(receiver: int, seq: int, idx: int, count: int, off: int, body: bytes) -> bytes:
    return PIECE_HEADER.pack(_PIECE, idx, count, 0, receiver, seq, off) + body


def _header(rec: bytes) -> tuple[int, int]:
    _, _, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
    return receiver, counter & 0xFFFFFFFF


def _sync(r: Rig, payload: bytes = b"sentinel") -> None:
    """Everything sent before is processed once a record sent after it reaches the TAP."""
    r.peer.sendto(_seal(r.python, payload), r.link_pump.getsockname())
    assert r.tap.recv(1 << 17) == payload


# -- 1. sparse piece offsets: no 66 KB "record" out of two tiny datagrams --------------------------


@needs_native
def test_two_tiny_pieces_with_a_far_offset_cost_no_crypto(udp: Rig) -> None:
    rec = _seal(udp.python, b"only its header is used")
    receiver, seq = _header(rec)
    dest = udp.link_pump.getsockname()
    udp.peer.sendto(_piece(receiver, seq, 0, 2, 0, rec[:16]), dest)
    udp.peer.sendto(_piece(receiver, seq, 1, 2, 66079, b"\0"), dest)  # claims a 66 KB record
    _sync(udp)
    st = udp.pump.stats()
    assert st["drops"]["bad_tag"] == 0, "a record the pieces never covered went through AES-GCM"
    assert st["records_in"] == 1  # the sentinel only


@needs_native
def test_pieces_that_do_not_tile_a_record_are_refused(udp: Rig) -> None:
    rec = _seal(udp.python, os.urandom(3000))
    receiver, seq = _header(rec)
    dest = udp.link_pump.getsockname()
    for idx, off, body in ((0, 8, rec[:1200]), (1, 1000, rec[1200:2400]), (2, 2400, rec[2400:])):
        udp.peer.sendto(_piece(receiver, seq, idx, 3, off, body), dest)  # offsets not idx * piece_len
    udp.peer.sendto(_piece(receiver, seq, 3, 3, 3600, b"x"), dest)  # index past the count
    _sync(udp)
    drops = udp.pump.stats()["drops"]
    assert (drops["decode"], drops["bad_tag"], drops["incomplete"]) == (3, 0, 0)


# -- 2. reassembly state changes only for a known session and an acceptable counter ----------------


@needs_native
def test_junk_pieces_of_unknown_sessions_do_not_evict_a_genuine_partial(udp: Rig, attacker: socket.socket) -> None:
    big = os.urandom(20000)
    ps = _pieces(_seal(udp.python, big))
    dest = udp.link_pump.getsockname()
    for p in ps[:-1]:
        udp.peer.sendto(p, dest)
    for i in range(40):  # more than the partial slots, none of a session the pump has
        attacker.sendto(_piece(0xBAD00000 + i, i, 0, 2, 0, os.urandom(100)), dest)
    udp.peer.sendto(ps[-1], dest)
    assert udp.tap.recv(1 << 17) == big
    assert udp.pump.stats()["drops"]["no_session"] == 40


@needs_native
def test_pieces_of_replayed_or_far_future_counters_open_no_partial(udp: Rig, attacker: socket.socket) -> None:
    seen = _seal(udp.python, b"seen")
    dest = udp.link_pump.getsockname()
    udp.peer.sendto(seen, dest)
    assert udp.tap.recv(1 << 17) == b"seen"
    receiver, seq = _header(seen)
    attacker.sendto(_piece(receiver, seq, 0, 2, 0, os.urandom(100)), dest)  # its counter was seen
    attacker.sendto(_piece(receiver, seq + 1_000_000, 0, 2, 0, os.urandom(100)), dest)  # far ahead
    _sync(udp)
    assert udp.pump.stats()["drops"]["replay"] == 2


@needs_native
def test_pre_poisoned_counters_do_not_lose_the_genuine_records(udp: Rig) -> None:
    """An on-path observer knows the index and the next counters; its pieces arrive first (from the
    peer's own address: a spoofed source), with another count and with the right geometry but junk."""
    dest = udp.link_pump.getsockname()
    payloads = [os.urandom(5000) for _ in range(4)]
    records = [_seal(udp.python, p) for p in payloads]
    for rec in records:
        receiver, seq = _header(rec)
        genuine = _pieces(rec)
        udp.peer.sendto(_piece(receiver, seq, 0, 7, 0, b"p"), dest)  # another count
        udp.peer.sendto(_piece(receiver, seq, 0, len(genuine), 0, os.urandom(1200)), dest)  # junk, same geometry
    for rec in records:
        for p in _pieces(rec):
            udp.peer.sendto(p, dest)
    assert [udp.tap.recv(1 << 17) for _ in payloads] == payloads


# -- 3. a replayed (lost) record does not move the peer ---------------------------------------------


@needs_native
def test_a_replayed_lost_record_does_not_hijack_the_peer_address(udp: Rig, attacker: socket.socket) -> None:
    dest = udp.link_pump.getsockname()
    lost = _seal(udp.python, b"lost on the way")  # counter 0: captured by the attacker, never delivered
    udp.peer.sendto(_seal(udp.python, b"delivered"), dest)
    assert udp.tap.recv(1 << 17) == b"delivered"
    attacker.sendto(lost, dest)
    assert udp.tap.recv(1 << 17) == b"lost on the way"  # in the window and unseen: accepted, once
    assert udp.pump.take() == []  # but no EV_PEER: it did not advance the window
    udp.tap.send(b"still to the peer")
    assert _open(udp.python, udp.peer.recv(65536))[0] == b"still to the peer"


# -- 4. handshake floods do not starve the genuine handshakes ---------------------------------------


def _messages(r: Rig) -> list[tuple[bytes, object]]:
    return [(data, addr) for kind, _, data, addr in r.pump.take() if kind == _fastpath.EV_MESSAGE]


@needs_native
def test_junk_handshakes_do_not_keep_the_peers_response_out(udp: Rig, attacker: socket.socket) -> None:
    dest = udp.link_pump.getsockname()
    junk = [b"\x01"] * 300 + [bytes([2]) + os.urandom(75) for _ in range(300)]  # no size or mac1 of ours
    for j in junk:
        attacker.sendto(j, dest)
    genuine = _response_to(udp.identity)
    udp.peer.sendto(genuine, dest)
    _sync(udp)
    assert _messages(udp) == [(genuine, udp.peer.getsockname())]
    assert udp.pump.stats()["drops"]["handshake"] > 0  # (what the socket buffer held of the 600)


@needs_native
def test_a_flood_of_valid_initiations_does_not_keep_the_peers_out(udp: Rig, attacker: socket.socket) -> None:
    """Who knows the public key can make mac1 valid: per-type and per-origin quotas keep the peer's."""
    dest = udp.link_pump.getsockname()
    flood = _initiation_to(udp.identity, index=1)
    for _ in range(200):
        attacker.sendto(flood, dest)
    mine, theirs = _initiation_to(udp.identity, index=2), _response_to(udp.identity)
    udp.peer.sendto(mine, dest)
    udp.peer.sendto(theirs, dest)
    _sync(udp)
    got = _messages(udp)
    assert (mine, udp.peer.getsockname()) in got and (theirs, udp.peer.getsockname()) in got
    assert sum(1 for _, addr in got if addr == attacker.getsockname()) <= 8
    assert udp.pump.stats()["drops"]["handshake"] >= 192


# -- 6. an authenticated peer's virtio_net_hdr is checked before the local kernel gets it -----------


def _vnet(flags: int, gso: int, hdr_len: int, gso_size: int, csum_start: int, csum_off: int, frame: bytes) -> bytes:
    return VNET_HDR.pack(flags, gso, hdr_len, gso_size, csum_start, csum_off) + frame


def _tcp4(n: int) -> bytes:
    eth = bytes(12) + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + n, 1, 0, 64, 6, 0, bytes(4), bytes(4))
    return eth + ip + bytes(20) + os.urandom(n)


@needs_native
def test_virtio_headers_are_bounded_and_only_known_gso_types_pass() -> None:
    r = Rig(vnet=True)
    try:
        r.pump.start()
        frame = _tcp4(5000)
        good = _vnet(1, 1, 54, 1448, 34, 16, frame)  # TSO over IPv4, as a TAP hands it out
        valid = _vnet(2, 0, 0, 0, 0, 0, frame)  # DATA_VALID: this kernel checks the sum itself
        bad = [
            _vnet(1, 3, 54, 1448, 34, 6, frame),  # UFO
            _vnet(1, 5, 54, 1448, 34, 6, frame),  # USO: not offered by our TAP
            _vnet(1, 0, 0, 0, 60000, 16, frame),  # checksum start past the frame
            _vnet(1, 1, 9000, 1448, 34, 16, frame),  # header length past the frame
            _vnet(5, 0, 0, 0, 34, 16, frame),  # an unknown flag
            _vnet(1, 4, 54, 1448, 34, 16, frame),  # TCPv6 GSO of an IPv4 frame
            _vnet(1, 1, 54, 0, 34, 16, frame),  # GSO with no segment size
        ]
        for payload in [good, *bad, valid]:
            r.send_record(_seal(r.python, payload, FLAG_VNET))
        assert r.tap.recv(1 << 17) == good
        assert r.tap.recv(1 << 17) == bytes([0]) + valid[1:]
        assert _wait(lambda: r.pump.stats()["drops"]["offload_mismatch"]) == len(bad)
    finally:
        r.close()


# -- 7. a refused GSO send is retried later: test_fastpath.py::test_datagram_falls_back_..._and_retries_later


# -- 8. stop() from two threads joins the thread once ----------------------------------------------

_STOP_RACE = textwrap.dedent(
    """
    import socket, threading
    from tests.vna_agent.dataplane.test_fastpath import Rig
    for _ in range(200):
        r = Rig()
        r.pump.start()
        threads = [threading.Thread(target=r.pump.stop) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        r.pump.start()  # still usable after the race
        r.tap.send(b"after")
        r.recv_message()
        r.close()
    print("ok")
    """
)


@needs_native
def test_concurrent_stops_join_the_thread_once() -> None:
    done = subprocess.run([sys.executable, "-c", _STOP_RACE], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
